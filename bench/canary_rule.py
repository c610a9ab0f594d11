"""How often a canary's prediction-shift rule rolls back a good version, and catches a bad one.

    python bench/canary_rule.py [--trials 300] [--seed 0]

Simulated bakes, no server: requests arrive at random (Poisson per poll), each answered with a
digit drawn uniformly; a step's share goes to the canary. The "same" canary answers like the
champion; the "shifted" one answers 3 for every 0, 1 and 2 (total variation 0.3, over the 0.2
bound). Each release is judged at every poll, as `flows/deploy.py::bake` does, by:
  - `judge_bake`: a permutation test of the shift, p < alpha / 10 before the last look of a
    step and p < alpha at it (Haybittle-Peto);
  - the rule it replaced: a chi-square test at p < alpha at every look.
Two settings: conf/deploy/local.yaml's (5% for 300 s, 25% for 600 s, a poll every 5 s, 50
requests at least, 10 requests/s) and tests/test_release_gates.py's (30% and 60% for 3 s, a
poll every 0.5 s, 15 requests, 40 requests/s). Printed: the share of releases rolled back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import chi2_contingency

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlops.deploy.canary import ArmFigures, BakeBounds, Verdict, judge_bake, prediction_shift  # noqa: E402
from table import print_table  # noqa: E402  bench/table.py

SETTINGS = {  # steps (share, bake_s), poll_s, min_requests, requests/s
    "production defaults": ([(0.05, 300), (0.25, 600)], 5.0, 50, 10.0),
    "the canary test": ([(0.3, 3), (0.6, 3)], 0.5, 15, 40.0),
}
ALPHA, MAX_SHIFT = 0.01, 0.2


def chi_square_at_every_look(old: ArmFigures, new: ArmFigures, bounds: BakeBounds, baked: bool) -> Verdict:
    if min(old.requests, new.requests) >= bounds.min_requests:
        classes = sorted(set(old.predictions) | set(new.predictions))
        table = [[old.predictions[c] for c in classes], [new.predictions[c] for c in classes]]
        if prediction_shift(new.predictions, old.predictions) > MAX_SHIFT and chi2_contingency(table)[1] < ALPHA:
            return Verdict.ROLLBACK
    return Verdict.PROMOTE if baked and new.requests >= bounds.min_requests else Verdict.WAIT


def new_rule(old: ArmFigures, new: ArmFigures, bounds: BakeBounds, baked: bool) -> Verdict:
    return judge_bake(old, new, bounds, baked=baked, timed_out=False).verdict


def release(rng: np.random.Generator, setting: tuple, shifted: bool, rule) -> bool:
    """Whether the release is rolled back at some step."""
    steps, poll_s, min_requests, rate = setting
    bounds = BakeBounds(min_requests, 1.0, 1e9, MAX_SHIFT, 1.0, 10**9, ALPHA)
    for share, bake_s in steps:
        old, new = ArmFigures(), ArmFigures()
        elapsed = 0.0
        while True:
            elapsed += poll_s
            digits = rng.integers(0, 10, rng.poisson(rate * poll_s))
            to_canary = rng.random(len(digits)) < share
            for digit, canary in zip(digits.tolist(), to_canary.tolist()):
                arm = new if canary else old
                answer = 3 if canary and shifted and digit < 3 else digit
                arm.requests += 1
                arm.latencies_ms.append(5.0)
                arm.predictions[str(answer)] += 1
            verdict = rule(old, new, bounds, elapsed >= bake_s)
            if verdict is Verdict.ROLLBACK:
                return True
            if verdict is Verdict.PROMOTE:
                break
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for name, setting in SETTINGS.items():
        for label, rule in (("chi-square at every look (before)", chi_square_at_every_look),
                            ("permutation, alpha/10 until the last look", new_rule)):
            rng = np.random.default_rng(args.seed)
            same = sum(release(rng, setting, False, rule) for _ in range(args.trials)) / args.trials
            caught = sum(release(rng, setting, True, rule) for _ in range(args.trials)) / args.trials
            rows.append([name, label, f"{same:.1%}", f"{caught:.1%}"])
    print(f"{args.trials} simulated releases per cell, alpha {ALPHA}, shift bound {MAX_SHIFT}")
    print_table(["setting", "rule", "same version rolled back", "shifted version rolled back"], rows)


if __name__ == "__main__":
    main()
