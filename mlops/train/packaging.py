"""Package: export to ONNX with a dynamic batch dimension, the spec in its metadata, and a parity check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mlops.serve.inference import SPEC_KEY, ModelSpec, OnnxClassifier

INPUT_NAME, OUTPUT_NAME = "image", "logits"


def export_onnx(network: nn.Module, spec: ModelSpec, path: Path, opset: int) -> Path:
    network = network.cpu().eval()
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, spec.to_json()
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    atol: float
    rtol: float
    passed: bool


class ParityError(ValueError):
    pass


def check_parity(network: nn.Module, onnx_path: Path, batch: np.ndarray, atol: float, rtol: float) -> Parity:
    """Compare PyTorch and ONNX Runtime logits on real images; raise ParityError past tolerance."""
    with torch.no_grad():
        expected = network.cpu().eval()(torch.from_numpy(batch)).numpy()
    actual = OnnxClassifier(onnx_path).logits(batch)
    diff = float(np.max(np.abs(expected - actual)))
    passed = bool(np.allclose(actual, expected, atol=atol, rtol=rtol))
    result = Parity(len(batch), diff, atol, rtol, passed)
    if not passed:
        raise ParityError(
            f"ONNX parity failed on {len(batch)} test images: max |onnx - torch| = {diff:.3g}"
            f" (export.parity_atol {atol}, export.parity_rtol {rtol})"
        )
    return result
