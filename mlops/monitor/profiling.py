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
from mlops.serve.inference import OnnxClassifier, load_array

OUTPUTS = ("prediction", "confidence")
PROFILE_FILE, VALUES_FILE = "profile.bin", "values.json"


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
    """A model version's reference: a whylogs profile and the raw values behind it (for plots)."""

    profile: object  # whylogs DatasetProfileView
    values: dict[str, list]  # column -> values (features from train, outputs from val)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROFILE_FILE).write_bytes(self.profile.serialize())
        (folder / VALUES_FILE).write_text(json.dumps(self.values))
        return folder

    @classmethod
    def load(cls, folder: Path) -> Reference:
        whylogs()
        from whylogs.core import DatasetProfileView

        view = DatasetProfileView.deserialize((folder / PROFILE_FILE).read_bytes())
        return cls(view, json.loads((folder / VALUES_FILE).read_text()))


def feature_frame(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rows.append(image_features(image))
    return pd.DataFrame(rows, columns=list(FEATURES))


def output_frame(model: OnnxClassifier, paths: list[Path], batch_size: int = 64) -> pd.DataFrame:
    classes, rows = model.spec.classes, []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([load_array(path, model.spec) for path in paths[start : start + batch_size]])
        probabilities = model.predict(batch)
        rows += [(classes[int(p.argmax())], float(p.max())) for p in probabilities]
    return pd.DataFrame(rows, columns=list(OUTPUTS))


def build_reference(model: OnnxClassifier, train: list[Path], val: list[Path]) -> Reference:
    """Image features of the train split and the model's outputs on the validation split."""
    why = whylogs()
    features, outputs = feature_frame(train), output_frame(model, val)
    profile = why.log(features).profile()
    profile.track(outputs)
    values = {column: features[column].tolist() for column in features} | {
        column: outputs[column].tolist() for column in outputs
    }
    return Reference(profile.view(), values)


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
