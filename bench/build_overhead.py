"""Framework overhead of the build flow against a bare training-and-export script.

    python bench/build_overhead.py [--epochs 5] [--max-per-class 0] [--model resnet18]

Both sides train the same torchvision network on the same prepared images for the same epochs,
batch size, optimizer and (env=test's constant) learning rate, and export it to ONNX. The bare
script is what a user would write by hand: a plain PyTorch loop, no Prefect, MLflow, DVC, validation,
evaluation or gate. Each side is timed twice, and compared like for like:

- a fresh process, as a user runs it (`python -m flows.build ...` against `python
  bench/build_overhead.py --bare DIR`): interpreter start, imports, and for the flow its first
  run (ingest, DVC, the MLflow database, Prefect's temporary API);
- a warm process (a second call in this one): the steady state of a forced retrain.

The unchanged rerun (the trained model reused) is timed last.
"""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument("--bare", type=Path, help="only run the bare script on this prepared dataset (a fresh process)")
    args = parser.parse_args()
    if args.bare:
        out = Path(tempfile.mkdtemp(prefix="bench-bare-")) / "bare.onnx"
        print(bare_train_and_export(args.bare, args.epochs, args.model, args.batch_size, out))
        return
    logging.getLogger("prefect").setLevel(logging.WARNING)

    workspace = Path(tempfile.mkdtemp(prefix="bench-build-"))
    overrides = [
        f"paths.workspace={workspace}",
        f"model={args.model}",
        f"train.max_epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.progress_bar=false",
        f"data.max_per_class={args.max_per_class or 'null'}",
        "gate.max_accuracy_drop=1.0",
        "gate.max_macro_f1_drop=1.0",
    ]
    from mlflow import MlflowClient

    uri = f"sqlite:///{workspace}/mlflow.db"
    client = MlflowClient(uri, uri)

    def test_accuracy(run_id: str) -> float:
        return client.get_run(run_id).data.metrics["test_accuracy"]

    flow_fresh, _ = fresh_process(["-m", "flows.build", "env=test", *overrides, "force=true"])
    first_run = client.search_runs([client.get_experiment_by_name("digits").experiment_id], max_results=1)[0]
    rows = [["build flow, fresh process (python -m flows.build: first run)", flow_fresh, "bare, fresh", test_accuracy(first_run.info.run_id)]]

    from flows.build import build

    timed = {}
    for label, extra in (("warm-up", ["force=true"]), ("forced", ["force=true"]), ("reuse", [])):
        start = time.perf_counter()
        state = build(env="test", overrides=overrides + extra, return_state=True)
        timed[label] = (time.perf_counter() - start, state)
        if not state.is_completed():
            raise SystemExit(f"build ({label}): {state.message}")
    seconds, state = timed["warm-up"]  # what this benchmark timed as the first run until December 2026
    rows.append(["build flow, first call in this process (imports done)", seconds, "bare, warm", test_accuracy(state.result().run_id)])
    seconds, state = timed["forced"]
    rows.append(["build flow, warm process (forced retrain)", seconds, "bare, warm", test_accuracy(state.result().run_id)])
    seconds, state = timed["reuse"]
    rows.append(["build flow, unchanged rerun (reuse)", seconds, "bare, warm", test_accuracy(state.result().run_id)])

    data = dataset_dir(workspace / "dvc", "digits")
    bare_fresh, accuracy = fresh_process([str(Path(__file__).relative_to(ROOT)), "--bare", str(data), "--epochs",
                                          str(args.epochs), "--model", args.model, "--batch-size", str(args.batch_size)])
    bare = {"bare, fresh": bare_fresh}
    rows.append(["bare script, fresh process: PyTorch loop + ONNX export", bare_fresh, "bare, fresh", float(accuracy)])
    start = time.perf_counter()
    accuracy = bare_train_and_export(data, args.epochs, args.model, args.batch_size, workspace / "bare.onnx")
    bare["bare, warm"] = time.perf_counter() - start
    rows.append(["bare script, warm process", bare["bare, warm"], "bare, warm", accuracy])

    print(f"\nmodel {args.model}, {args.epochs} epochs, batch {args.batch_size}, digits"
          f" (max_per_class {args.max_per_class or 'all'}), {torch.get_num_threads()} threads\n")
    print_table(["variant", "wall s", "against", "x against", "test acc"],
                [[label, f"{s:.1f}", ref, f"{s / bare[ref]:.2f}", f"{acc:.3f}"] for label, s, ref, acc in rows])


if __name__ == "__main__":
    main()
