"""The estimators on synthetic data with known answers: two-sample tests (MMD, domain
classifier, BBSD), temperature scaling and confidence-based accuracy estimation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kstest

from mlops.monitor.estimate import calibrated, estimate_accuracy, fit_temperature
from mlops.monitor.shift import bbsd_test, embedding_test
from mlops.serve.inference import softmax

CLASSES = [str(k) for k in range(5)]


@pytest.mark.parametrize("method", ["mmd", "classifier"])
def test_same_distribution_p_values_are_uniform(method):
    rng = np.random.default_rng(0)
    p_values = [
        embedding_test(method, rng.normal(size=(60, 8)), rng.normal(size=(40, 8)), 0.05, 100, seed=i).p_value
        for i in range(30)
    ]
    assert kstest(p_values, "uniform").pvalue > 0.01, sorted(p_values)
    assert sum(p < 0.05 for p in p_values) <= 5  # 1.5 expected of 30


@pytest.mark.parametrize("method", ["mmd", "classifier"])
def test_a_shifted_sample_is_detected(method):
    rng = np.random.default_rng(1)
    reference, current = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    current[:, 0] += 0.8  # one direction moved by 0.8 standard deviations
    test = embedding_test(method, reference, current, 0.01, 200)
    assert test.drifted and test.p_value < 0.01
    assert test.statistic > (0.6 if method == "classifier" else 0.0)


def test_embedding_shapes_and_methods_are_checked():
    with pytest.raises(ValueError, match=r"embedding shapes differ: reference \(10, 4\), window \(10, 3\)"):
        embedding_test("mmd", np.zeros((10, 4)), np.zeros((10, 3)), 0.05, 100)
    with pytest.raises(ValueError, match="method 'kl'"):
        embedding_test("kl", np.zeros((10, 4)), np.zeros((10, 4)), 0.05, 100)


def dirichlet(rng, n: int, prior: list[float]) -> np.ndarray:
    """Softmax vectors of a confident classifier whose true classes follow `prior`."""
    labels = rng.choice(len(prior), n, p=np.asarray(prior) / sum(prior))
    alpha = np.ones((n, len(prior)))
    alpha[np.arange(n), labels] = 8.0
    return np.stack([rng.dirichlet(a) for a in alpha])


def test_bbsd_sees_a_class_prior_shift_and_corrects_for_many_classes():
    rng = np.random.default_rng(2)
    reference = dirichlet(rng, 300, [1] * 5)
    same = [bbsd_test(reference, dirichlet(rng, 200, [1] * 5), CLASSES, 0.05) for _ in range(30)]
    assert sum(t.drifted for t in same) <= 3  # Bonferroni: the family's false alarms stay near alpha
    assert all(0.0 <= t.p_value <= 1.0 for t in same)
    shifted = bbsd_test(reference, dirichlet(rng, 200, [5, 1, 1, 1, 1]), CLASSES, 0.05)
    assert shifted.drifted and "on p(0)" in shifted.detail and "Bonferroni over 5 classes" in shifted.detail


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.5)])  # the truth: T = 2.5
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    with pytest.raises(ValueError, match="no validation logits"):
        fit_temperature(np.zeros((0, 5)), np.zeros(0, int))


def test_estimated_accuracy_covers_the_realised_accuracy_of_a_calibrated_model():
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(100):
        probabilities = softmax(rng.normal(0, 2, size=(200, 5)))
        truth = np.array([rng.choice(5, p=p) for p in probabilities])
        realised = float((probabilities.argmax(axis=1) == truth).mean())
        estimate = estimate_accuracy(probabilities)
        covered += estimate.low <= realised <= estimate.high
    assert 88 <= covered <= 100  # a 95% interval


def test_an_overconfident_model_is_estimated_right_only_after_calibration():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, size=(3000, 5))
    truth = np.array([rng.choice(5, p=p) for p in softmax(logits)])
    realised = float((logits.argmax(axis=1) == truth).mean())
    overconfident = logits * 3.0  # what the network outputs: the right ranking, too sure
    temperature = fit_temperature(overconfident[:1500], truth[:1500])
    raw = estimate_accuracy(softmax(overconfident[1500:])).accuracy
    fixed = estimate_accuracy(calibrated(overconfident[1500:], temperature)).accuracy
    assert raw - realised > 0.15 and abs(fixed - realised) < 0.04
