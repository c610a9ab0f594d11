"""whylogs profiles: the reference a model version is built with, and the served traffic's.

whylogs 1.6.4 still uses `np.unicode_`, removed in NumPy 2; `whylogs()` puts the alias back
before the first import. Always import whylogs through it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mlops.serve.features import FEATURES, image_features
from mlops.serve.inference import OnnxClassifier, load_array, softmax

OUTPUTS = ("prediction", "confidence")
PROFILE_FILE, VALUES_FILE = "profile.bin", "values.json"
VECTORS_FILE, CALIBRATION_FILE = "outputs.npz", "calibration.json"
MAX_EMBEDDINGS = 1000  # reference embeddings kept (a deterministic sample of the validation split)


def whylogs():
    """The whylogs module, importable under NumPy 2 (see the module docstring)."""
    if not hasattr(np, "unicode_"):
        np.unicode_ = np.str_
    import whylogs as why

    # constant columns (every image 8x8) make whylogs warn about histogram bins on every call
    logging.getLogger("whylogs.viz.utils.quantile_stats").setLevel(logging.ERROR)

    return why


@dataclass
class Reference:
    """A model version's reference: a whylogs profile and the raw values behind it (for plots),
    the validation split's logits and embedding projections, and the calibration temperature.

    References built before embeddings have no vectors and no temperature: the monitor skips
    the checks that need them and says so.
    """

    profile: object  # whylogs DatasetProfileView
    values: dict[str, list]  # column -> values (features from train, outputs from val)
    logits: np.ndarray | None = None  # (n_val, classes)
    embedding: np.ndarray | None = None  # (<= MAX_EMBEDDINGS, dims): the model's `projection` output
    temperature: float | None = None  # fitted on the validation split

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROFILE_FILE).write_bytes(self.profile.serialize())
        (folder / VALUES_FILE).write_text(json.dumps(self.values))
        if self.logits is not None:
            vectors = {"logits": self.logits} | ({"embedding": self.embedding} if self.embedding is not None else {})
            np.savez_compressed(folder / VECTORS_FILE, **vectors)
        if self.temperature is not None:
            (folder / CALIBRATION_FILE).write_text(json.dumps(
                {"temperature": self.temperature, "method": "temperature scaling", "fitted_on": "val",
                 "images": len(self.logits) if self.logits is not None else None}))
        return folder

    @classmethod
    def load(cls, folder: Path) -> Reference:
        whylogs()
        from whylogs.core import DatasetProfileView

        view = DatasetProfileView.deserialize((folder / PROFILE_FILE).read_bytes())
        reference = cls(view, json.loads((folder / VALUES_FILE).read_text()))
        if (folder / VECTORS_FILE).exists():
            with np.load(folder / VECTORS_FILE) as vectors:
                reference.logits = vectors["logits"]
                reference.embedding = vectors["embedding"] if "embedding" in vectors else None
        if (folder / CALIBRATION_FILE).exists():
            reference.temperature = float(json.loads((folder / CALIBRATION_FILE).read_text())["temperature"])
        return reference


def feature_frame(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rows.append(image_features(image))
    return pd.DataFrame(rows, columns=list(FEATURES))


def model_outputs(model: OnnxClassifier, paths: list[Path], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, projections or None) of `paths`, as the server computes them."""
    logits, projections = [], []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([load_array(path, model.spec) for path in paths[start : start + batch_size]])
        batch_logits, batch_projection = model.run(batch)
        logits.append(batch_logits)
        projections.append(batch_projection)
    projection = np.concatenate(projections) if model.projects and projections else None
    return np.concatenate(logits) if logits else np.zeros((0, len(model.spec.classes)), np.float32), projection


def output_frame(classes: tuple[str, ...], probabilities: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"prediction": [classes[int(i)] for i in probabilities.argmax(axis=1)],
                         "confidence": probabilities.max(axis=1).astype(float)}, columns=list(OUTPUTS))


def build_reference(model: OnnxClassifier, train: list[Path], val: list[tuple[Path, int]], seed: int = 0) -> Reference:
    """Image features of the train split; the model's outputs and embeddings on the validation
    split, and the temperature that calibrates them (fitted on the validation labels)."""
    from mlops.monitor.estimate import fit_temperature

    why = whylogs()
    logits, projection = model_outputs(model, [path for path, _ in val])
    features, outputs = feature_frame(train), output_frame(model.spec.classes, softmax(logits))
    profile = why.log(features).profile()
    profile.track(outputs)
    values = {column: features[column].tolist() for column in features} | {
        column: outputs[column].tolist() for column in outputs
    }
    if projection is not None and len(projection) > MAX_EMBEDDINGS:
        keep = np.sort(np.random.default_rng(seed).choice(len(projection), MAX_EMBEDDINGS, replace=False))
        projection = projection[keep]
    temperature = fit_temperature(logits, np.asarray([label for _, label in val])) if len(val) else None
    return Reference(profile.view(), values, logits.astype(np.float32), projection, temperature)


def profile_frame(frame: pd.DataFrame):
    return whylogs().log(frame).view()


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    algorithm: str
    score: float  # p-value (ks, chi-square) or distance (hellinger)
    threshold: float
    drifted: bool


def drift_scores(
    current, reference, algorithms: dict[str, tuple[str, float]]
) -> list[FeatureDrift]:
    """whylogs drift per column in `algorithms` (column -> (algorithm, threshold)).

    ks and chi-square drift when the p-value is below the threshold; hellinger when the distance
    is above it. Columns missing from either profile are left out.
    """
    whylogs()
    from whylogs.viz.drift.column_drift_algorithms import Hellinger, calculate_drift_scores

    columns = set(current.get_columns()) & set(reference.get_columns())
    drift_map = {c: Hellinger() for c, (name, _) in algorithms.items() if name == "hellinger" and c in columns}
    scores = calculate_drift_scores(target_view=current, reference_view=reference, drift_map=drift_map or None)
    results = []
    for column, (_, threshold) in algorithms.items():
        score = scores.get(column)
        if column not in columns or not score:
            continue
        if score["algorithm"] == "hellinger":
            value = float(score["statistic"])
            results.append(FeatureDrift(column, "hellinger", value, threshold, value > threshold))
        else:
            value = float(score["pvalue"])
            results.append(FeatureDrift(column, score["algorithm"], value, threshold, value < threshold))
    return results


@dataclass(frozen=True)
class ConstraintResult:
    name: str
    passed: bool
    summary: dict


def check_constraints(frame: pd.DataFrame, constraints: list) -> list[ConstraintResult]:
    """Profile `frame` and evaluate whylogs constraints built by `constraints(factories)`.

    `constraints` is a list of (factory name, args) pairs, e.g. ("is_in_range", ("width", 8, 500)).
    """
    why = whylogs()
    from whylogs.core.constraints import ConstraintsBuilder
    from whylogs.core.constraints import factories

    builder = ConstraintsBuilder(dataset_profile_view=why.log(frame).view())
    builder.add_constraints([getattr(factories, name)(*args) for name, args in constraints])
    return [
        ConstraintResult(r.name, bool(r.passed) and not r.failed, r.summary or {})
        for r in builder.build().generate_constraints_report(with_summary=True)
    ]
