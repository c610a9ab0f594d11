"""The one way the benchmarks print their results: a markdown table, columns sized to fit."""

from __future__ import annotations


def print_table(header: list[str], rows: list[list[object]]) -> None:
    """Numbers are right-aligned, text left-aligned; each cell as given (format numbers first)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print(line(row))


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x×"))
    except ValueError:
        return text in ("", "-")
    return True
