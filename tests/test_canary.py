"""Canary routing and the bake judgement (`mlops.deploy.canary`): pure, no server."""

from __future__ import annotations

from collections import Counter

import pytest

from mlops.deploy.canary import (
    ArmFigures, BakeBounds, Verdict, arms, bucket, compare_shadow, judge_bake, prediction_shift, routes_to_canary, sampled,
    shift_p_value,
)

BOUNDS = BakeBounds(min_requests=20, max_error_rate_increase=0.01, max_p95_ratio=1.5, max_prediction_shift=0.2,
                    max_accuracy_drop=0.05, min_labelled=10, alpha=0.01)


def arm(n: int, errors: int = 0, latency: float = 10.0, classes: str = "ab", correct: float | None = None) -> ArmFigures:
    figures = ArmFigures()
    for i in range(n):
        prediction = classes[i % len(classes)]
        record = {"status": "error"} if i < errors else {"status": "ok", "latency_ms": latency, "prediction": prediction}
        label = None if correct is None else (prediction if i < correct * n else "z")
        figures.add(record, label)
    return figures


def test_routing_keeps_its_share_and_is_sticky_as_the_share_grows():
    keys = [f"client-{i}" for i in range(4000)]
    at_5 = {k for k in keys if routes_to_canary(k, 0.05)}
    at_25 = {k for k in keys if routes_to_canary(k, 0.25)}
    assert 0.04 < len(at_5) / len(keys) < 0.06 and 0.23 < len(at_25) / len(keys) < 0.27
    assert at_5 <= at_25  # a client on the canary stays there
    assert not any(routes_to_canary(k, 0.0) for k in keys) and bucket("x") == bucket("x")


def test_shadow_sampling_is_independent_of_routing():
    keys = [f"r{i}" for i in range(4000)]
    both = sum(routes_to_canary(k, 0.5) and sampled(k, 0.5) for k in keys) / len(keys)
    assert 0.22 < both < 0.28


def test_prediction_shift_is_total_variation():
    assert prediction_shift(Counter(a=5, b=5), Counter(a=50, b=50)) == 0.0
    assert prediction_shift(Counter(a=1), Counter(b=1)) == 1.0
    assert prediction_shift(Counter(a=3, b=1), Counter(a=1, b=1)) == pytest.approx(0.25)
    assert prediction_shift(Counter(), Counter(a=1)) == 0.0


def test_a_healthy_canary_is_promoted_once_baked():
    assert judge_bake(arm(100), arm(30), BOUNDS, baked=True, timed_out=False).verdict is Verdict.PROMOTE
    waiting = judge_bake(arm(100), arm(30), BOUNDS, baked=False, timed_out=False)
    assert waiting.verdict is Verdict.WAIT and waiting.reasons == ("the bake time",)


@pytest.mark.parametrize(("new", "breach"), [
    (arm(30, errors=3), "error rate"),
    (arm(30, latency=20.0), "p95 latency"),
    (arm(60, classes="aaaaaaab"), "prediction shift"),
    (arm(30, correct=0.5), "accuracy"),
])
def test_each_breach_rolls_back_before_the_bake_ends(new, breach):
    old = arm(100, correct=1.0) if breach == "accuracy" else arm(100)
    judged = judge_bake(old, new, BOUNDS, baked=False, timed_out=False)
    assert judged.verdict is Verdict.ROLLBACK and breach in judged.reasons[0]


def test_a_small_sample_shift_or_drop_by_chance_is_not_a_breach():
    # 20 answers over ten classes against 200: a total variation near 0.3 with nothing changed
    old = arm(200, classes="abcdefghij", correct=0.9)
    new = arm(20, classes="abcdefghij"[::-1][:7], correct=0.8)
    assert judge_bake(old, new, BOUNDS, baked=True, timed_out=False).verdict is Verdict.PROMOTE


def answers(counts: dict[int, int]) -> ArmFigures:
    figures = ArmFigures()
    for digit, n in counts.items():
        for _ in range(n):
            figures.add({"status": "ok", "latency_ms": 5.0, "prediction": str(digit)})
    return figures


# Two arms of the same version (digits drawn uniformly at random, seeded): a chi-square test
# says p = 0.006 for this split; a permutation test, p = 0.016.
CHAMPION = {0: 12, 1: 13, 2: 6, 3: 9, 4: 7, 5: 5, 6: 6, 7: 1, 8: 7, 9: 4}
CHANCE = {0: 4, 1: 1, 2: 4, 3: 3, 4: 4, 7: 4, 8: 2, 9: 8}
# ... and one whose permutation p is 0.0025: a breach at the bake's last look, not before.
SHIFTED = ({0: 4, 1: 11, 2: 2, 3: 6, 4: 9, 5: 9, 6: 7, 7: 8, 8: 5, 9: 9}, {0: 5, 1: 1, 2: 4, 3: 1, 5: 2, 6: 2, 7: 4, 8: 9, 9: 2})


def test_the_shift_p_value_is_a_permutation_test_exact_at_few_answers_per_class():
    from scipy.stats import chi2_contingency

    old, new = answers(CHAMPION), answers(CHANCE)
    table = [[old.predictions[str(d)] for d in range(10)], [new.predictions[str(d)] for d in range(10)]]
    assert chi2_contingency(table)[1] < 0.01 < shift_p_value(new.predictions, old.predictions) < 0.03
    assert judge_bake(old, new, BOUNDS, baked=True, timed_out=False).verdict is Verdict.PROMOTE
    assert shift_p_value(Counter(a=30), Counter(b=30)) < 1e-4  # nothing alike: the smallest p it gives
    assert shift_p_value(Counter(a=3, b=3), Counter(a=30, b=30)) == 1.0
    assert shift_p_value(Counter(a=3), Counter(a=30)) == shift_p_value(Counter(), Counter(a=1)) == 1.0


def test_before_the_last_look_a_shift_must_be_ten_times_less_likely_by_chance():
    old, new = answers(SHIFTED[0]), answers(SHIFTED[1])
    assert 0.001 < shift_p_value(new.predictions, old.predictions) < 0.01
    assert judge_bake(old, new, BOUNDS, baked=False, timed_out=False).verdict is Verdict.WAIT
    judged = judge_bake(old, new, BOUNDS, baked=True, timed_out=False)
    assert judged.verdict is Verdict.ROLLBACK and judged.reasons[0].startswith("prediction shift 0.462 (max 0.2, p=0.00")


def test_too_little_traffic_waits_then_rolls_back_at_the_timeout():
    assert judge_bake(arm(100), arm(5), BOUNDS, baked=True, timed_out=False).verdict is Verdict.WAIT
    judged = judge_bake(arm(100), arm(5), BOUNDS, baked=True, timed_out=True)
    assert judged.verdict is Verdict.ROLLBACK and "20 requests (5 so far)" in judged.reasons[0]


def test_latency_and_shift_need_the_old_version_seen_too():
    assert judge_bake(arm(3), arm(30, latency=50.0), BOUNDS, baked=True, timed_out=False).verdict is Verdict.PROMOTE


def test_rejected_inputs_count_for_neither_version():
    figures = ArmFigures()
    figures.add({"status": "rejected", "error": "not_an_image"})
    assert figures.requests == 0


def test_arms_split_records_by_role_and_version():
    records = [
        {"request_id": "1", "role": "champion", "model_version": "1", "status": "ok", "latency_ms": 5.0, "prediction": "a"},
        {"request_id": "2", "role": "canary", "model_version": "2", "status": "ok", "latency_ms": 6.0, "prediction": "b"},
        {"request_id": "3", "model_version": "1", "status": "ok", "latency_ms": 5.0, "prediction": "a"},  # no role: champion
        {"request_id": "4", "role": "canary", "model_version": "9", "status": "ok", "latency_ms": 5.0, "prediction": "a"},
    ]
    found = arms(records, {"2": "a"}, {"champion": "1", "canary": "2"})
    assert found["champion"].requests == 2 and found["canary"].requests == 1
    assert found["canary"].accuracy == 0.0


def test_shadow_comparison_pairs_the_same_requests():
    records = []
    for i in range(10):
        records.append({"request_id": str(i), "role": "champion", "status": "ok", "prediction": "a", "confidence": 0.9,
                        "latency_ms": 4.0})
        if i < 8:
            records.append({"request_id": str(i), "role": "shadow", "status": "ok", "prediction": "a" if i < 6 else "b",
                            "confidence": 0.7, "latency_ms": 3.0})
    found = compare_shadow(records, {"0": "a", "7": "a"})
    assert found.pairs == 8 and found.agreement == pytest.approx(0.75)
    assert found.champion_confidence == pytest.approx(0.9) and found.shadow_confidence == pytest.approx(0.7)
    assert found.champion["accuracy"] == 1.0 and found.shadow["accuracy"] == 0.5
