"""One preprocessing for training, evaluation and serving, and the ONNX model runner.

An exported model carries its `ModelSpec` (class names, input size, normalisation) in the ONNX
file's metadata, so whoever runs it needs the file and nothing else.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPEC_KEY = "mlops.spec"


@dataclass(frozen=True)
class ModelSpec:
    classes: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        return cls(tuple(raw["classes"]), int(raw["input_size"]), tuple(raw["mean"]), tuple(raw["std"]))


def shrink(image: Image.Image, size: int) -> Image.Image:
    """`image` reduced by a whole factor (box filter) while both sides stay at least 2 x `size`.

    What Pillow's `reducing_gap` does: cheap, and resizing from there is as fair as from the
    original. Modes other than L and RGB become RGB first (reducing palette indices is wrong).
    """
    factor = min(image.size) // (2 * size)
    if factor < 2:
        return image
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.reduce(factor)


def image_to_array(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """RGB, resized to input_size x input_size, scaled to [0, 1], normalised; CHW float32."""
    image = shrink(image, spec.input_size)
    if image.mode != "RGB":
        image = image.convert("RGB")  # a copy, even of an RGB image: only when needed
    pixels = np.asarray(image.resize((spec.input_size, spec.input_size), Image.BILINEAR))
    table = normalising_table(spec.mean, spec.std)
    array = np.empty((3, *pixels.shape[:2]), np.float32)
    for channel in range(3):  # one lookup per channel: a quarter of the time of four float passes
        np.take(table[channel], pixels[:, :, channel], out=array[channel])
    return array


@functools.lru_cache(maxsize=16)
def normalising_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: what each channel's byte values become, by the same float32 arithmetic
    as `(pixels / 255 - mean) / std`, so the values are identical to computing it per pixel."""
    values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    table = (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False
    return table


def load_array(path: Path, spec: ModelSpec) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (spec.input_size, spec.input_size))  # as the server decodes
        return image_to_array(image, spec)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """An exported classifier run by ONNX Runtime on the CPU."""

    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True):
        """`threads`: intra-op threads (None: ONNX Runtime's default, one per physical core);
        `spinning`: whether they spin while waiting for work (ONNX Runtime's default: faster alone,
        but the spinning takes CPU from whatever else runs, such as a server's HTTP side)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in metadata:
            raise ValueError(f"{path}: ONNX model has no '{SPEC_KEY}' metadata")
        self.spec = ModelSpec.from_json(metadata[SPEC_KEY])
        self.input_name = self.session.get_inputs()[0].name
        outputs = [output.name for output in self.session.get_outputs()]
        self.logits_name = outputs[0]
        # models exported before embeddings have one output: no projection to record
        self.projects = "projection" in outputs
        self.names = [self.logits_name] + (["projection"] if self.projects else [])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.logits_name], {self.input_name: batch})[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, projection of the embedding or None) from one forward pass."""
        outputs = self.session.run(self.names, {self.input_name: batch})
        return outputs[0], outputs[1] if self.projects else None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (n, classes)."""
        return softmax(self.logits(batch))
