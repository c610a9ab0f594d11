"""Package: export to ONNX with a dynamic batch dimension, the spec in its metadata, and a parity check.

The exported graph has up to three outputs from one forward pass: `logits`, `embedding` (the
penultimate layer: the input of the network's last linear layer) and `projection` (the
embedding projected on principal components fitted on the training split at build time: the
few dozen numbers the server records per request for embedding drift).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mlops.serve.inference import SPEC_KEY, ModelSpec, OnnxClassifier

INPUT_NAME = "image"
OUTPUTS = ("logits", "embedding", "projection")


def split_head(network: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head): the network's last `nn.Linear` and a copy of the network without it.

    torchvision classifiers end with that layer, so head(body(x)) == network(x); the parity
    check compares the exported logits with the network's own, so a network that does not end
    with it fails there instead of exporting wrong logits.
    """
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no nn.Linear layer: no embedding to export")
    name = linears[-1]
    head = network.get_submodule(name)
    body = copy.deepcopy(network)
    parent, _, child = name.rpartition(".")
    setattr(body.get_submodule(parent) if parent else body, child, nn.Identity())
    return body.eval(), head


@dataclass(frozen=True)
class Projection:
    """Principal components of training-split embeddings: (embedding - mean) @ components.T."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d)


def embeddings(network: nn.Module, batches) -> np.ndarray:
    """Penultimate-layer features of `batches` (arrays of shape (n, 3, size, size))."""
    body, _ = split_head(network.cpu().eval())
    with torch.no_grad():
        return np.concatenate([body(torch.from_numpy(batch)).numpy() for batch in batches])


def fit_projection(features: np.ndarray, dims: int, seed: int) -> Projection:
    """PCA (scikit-learn) of `features` to at most `dims` components."""
    from sklearn.decomposition import PCA

    dims = min(dims, *features.shape)
    pca = PCA(n_components=dims, svd_solver="full", random_state=seed).fit(features)
    return Projection(pca.mean_.astype(np.float32), pca.components_.astype(np.float32))


class Exported(nn.Module):
    """What the ONNX file computes: logits, embedding and (with a projection) its projection."""

    def __init__(self, network: nn.Module, projection: Projection | None):
        super().__init__()
        self.body, self.head = split_head(network)
        self.project = projection is not None
        if projection is not None:
            self.register_buffer("mean", torch.from_numpy(projection.mean))
            self.register_buffer("components", torch.from_numpy(projection.components))

    def forward(self, x: torch.Tensor):
        embedding = self.body(x)
        logits = self.head(embedding)
        if not self.project:
            return logits, embedding
        return logits, embedding, (embedding - self.mean) @ self.components.T


def export_onnx(network: nn.Module, spec: ModelSpec, path: Path, opset: int, projection: Projection | None = None) -> Path:
    """`network` as ONNX: outputs `logits`, `embedding` and, with `projection`, `projection`."""
    exported = Exported(network.cpu().eval(), projection).eval()
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            exported,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUTS[: 3 if projection is not None else 2]),
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
