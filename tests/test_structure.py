"""Structure rules: the library stays free of the orchestrator, and the training key sees only training code."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from mlops.train import lineage

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"prefect", "hydra", "omegaconf"}


def imported_packages(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imported_packages_sees_both_import_forms():
    tree = ast.parse("import prefect.flows\nfrom hydra import compose\nfrom . import x\nimport os")
    assert imported_packages(tree) == {"prefect", "hydra", "os"}


def test_library_does_not_import_the_orchestrator_or_hydra():
    files = sorted((ROOT / "mlops").rglob("*.py"))
    assert files
    offenders = [
        f"{path.relative_to(ROOT)}: {sorted(bad)}"
        for path in files
        if (bad := imported_packages(ast.parse(path.read_text(), str(path))) & FORBIDDEN)
    ]
    assert not offenders, "mlops/ must not import prefect, hydra or omegaconf:\n" + "\n".join(offenders)


def test_code_hash_covers_training_code_only(tmp_path):
    for name in (*lineage.TRAINING_CODE, "mlops/serve/app.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    before = lineage.code_hash(tmp_path)

    with (tmp_path / "mlops/serve/app.py").open("a") as handle:
        handle.write("\n# a server change\n")
    assert lineage.code_hash(tmp_path) == before

    with (tmp_path / "mlops/train/training.py").open("a") as handle:
        handle.write("\n# a training change\n")
    assert lineage.code_hash(tmp_path) != before
