from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_classifier
from PIL import Image

from mlops.serve.inference import ModelSpec, OnnxClassifier, image_to_array
from mlops.train.packaging import ParityError, check_parity, export_onnx

SPEC = ModelSpec(("cat", "dog", "fox"), 16, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def test_export_has_a_dynamic_batch_and_carries_its_spec(tmp_path):
    path = export_onnx(tiny_classifier(), SPEC, tmp_path / "m.onnx", opset=18)
    model = OnnxClassifier(path)
    assert model.spec == SPEC
    for batch in (1, 7):
        probabilities = model.predict(np.zeros((batch, 3, 16, 16), np.float32))
        assert probabilities.shape == (batch, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_parity_with_pytorch_on_real_inputs(tmp_path):
    net = tiny_classifier()
    path = export_onnx(net, SPEC, tmp_path / "m.onnx", opset=18)
    batch = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    parity = check_parity(net, path, batch, atol=1e-4, rtol=1e-3)
    assert parity.passed and parity.max_abs_diff < 1e-4 and parity.images == 8


def test_parity_failure_names_the_difference_and_the_tolerance(tmp_path):
    net = tiny_classifier()
    path = export_onnx(net, SPEC, tmp_path / "m.onnx", opset=18)
    with torch.no_grad():
        net[-1].bias += 0.5  # the exported file no longer matches the network
    batch = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(ParityError, match=r"max \|onnx - torch\| = 0.5 \(export.parity_atol 0.0001"):
        check_parity(net, path, batch, atol=1e-4, rtol=0.0)


def test_preprocessing_resizes_converts_and_normalises():
    from PIL import Image

    gray = Image.new("L", (5, 9), color=255)
    array = image_to_array(gray, SPEC)
    assert array.shape == (3, 16, 16) and array.dtype == np.float32
    np.testing.assert_allclose(array[:, 0, 0], [(1 - 0.4) / 0.2, (1 - 0.5) / 0.25, (1 - 0.6) / 0.3], rtol=1e-6)


def test_a_model_without_spec_is_refused(tmp_path):
    torch.onnx.export(tiny_classifier(), (torch.zeros(1, 3, 16, 16),), str(tmp_path / "bare.onnx"), dynamo=True)
    with pytest.raises(ValueError, match="has no 'mlops.spec' metadata"):
        OnnxClassifier(tmp_path / "bare.onnx")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("size", [32, 128])
def test_image_to_array_is_exactly_the_per_pixel_normalisation(mode, size):
    """The lookup table gives the very floats of (pixels / 255 - mean) / std, channel first."""
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).convert(mode)
    spec = ModelSpec(("a", "b"), size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    expected = ((pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1)
    array = image_to_array(image, spec)
    assert array.dtype == np.float32 and array.shape == (3, size, size) and array.flags.c_contiguous
    assert np.array_equal(array, expected)
