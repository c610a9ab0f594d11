"""Active labelling: the captured images the model was least sure about, out to a person and back.

A person's time goes furthest on the images the served model found hardest. `least_confident`
picks them from the captured, unlabelled requests (`production.collect(...).joined.unlabelled`);
the exports put them where a person can label them:

- `export_folder`: the images under `unlabelled/`, an empty `labelled/<class>/` per class of the
  model, `tasks.csv` and a README. The person moves each image into the folder of its class;
- `export_label_studio`: the images under `images/`, `tasks.json` (Label Studio's task import
  format, the model's guess as a prediction scored by its confidence) and `label_config.xml`
  (an Image and a single Choices over the classes).

An export never writes into a folder that holds anything: earlier work is never overwritten.

The readers bring the labels back, `read_labelled_folder` from such a folder and
`read_label_studio_export` from Label Studio's JSON export: each gives the labels it could use
and one line per thing it could not (a folder that is no class, a file that is no request id, a
task without a usable annotation), never silently skipping one. `import_labels` writes them to
the records store as feedback records, the very records `/feedback` writes, so the monitor's
performance section and `production.collect` see them like any other label.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shlex
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote
from xml.sax.saxutils import escape, quoteattr

from pydantic import ValidationError

from mlops.data.production import Label
from mlops.serve.capture import REQUEST_ID as REQUEST_ID_PATTERN

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(REQUEST_ID_PATTERN)  # as the server issues them (and the capture store names files)
IMAGE_NAME = re.compile(r"(?P<id>[^.]+)\.(?P<ext>[A-Za-z0-9]{1,5})")  # <request id>.<ext>
UNLABELLED, LABELLED, IMAGES = "unlabelled", "labelled", "images"
TASKS_CSV, TASKS_JSON, LABEL_CONFIG, README = "tasks.csv", "tasks.json", "label_config.xml", "README.txt"
CONTROL, OBJECT = "label", "image"  # the names of the Choices and Image tags in label_config.xml
DEFAULT_IMPORT = "python -m flows.label import env=<env> from={dest}"


class Candidate(Protocol):
    """A captured request as `read_captures` gives it (`mlops.serve.capture.Captured`)."""

    request_id: str
    time: datetime
    model_version: str
    prediction: str
    confidence: float
    image_url: str

    def read_bytes(self) -> bytes: ...


# -- the rule -------------------------------------------------------------------------------


def least_confident(unlabelled: Sequence[Candidate], n: int) -> list:
    """The `n` requests the model was least sure about: lowest confidence first, ties by capture
    time, then request id (the same choice every time). n <= 0: none."""
    if n <= 0:
        return []
    return sorted(unlabelled, key=lambda c: (c.confidence, c.time, c.request_id))[:n]


# -- exports --------------------------------------------------------------------------------


def export_folder(
    chosen: Sequence[Candidate], classes: Sequence[str], dest: Path, *, import_command: str = DEFAULT_IMPORT,
) -> Path:
    """A folder for a person: `unlabelled/<request id>.<ext>` (the captured bytes), an empty
    `labelled/<class>/` per class, `tasks.csv` (the chosen requests, least confident first) and
    `README.txt` (what to do, ending with `import_command`; "{dest}" in it becomes the folder).
    FileExistsError if `dest` holds anything; returns `dest`."""
    _check_classes(classes)
    _start(dest)
    files = _copy_images(chosen, dest / UNLABELLED)
    for name in classes:
        (dest / LABELLED / name).mkdir(parents=True)
    _write_csv(dest / TASKS_CSV, chosen, files, UNLABELLED)
    command = import_command.replace("{dest}", shlex.quote(str(dest)))
    skipped = _skipped_lines(chosen, files)
    (dest / README).write_text(
        f"{len(files)} captured images the model was least sure about, least confident first in {TASKS_CSV}.\n\n"
        f"1. Look at each image in {UNLABELLED}/ and move it into the folder of its true class under\n"
        f"   {LABELLED}/ ({', '.join(f'{LABELLED}/{c}/' for c in classes)}).\n"
        f"   Leave an image you cannot decide where it is. Do not rename a file: its name is the\n"
        f"   request id the label is for.\n"
        f"2. Bring the labels in as feedback (any time, as often as you like):\n\n"
        f"   {command}\n"
        + skipped
    )
    return dest


def export_label_studio(
    chosen: Sequence[Candidate], classes: Sequence[str], dest: Path, *, document_root: Path | None = None,
    import_command: str = DEFAULT_IMPORT,
) -> Path:
    """A Label Studio project's inputs: `images/<request id>.<ext>`, `tasks.json` (one task per
    image; the model's guess a prediction with its confidence as the score) and
    `label_config.xml` (an Image and a single-choice Choices over `classes`), and a README.

    The tasks reference their images through Label Studio's local file serving,
    "/data/local-files/?d=<path under the document root>"; the document root is
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the Label Studio server, `dest`'s parent unless
    given. FileExistsError if `dest` holds anything; returns `dest`."""
    _check_classes(classes)
    root = (document_root or dest.parent).expanduser().resolve()
    absolute = dest.expanduser().resolve()
    if not absolute.is_relative_to(root):
        raise ValueError(f"{dest} is not under the Label Studio document root {root}")
    prefix = PurePosixPath(*absolute.relative_to(root).parts) / IMAGES
    _start(dest)
    files = _copy_images(chosen, dest / IMAGES)
    known = set(classes)
    tasks = []
    for capture in chosen:
        if capture.request_id not in files:
            continue
        task = {"data": {OBJECT: "/data/local-files/?d=" + quote(str(prefix / files[capture.request_id])),
                         "request_id": capture.request_id, "captured_at": _iso(capture.time)}}
        if capture.prediction in known:  # a guess outside the config would not show
            task["predictions"] = [{
                "model_version": str(capture.model_version), "score": float(capture.confidence),
                "result": [{"id": capture.request_id[:32], "from_name": CONTROL, "to_name": OBJECT, "type": "choices",
                            "value": {"choices": [capture.prediction]}}],
            }]
        tasks.append(task)
    (dest / TASKS_JSON).write_text(json.dumps(tasks, indent=2))
    (dest / LABEL_CONFIG).write_text(label_config(classes))
    command = import_command.replace("{dest}", "<the exported JSON file>")
    (dest / README).write_text(
        f"{len(tasks)} captured images the model was least sure about, as Label Studio tasks.\n\n"
        f"1. Start Label Studio with local file serving on and this document root:\n"
        f"     LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true\n"
        f"     LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root}\n"
        f"2. Create a project; Settings > Labeling Interface > Code: paste {LABEL_CONFIG}.\n"
        f"3. Settings > Cloud Storage > Add Source Storage > Local Files, absolute local path\n"
        f"     {absolute / IMAGES}\n"
        f"   and Save (not Save & Sync: the tasks come from {TASKS_JSON}).\n"
        f"4. Import {TASKS_JSON}. Each task shows the model's guess; sort by prediction score,\n"
        f"   lowest first, to label the hardest first.\n"
        f"5. Export the project as JSON (not JSON-MIN) and bring the labels in as feedback:\n\n"
        f"   {command}\n"
        + _skipped_lines(chosen, files)
    )
    return dest


def label_config(classes: Sequence[str]) -> str:
    """Label Studio's labeling config: the image and one required choice among `classes`."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        f'  <Image name="{OBJECT}" value="${OBJECT}" zoom="true"/>\n'
        f'  <Header value="{escape("Which class is it?")}"/>\n'
        f'  <Choices name="{CONTROL}" toName="{OBJECT}" choice="single" required="true" showInLine="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def exported_ids(root: Path) -> set[str]:
    """The request ids of every export under `root` (its `*/tasks.csv` and `*/tasks.json`), so an
    image goes out once while its export is kept. Unreadable files count as none."""
    found: set[str] = set()
    for path in sorted(root.glob(f"*/{TASKS_CSV}")):
        try:
            with path.open(newline="") as handle:
                found |= {row["request_id"] for row in csv.DictReader(handle) if row.get("request_id")}
        except (OSError, ValueError, KeyError, csv.Error) as error:
            log.warning("cannot read the earlier export %s: %s", path, error)
    for path in sorted(root.glob(f"*/{TASKS_JSON}")):
        try:
            tasks = json.loads(path.read_text())
            found |= {t["data"]["request_id"] for t in tasks if isinstance(t, dict) and "request_id" in t.get("data", {})}
        except (OSError, ValueError, TypeError, AttributeError) as error:
            log.warning("cannot read the earlier export %s: %s", path, error)
    return found


def _check_classes(classes: Sequence[str]) -> None:
    bad = [name for name in classes if not name or name.startswith(".") or "/" in name or "\\" in name]
    if not classes or bad:
        raise ValueError(f"classes {list(classes)}: each must be usable as a folder name")


def _start(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not empty: an export never overwrites earlier work "
                              "(give another dest, or move that one away)")
    dest.mkdir(parents=True, exist_ok=True)


def _copy_images(chosen: Iterable[Candidate], folder: Path) -> dict[str, str]:
    """request id -> file name under `folder`, for the images that could be read."""
    folder.mkdir(parents=True)
    files = {}
    for capture in chosen:
        name = capture.request_id + _suffix(capture.image_url)
        try:
            data = capture.read_bytes()
        except Exception as error:  # noqa: BLE001 - expired or unreachable since it was listed: left out, said so
            log.warning("capture %s left out of the export: %s: %s", capture.request_id, type(error).__name__, error)
            continue
        (folder / name).write_bytes(data)
        files[capture.request_id] = name
    return files


def _suffix(url: str) -> str:
    suffix = PurePosixPath(url.rsplit("/", 1)[-1]).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ".bin"


def _write_csv(path: Path, chosen: Iterable[Candidate], files: dict[str, str], folder: str) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["request_id", "time", "model_version", "prediction", "confidence", "file"])
        for c in chosen:
            if c.request_id in files:
                writer.writerow([c.request_id, _iso(c.time), c.model_version, c.prediction, f"{c.confidence:.6f}",
                                 f"{folder}/{files[c.request_id]}"])


def _skipped_lines(chosen: Iterable[Candidate], files: dict[str, str]) -> str:
    skipped = [c.request_id for c in chosen if c.request_id not in files]
    if not skipped:
        return ""
    return f"\nLeft out, their images could not be read (expired since they were listed): {', '.join(skipped)}\n"


def _iso(time: datetime) -> str:
    return time.astimezone(UTC).isoformat()


# -- readers --------------------------------------------------------------------------------


def read_labelled_folder(root: Path, classes: Sequence[str]) -> tuple[list[Label], list[str]]:
    """The labels of `root/<class>/<request id>.<ext>` (`root`: the `labelled/` folder of an
    export, or the export itself), and a "path: reason" line for each thing that is not one:
    a folder named after no class, a file outside a class folder or not named
    `<request id>.<ext>`, one request id in two classes (neither is used). Hidden files
    (.DS_Store) are left alone.

    A label's time is when its file last changed or was moved into its folder (the later of
    mtime and ctime: a move keeps the mtime of the copy the export made)."""
    if (root / LABELLED).is_dir() and LABELLED not in classes:
        root = root / LABELLED
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    known = set(classes)
    found: dict[str, list[tuple[Path, Label]]] = defaultdict(list)
    problems = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            problems.append(f"{entry}: not in a class folder ({_classes(classes)}): not used")
            continue
        if entry.name not in known:
            count = sum(1 for p in entry.rglob("*") if p.is_file())
            problems.append(f"{entry}: '{entry.name[:60]}' is not a class of the model ({_classes(classes)}): "
                            f"its {count} file(s) not used")
            continue
        for path in sorted(entry.iterdir()):
            if path.name.startswith("."):
                continue
            match = IMAGE_NAME.fullmatch(path.name)
            if path.is_dir():
                problems.append(f"{path}: a folder inside a class folder: not used")
            elif not match or not REQUEST_ID.fullmatch(match["id"]):
                problems.append(f"{path}: not named <request id>.<ext> (a request id is 1-64 of A-Z a-z 0-9 _ -): not used")
            else:
                stat = path.stat()
                when = datetime.fromtimestamp(max(stat.st_mtime, stat.st_ctime), UTC)
                found[match["id"]].append((path, Label(match["id"], entry.name, when)))
    labels = []
    for request_id, given in sorted(found.items()):
        if len({label.label for _, label in given}) > 1:
            problems.append(f"{', '.join(str(p) for p, _ in given)}: request {request_id} is in more than one class "
                            "folder: neither is used")
        else:
            labels.append(given[-1][1])
    return labels, problems


def read_label_studio_export(path: Path, classes: Sequence[str]) -> tuple[list[Label], list[str]]:
    """The labels in a Label Studio JSON export (a list of tasks, each with its `data` and its
    `annotations[].result[].value.choices`): per task, the latest annotation not cancelled
    (by `updated_at`, else `created_at`, else the file's time). A "path: task <id>: reason" line
    for each task that gives none: no request_id in its data, no annotation, a choice that is
    not a class. ValueError if the file is not such an export at all."""
    try:
        tasks = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON: {error}") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise ValueError(f"{path}: not a Label Studio JSON export (a list of tasks)")
    fallback = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    known = set(classes)
    labels, problems = [], []
    for number, task in enumerate(tasks, 1):
        where = f"{path}: task {task.get('id', f'#{number}')}"
        data = task.get("data") if isinstance(task.get("data"), dict) else task
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            problems.append(f"{where}: no valid request_id in its data (was it exported by flows.label?): not used")
            continue
        if "annotations" not in task:
            problems.append(f"{where}: request {request_id}: no annotations (export as JSON, not JSON-MIN or CSV): not used")
            continue
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        done = [(i, a) for i, a in enumerate(annotations) if not a.get("was_cancelled")]
        if not done:
            reason = "every annotation was skipped (cancelled)" if annotations else "not labelled yet"
            problems.append(f"{where}: request {request_id}: {reason}: not used")
            continue
        _, latest = max(done, key=lambda item: (_when(item[1], fallback), item[0]))
        choices = sorted({str(choice) for result in latest.get("result") or [] if isinstance(result, dict)
                          for choice in (result.get("value") or {}).get("choices") or []})
        if len(choices) != 1:
            problems.append(f"{where}: request {request_id}: its latest annotation has "
                            f"{'no choice' if not choices else f'{len(choices)} choices {choices}'}: not used")
        elif choices[0] not in known:
            problems.append(f"{where}: request {request_id}: '{choices[0][:60]}' is not a class of the model "
                            f"({_classes(classes)}): not used")
        else:
            labels.append(Label(request_id, choices[0], _when(latest, fallback)))
    return labels, problems


def _when(annotation: dict, fallback: datetime) -> datetime:
    for key in ("updated_at", "created_at"):
        value = annotation.get(key)
        if isinstance(value, str):
            try:
                stamp = datetime.fromisoformat(value)
            except ValueError:
                continue
            return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)
    return fallback


def _classes(classes: Sequence[str]) -> str:
    return ", ".join(classes)


# -- into the records store -----------------------------------------------------------------


def import_labels(labels: Iterable[Label], records_dir: Path, max_mb: float, max_age_days: float, source: str,
                  upload_url: str | None = None) -> int:
    """Write each label as a feedback record (`FeedbackRecord`, plus `source`) to the records
    folder `records_dir`, as `/feedback` does, shipped to `upload_url` (`records.url`) when set,
    for a monitor on another machine; returns how many were written. OSError if the folder could
    not be written or the upload failed."""
    from mlops.serve.records import FeedbackRecord, RecordWriter

    records = []
    for label in labels:
        if label.time.tzinfo is None:
            raise ValueError(f"label for {label.request_id}: its time {label.time} has no timezone")
        record = {"request_id": label.request_id, "label": label.label, "time": _iso(label.time), "source": source}
        try:
            FeedbackRecord.model_validate(record)
        except ValidationError as error:
            raise ValueError(f"label for {label.request_id} is not a valid feedback record: {error}") from None
        records.append(record)
    if not records:
        return 0
    writer = RecordWriter(records_dir, max_mb=max_mb, max_age_days=max_age_days, flush_n=len(records) + 1,
                          upload_url=upload_url)
    try:
        for record in records:
            writer.write("feedback", record)
    finally:
        writer.close()
    if writer.bytes_written == 0:  # the writer logs a failing disk instead of raising (it serves requests)
        raise OSError(f"could not write feedback records under {records_dir} (see the log)")
    if writer.dirty:  # written here, but not where the monitor reads
        raise OSError(f"feedback records written under {records_dir} could not be uploaded to {upload_url} (see the log)")
    return len(records)

