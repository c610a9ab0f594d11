"""Two-sample tests on what the model computes: its embeddings and its softmax outputs.

- `mmd`: kernel MMD with a permutation p-value (torchdrift's `kernel_mmd`, Gaussian kernel with
  the median-distance bandwidth, as in "Failing Loudly", Rabanser et al. 2019);
- `classifier`: a domain classifier (scikit-learn logistic regression) told to separate the
  reference from the window; its cross-validated ROC AUC, with the Mann-Whitney p-value of
  that AUC (AUC 0.5: indistinguishable);
- `bbsd`: black-box shift detection, a KS test (scipy) per class of the softmax vector with a
  Bonferroni correction.

Every test returns a `ShiftTest`; `drifted` is decided by `p_value < alpha`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("mmd", "classifier")


@dataclass(frozen=True)
class ShiftTest:
    method: str
    statistic: float  # MMD², AUC, or the largest per-class KS statistic
    p_value: float  # Bonferroni-adjusted for bbsd
    alpha: float
    detail: str = ""

    @property
    def drifted(self) -> bool:
        return self.p_value < self.alpha


def mmd_test(reference: np.ndarray, current: np.ndarray, alpha: float, permutations: int, seed: int = 0) -> ShiftTest:
    """Kernel MMD between two samples of vectors, p-value from `permutations` shuffles."""
    import torch
    from torchdrift.detectors.mmd import kernel_mmd

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mmd, p_value = kernel_mmd(torch.as_tensor(reference, dtype=torch.float32),
                                  torch.as_tensor(current, dtype=torch.float32), n_perm=permutations)
    return ShiftTest("mmd", float(mmd), float(p_value), alpha, f"MMD² {float(mmd):.4g}, {permutations} permutations")


def classifier_test(reference: np.ndarray, current: np.ndarray, alpha: float, folds: int = 5, seed: int = 0) -> ShiftTest:
    """Domain classifier: out-of-fold scores of a logistic regression told reference (0) from
    current (1); the AUC of those scores, and the one-sided Mann-Whitney p-value of AUC > 0.5."""
    from scipy.stats import mannwhitneyu
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([reference, current])
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(current))])
    folds = max(2, min(folds, len(reference), len(current)))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=cv, method="decision_function")
    u, p_value = mannwhitneyu(scores[y == 1], scores[y == 0], alternative="greater")
    auc = float(u) / (len(current) * len(reference))
    return ShiftTest("classifier", auc, float(p_value), alpha, f"domain classifier AUC {auc:.3f} ({folds}-fold)")


def embedding_test(method: str, reference: np.ndarray, current: np.ndarray, alpha: float, permutations: int,
                   seed: int = 0) -> ShiftTest:
    if reference.ndim != 2 or current.ndim != 2 or reference.shape[1] != current.shape[1]:
        raise ValueError(f"embedding shapes differ: reference {reference.shape}, window {current.shape}")
    if method == "mmd":
        return mmd_test(reference, current, alpha, permutations, seed)
    if method == "classifier":
        return classifier_test(reference, current, alpha, seed=seed)
    raise ValueError(f"embedding drift method '{method}': expected one of {METHODS}")


def bbsd_test(reference: np.ndarray, current: np.ndarray, classes: list[str], alpha: float) -> ShiftTest:
    """Per-class KS tests on softmax vectors (rows: samples, columns: `classes`), Bonferroni-corrected."""
    from scipy.stats import ks_2samp

    results = [ks_2samp(reference[:, k], current[:, k]) for k in range(len(classes))]
    worst = int(np.argmin([r.pvalue for r in results]))
    p_value = min(1.0, float(results[worst].pvalue) * len(classes))
    statistic = float(results[worst].statistic)
    return ShiftTest("bbsd", statistic, p_value, alpha,
                     f"largest KS {statistic:.3f} on p({classes[worst]}), Bonferroni over {len(classes)} classes")
