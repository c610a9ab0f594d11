"""Accuracy before labels: temperature scaling at build time, confidence-based estimation after.

A calibrated classifier that says 0.9 is right 9 times in 10, so the mean of its calibrated top
probabilities over a window estimates the window's accuracy (NannyML's CBPE). Temperature
scaling (Guo et al. 2017) calibrates with one number fitted on the validation split: the
probabilities become softmax(logits / T).

The estimate holds while the model stays calibrated on the new data: under a class-prior shift
and under mild covariate shift it tracks; far out of distribution (an unseen class) confidence
stays high where accuracy falls, which the embedding and output drift tests are there to see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlops.serve.inference import softmax

Z95 = 1.959964


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` (bounded 0.05..20)."""
    from scipy.optimize import minimize_scalar

    if len(logits) == 0:
        raise ValueError("no validation logits to calibrate on")
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(scaled).sum(axis=1)) - scaled[rows, labels]))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


@dataclass(frozen=True)
class Estimate:
    accuracy: float
    low: float  # 95% interval from the sampling error of n Bernoulli(confidence) outcomes
    high: float
    n: int


def estimate_accuracy(probabilities: np.ndarray) -> Estimate:
    """CBPE: the mean calibrated top probability, with a 95% interval."""
    confidence = np.asarray(probabilities).max(axis=1)
    n = len(confidence)
    if n == 0:
        raise ValueError("no predictions to estimate accuracy on")
    mean = float(confidence.mean())
    error = Z95 * float(np.sqrt(np.sum(confidence * (1.0 - confidence)))) / n
    return Estimate(mean, max(0.0, mean - error), min(1.0, mean + error), n)
