"""Estimated accuracy (CBPE with the version's temperature) against the realised accuracy of the
shared build, on the ~1,400 digits it never saw (env=test trains on 40 per class), clean, under
a brightness shift and under a class-prior shift."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flows.config import load_config
from mlops.data.layout import dataset_dir
from mlops.monitor.estimate import calibrated, estimate_accuracy
from mlops.monitor.profiling import Reference
from mlops.registry import Registry
from mlops.serve.inference import OnnxClassifier, image_to_array, load_array
from mlops.traffic import corrupt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unseen(built, tmp_path_factory):
    """(model, reference, [(path, label)] of source digits outside the build's splits)."""
    workspace, result = built
    config = load_config("build", "test", [f"paths.workspace={workspace}"])
    registry = Registry(config.mlflow)
    ref = registry.version(result.version)
    folder = tmp_path_factory.mktemp("tracking")
    model = OnnxClassifier(registry.download_model(ref.run_id, folder))
    reference = Reference.load(registry.download_reference(ref.run_id, folder))
    used = {(p.parent.name, p.name) for p in dataset_dir(config.dvc.repo, "digits").rglob("*.png")}
    source = workspace / "sources" / "digits"
    images = [(p, p.parent.name) for p in sorted(source.rglob("*.png")) if (p.parent.name, p.name) not in used]
    assert len(images) > 1000
    return model, reference, images


def outcome(model: OnnxClassifier, temperature: float, images, drift: str = "none") -> tuple[float, float, tuple]:
    """(realised accuracy, estimated accuracy, estimate interval) of `images` under `drift`."""
    rng = np.random.default_rng(0)
    arrays = []
    for path, _ in images:
        buffer = io.BytesIO()
        with Image.open(path) as image:
            corrupt(image, drift, 0.25, rng).save(buffer, "PNG")  # as replay sends it
        with Image.open(buffer) as decoded:
            arrays.append(image_to_array(decoded, model.spec))
    logits = model.logits(np.stack(arrays))
    predicted = [model.spec.classes[i] for i in logits.argmax(axis=1)]
    realised = float(np.mean([p == label for p, (_, label) in zip(predicted, images)]))
    estimate = estimate_accuracy(calibrated(logits, temperature))
    return realised, estimate.accuracy, (estimate.low, estimate.high)


def test_the_estimate_tracks_the_realised_accuracy(unseen):
    model, reference, images = unseen
    assert reference.temperature is not None and 0.05 < reference.temperature < 20
    clean_real, clean_estimate, _ = outcome(model, reference.temperature, images)
    assert abs(clean_estimate - clean_real) < 0.05, (clean_real, clean_estimate)

    bright_real, bright_estimate, _ = outcome(model, reference.temperature, images, "brightness")
    assert clean_real - bright_real > 0.05, "the brightness shift should cost accuracy"
    assert abs(bright_estimate - bright_real) < 0.08, (bright_real, bright_estimate)
    assert clean_estimate - bright_estimate > 0.5 * (clean_real - bright_real)  # it falls with it

    # class-prior shift: the class the model gets most wrong becomes 5x as frequent
    labels = np.array([label for _, label in images])
    predicted = np.array([model.spec.classes[i] for i in
                          model.logits(np.stack([load_array(p, model.spec) for p, _ in images])).argmax(axis=1)])
    recall = {c: float(np.mean(predicted[labels == c] == c)) for c in model.spec.classes}
    worst = min(recall, key=recall.get)
    rng = np.random.default_rng(1)
    weights = np.where(labels == worst, 5.0, 1.0)
    mix = [images[i] for i in rng.choice(len(images), 1500, p=weights / weights.sum())]
    prior_real, prior_estimate, _ = outcome(model, reference.temperature, mix)
    assert clean_real - prior_real > 0.02, (worst, recall[worst])
    assert abs(prior_estimate - prior_real) < 0.05, (prior_real, prior_estimate)
