"""Framework overhead of the build flow against a bare training-and-export script.

    python bench/build_overhead.py [--epochs 5] [--max-per-class 0] [--model resnet18]

Both sides train the same torchvision network on the same prepared images for the same epochs,
batch size and optimizer, and export it to ONNX. The bare script is what a user would write by
hand: a plain PyTorch loop, no Prefect, MLflow, DVC, validation, evaluation or gate. The build
flow is timed three ways: the first run of the process (includes starting Prefect's ephemeral
API), a second forced retrain (steady state), and an unchanged rerun (reuses the trained model).
"""

from __future__ import annotations

import argparse
import logging
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


def bare_train_and_export(data_dir: Path, args, out: Path) -> float:
    """The hand-rolled alternative; returns test accuracy of the exported model."""
    from mlops.data.ingest import load_prepared
    from mlops.serve.inference import ModelSpec, load_array
    from mlops.train.training import ImageDataset

    torch.manual_seed(42)
    prepared = load_prepared(data_dir)
    spec = ModelSpec(tuple(prepared.classes), 32, (0.5,) * 3, (0.5,) * 3)
    loader = DataLoader(ImageDataset(prepared.files("train"), spec), batch_size=args.batch_size, shuffle=True)
    network = get_model(args.model, weights=None, num_classes=len(prepared.classes))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(args.epochs):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-per-class", type=int, default=0, help="0: all 1,797 digits")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from flows.build import build

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
    rows = []
    for label, extra in (
        ("build flow, first run (starts Prefect API)", ["force=true"]),
        ("build flow, forced retrain", ["force=true"]),
        ("build flow, unchanged rerun (reuse)", []),
    ):
        start = time.perf_counter()
        state = build(env="test", overrides=overrides + extra, return_state=True)
        seconds = time.perf_counter() - start
        if not state.is_completed():
            raise SystemExit(f"{label}: {state.message}")
        from mlflow import MlflowClient

        uri = f"sqlite:///{workspace}/mlflow.db"
        accuracy = MlflowClient(uri, uri).get_run(state.result().run_id).data.metrics["test_accuracy"]
        rows.append((label, seconds, accuracy))

    start = time.perf_counter()
    accuracy = bare_train_and_export(dataset_dir(workspace / "dvc", "digits"), args, workspace / "bare.onnx")
    bare = time.perf_counter() - start
    rows.append(("bare script: PyTorch loop + ONNX export", bare, accuracy))

    print(f"\nmodel {args.model}, {args.epochs} epochs, batch {args.batch_size}, digits"
          f" (max_per_class {args.max_per_class or 'all'}), {torch.get_num_threads()} threads\n")
    print_table(["variant", "wall s", "x bare", "test acc"],
                [[label, f"{seconds:.1f}", f"{seconds / bare:.2f}", f"{acc:.3f}"] for label, seconds, acc in rows])


if __name__ == "__main__":
    main()
