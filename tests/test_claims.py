"""The statistics behind the verdicts (fastsat._stats) and the paired-claim rule (fastsat.report.claims),
checked against closed forms and hand-computed cases."""

import math
import random
import statistics

import pytest

from fastsat._stats import binomial_lower_bound, holm, t_cdf, t_quantile
from fastsat.report.claims import judge_claims, paired_effect


@pytest.mark.parametrize("t", [-7.5, -1.3, -0.2, 0.0, 0.4, 2.0, 31.0])
def test_t_cdf_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)  # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-14)


def test_t_cdf_tends_to_the_normal_and_is_a_distribution():
    normal = statistics.NormalDist()
    for t in (-2.0, -0.5, 1.0, 1.96):
        assert t_cdf(t, 400) == pytest.approx(normal.cdf(t), abs=2e-3)
    for df in (3, 4, 7, 10):
        values = [t_cdf(t / 4, df) for t in range(-40, 41)]
        assert values == sorted(values) and 0 < values[0] < 0.01 and values[-1] > 0.99
        assert t_cdf(-1.1, df) == pytest.approx(1 - t_cdf(1.1, df), abs=1e-14)


@pytest.mark.parametrize("p, df, expected", [(0.975, 4, 2.776445105), (0.975, 9, 2.262157163), (0.95, 1, 6.313751515),
                                             (0.995, 3, 5.840909310), (0.025, 4, -2.776445105)])
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-8)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_holm_adjusts_step_down_and_keeps_the_order():
    # Sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 0.02, 0.03, 0.06, then max(0.06, 0.04) = 0.06.
    assert holm([0.01, 0.04, 0.03, math.nan, 0.005]) == pytest.approx([0.03, 0.06, 0.06, math.nan, 0.02], nan_ok=True)
    assert holm([0.2]) == [0.2] and holm([0.6, 0.7]) == [1.0, 1.0]


def test_the_binomial_lower_bound_is_clopper_pearson():
    assert binomial_lower_bound(0, 20) == 0.0
    for n in (1, 5, 40):  # all successes: P(X = n | p) = p^n = alpha
        assert binomial_lower_bound(n, n) == pytest.approx(0.05 ** (1 / n), abs=1e-12)
    assert binomial_lower_bound(1, 20) == pytest.approx(1 - 0.95 ** (1 / 20), abs=1e-12)  # P(X >= 1) = 1 − (1−p)^n
    assert binomial_lower_bound(1, 20) < 0.01 < binomial_lower_bound(3, 20)  # one odd point of 20 raises no flag


def test_paired_effect_is_the_mean_difference_with_a_t_interval():
    a, b = [0.52, 0.55, 0.49, 0.58, 0.51], [0.50, 0.50, 0.50, 0.50, 0.50]
    effect, low, high, p_holds, p_fails = paired_effect(a, b, margin=0.02)
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(5)
    assert effect == pytest.approx(statistics.fmean(diffs))
    assert (low, high) == pytest.approx((effect - 2.776445105 * se, effect + 2.776445105 * se))
    assert p_holds == pytest.approx(1 - t_cdf(effect / se, 4)) and p_fails == pytest.approx(t_cdf((effect - 0.02) / se, 4))
    assert math.isnan(paired_effect([0.3], [0.2], margin=0.02)[1]), "one seed: no interval"
    with pytest.raises(ValueError, match="values and references"):
        paired_effect([0.1, 0.2], [0.1], margin=0.02)


def _claims(metric):
    return judge_claims([(name, name, name, "ref") for name in metric if name != "ref"], metric, margin=0.02)


def test_the_verdicts_holds_fails_inconclusive_floor_and_one_seed():
    ref = [0.40, 0.42, 0.38, 0.41, 0.39]
    result = {c.id: c.verdict for c in _claims({
        "ref": ref,
        "better": [r + d for r, d in zip(ref, (0.10, 0.12, 0.09, 0.11, 0.10))],
        "same": [r + d for r, d in zip(ref, (0.001, -0.002, 0.0, 0.002, -0.001))],  # a tight null: fails
        "noisy": [r + d for r, d in zip(ref, (0.15, -0.12, 0.08, -0.10, 0.02))],  # a wide null: inconclusive
    })}
    assert result == {"better": "holds", "same": "fails", "noisy": "inconclusive"}
    floor = judge_claims([("f", "f", "a", "b")], {"a": [0.0, 0.001, 0.0], "b": [0.0, 0.0, 0.0]}, margin=0.02)[0]
    assert floor.verdict == "floor", "0 vs 0 is not weighed"
    ceiling = judge_claims([("c", "c", "a", "b")], {"a": [1.0, 1.0], "b": [0.999, 1.0]}, margin=0.02)[0]
    assert ceiling.verdict == "ceiling"
    assert judge_claims([("o", "o", "a", "b")], {"a": [0.5], "b": [0.3]}, margin=0.02)[0].verdict == "one seed"
    same = judge_claims([("s", "s", "a", "b")], {"a": [0.25, 0.5, 0.3], "b": [0.25, 0.5, 0.3]}, margin=0.02)[0]
    assert same.verdict == "no spread" and same.effect == 0, "identical runs are not evidence of equivalence"


def test_holm_turns_a_marginal_win_among_many_claims_inconclusive():
    rng = random.Random(0)
    ref = [0.5 + rng.uniform(-0.01, 0.01) for _ in range(5)]
    marginal = [r + d for r, d in zip(ref, (0.030, 0.005, 0.040, 0.012, 0.020))]
    alone = judge_claims([("m", "m", "m", "ref")], {"m": marginal, "ref": ref}, margin=0.02)[0]
    assert alone.verdict == "holds" and alone.p_holds_adjusted == alone.p_holds
    nulls = {f"n{i}": [r + rng.uniform(-0.05, 0.05) for r in ref] for i in range(9)}
    judged = {c.id: c for c in _claims({"ref": ref, "m": marginal, **nulls})}
    assert judged["m"].p_holds == pytest.approx(alone.p_holds)
    assert judged["m"].p_holds_adjusted > judged["m"].p_holds
    assert judged["m"].verdict == "inconclusive", "ten claims: the same evidence no longer clears the corrected level"
