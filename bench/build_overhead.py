"""Framework overhead of the build flow against a bare training-and-export script.

    python bench/build_overhead.py [--repeat 3] [--epochs 5] [--max-per-class 0] [--model resnet18]

Both sides train the same torchvision network on the same prepared images for the same epochs,
batch size, optimizer and (env=test's constant) learning rate, and export it to ONNX. The bare
script is what a user would write by hand: a plain PyTorch loop, no Prefect, MLflow, DVC, validation,
evaluation or gate. Each side is timed twice, and compared like for like:

- a fresh process, as a user runs it (`python -m flows.build ...` against `python
  bench/build_overhead.py --bare DIR`): interpreter start, imports, and for the flow its first
  run (ingest, DVC, the MLflow database, Prefect's temporary API);
- a warm process (a second call in this one): the steady state of a forced retrain.

The unchanged rerun (the trained model reused) is timed too. Every variant runs `--repeat`
times, interleaved round by round, and the table gives the median and the range: on a shared
2-core machine the same bare loop varies by 15 % between runs, more than the goals' margins.
"""

from __future__ import annotations

import offline  # noqa: F401  bench/offline.py: before anything imports Prefect

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from table import print_table  # bench/table.py
from torch.utils.data import DataLoader
from torchvision.models import get_model

from mlops.data.layout import dataset_dir

ROOT = Path(__file__).resolve().parent.parent
FLOW_FRESH = "build flow, fresh process (python -m flows.build: first run)"
FLOW_FIRST_CALL = "build flow, first call in a process that imported it"
FLOW_FORCED = "build flow, warm process (forced retrain)"
FLOW_REUSE = "build flow, unchanged rerun (reuse)"
BARE_FRESH = "bare script, fresh process: PyTorch loop + ONNX export"
BARE_WARM = "bare script, warm process"
AGAINST = {FLOW_FRESH: BARE_FRESH, FLOW_FIRST_CALL: BARE_WARM, FLOW_FORCED: BARE_WARM, FLOW_REUSE: BARE_WARM,
           BARE_FRESH: BARE_FRESH, BARE_WARM: BARE_WARM}


def bare_train_and_export(data_dir: Path, epochs: int, model: str, batch_size: int, out: Path) -> float:
    """The hand-rolled alternative; returns test accuracy of the exported model."""
    from mlops.data.ingest import load_prepared
    from mlops.serve.inference import ModelSpec, load_array
    from mlops.train.training import ImageDataset

    torch.manual_seed(42)
    prepared = load_prepared(data_dir)
    spec = ModelSpec(tuple(prepared.classes), 32, (0.5,) * 3, (0.5,) * 3)
    loader = DataLoader(ImageDataset(prepared.files("train"), spec), batch_size=batch_size, shuffle=True)
    network = get_model(model, weights=None, num_classes=len(prepared.classes))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        network.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(network(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        torch.optim.swa_utils.update_bn((x for x, _ in loader), network)
    network.eval()
    torch.onnx.export(
        network, (torch.zeros(1, 3, 32, 32),), str(out), input_names=["image"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
    )
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    files = prepared.files("test")
    batch = np.stack([load_array(path, spec) for path, _ in files])
    predicted = session.run(None, {"image": batch})[0].argmax(1)
    return float((predicted == np.array([label for _, label in files])).mean())


def fresh_process(command: list[str]) -> tuple[float, str]:
    """Wall seconds of `command` in a new interpreter, and its last output line."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-per-class", type=int, default=0, help="0: all 1,797 digits")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each figure is their median")
    parser.add_argument("--bare", type=Path, help="only run the bare script on this prepared dataset (a fresh process)")
    args = parser.parse_args()
    if args.bare:
        out = Path(tempfile.mkdtemp(prefix="bench-bare-")) / "bare.onnx"
        print(bare_train_and_export(args.bare, args.epochs, args.model, args.batch_size, out))
        return
    logging.getLogger("prefect").setLevel(logging.WARNING)
    from mlflow import MlflowClient

    from flows.build import build

    timed: dict[str, list[float]] = {}
    accuracy: dict[str, float] = {}

    def note(variant: str, seconds: float, acc: float) -> None:
        timed.setdefault(variant, []).append(seconds)
        accuracy[variant] = acc

    for round_ in range(args.repeat):  # the variants interleaved, so that a slow spell of the machine hits all
        workspace = Path(tempfile.mkdtemp(prefix="bench-build-"))
        overrides = [
            f"paths.workspace={workspace}",
            f"model={args.model}",
            f"train.max_epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            "train.progress_bar=false",
            f"data.max_per_class={args.max_per_class or 'null'}",
            # the gate must not stop a build that is only timed (a tiny --epochs/--max-per-class run)
            "gate.min_accuracy=0", "gate.min_class_recall=0", "gate.max_recall_gap=1",
            "gate.max_accuracy_drop=1.0", "gate.max_macro_f1_drop=1.0",
        ]
        seconds, _ = fresh_process(["-m", "flows.build", "env=test", *overrides, "force=true"])
        uri = f"sqlite:///{workspace}/mlflow.db"
        client = MlflowClient(uri, uri)  # after the fresh run: its database is created by the flow

        def test_accuracy(run_id: str) -> float:
            return client.get_run(run_id).data.metrics["test_accuracy"]

        first = client.search_runs([client.get_experiment_by_name("digits").experiment_id], max_results=1)[0]
        note(FLOW_FRESH, seconds, test_accuracy(first.info.run_id))

        data = dataset_dir(workspace / "dvc", "digits")
        seconds, acc = fresh_process([str(Path(__file__).relative_to(ROOT)), "--bare", str(data), "--epochs",
                                      str(args.epochs), "--model", args.model, "--batch-size", str(args.batch_size)])
        note(BARE_FRESH, seconds, float(acc))

        calls = [(FLOW_FIRST_CALL, ["force=true"])] if round_ == 0 else []  # the old "first run" figure
        for variant, extra in [*calls, (FLOW_FORCED, ["force=true"]), (FLOW_REUSE, [])]:
            start = time.perf_counter()
            state = build(env="test", overrides=overrides + extra, return_state=True)
            seconds = time.perf_counter() - start
            if not state.is_completed():
                raise SystemExit(f"build ({variant}): {state.message}")
            note(variant, seconds, test_accuracy(state.result().run_id))

        start = time.perf_counter()
        acc = bare_train_and_export(data, args.epochs, args.model, args.batch_size, workspace / "bare.onnx")
        note(BARE_WARM, time.perf_counter() - start, acc)

    print(f"\nmodel {args.model}, {args.epochs} epochs, batch {args.batch_size}, digits"
          f" (max_per_class {args.max_per_class or 'all'}), {torch.get_num_threads()} threads,"
          f" median of {args.repeat} round(s)\n")
    rows = []
    for variant, reference in AGAINST.items():
        median, base = statistics.median(timed[variant]), statistics.median(timed[reference])
        rows.append([variant, f"{median:.1f}", f"{min(timed[variant]):.1f}-{max(timed[variant]):.1f}",
                     "bare, fresh" if reference == BARE_FRESH else "bare, warm",
                     f"{median / base:.2f}", f"{accuracy[variant]:.3f}"])
    print_table(["variant", "median s", "range s", "against", "x against", "test acc"], rows)

if __name__ == "__main__":
    main()
