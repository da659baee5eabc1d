"""Verdicts on claims of the form "arm A beats arm B", from runs paired over seeds (METHODS.md §7).

Each seed trains every arm from the same data and initial weights, so the effect of a claim is the
mean over seeds of the paired difference d_s = metric(A, s) − metric(B, s), with a Student-t
interval over the seeds (the seed-to-seed variance is in it). Two one-sided tests decide, with
Holm's correction over the claims judged together:

- **holds**: H0 "effect ≤ 0" is rejected (the interval lies above 0);
- **fails**: H0 "effect ≥ margin" is rejected (an equivalence test: the interval lies below the
  margin δ, stated before the run; a tight null is a failure, a wide one is not);
- **inconclusive**: neither;
- **floor** / **ceiling**: every value of both arms is within ``edge`` of 0 (or of 1): nothing can
  differ there, so no verdict is weighed;
- **one seed**: no interval can be formed;
- **no spread**: every seed gave the same difference, so the t statistic is undefined (a 0 vs 0
  on a few points is not evidence of equivalence) and nothing is weighed.

Each test is one-sided at level α/2 (default α = 0.05), so with a single claim "holds" is exactly
"the two-sided 95% interval lies above 0".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from fastsat._stats import holm, t_cdf, t_quantile

__all__ = ["CLAIM_VERDICTS", "ClaimResult", "judge_claims", "paired_effect"]

CLAIM_VERDICTS = ("holds", "fails", "inconclusive", "floor", "ceiling", "one seed", "no spread")


@dataclass(frozen=True)
class ClaimResult:
    """One claim judged. values / references: the metric of the arm and of its reference per seed
    (paired by position); effect: mean paired difference; low, high: its two-sided (1 − α) t-interval;
    p_holds, p_fails: one-sided p-values of the two tests, and their Holm-adjusted values over the
    claims judged together; margin: δ of the fails test."""

    id: str
    claim: str
    arm: str
    reference: str
    values: tuple[float, ...]
    references: tuple[float, ...]
    effect: float
    low: float
    high: float
    p_holds: float
    p_fails: float
    p_holds_adjusted: float
    p_fails_adjusted: float
    margin: float
    verdict: str

    def row(self) -> dict:
        """The claim as one flat table row."""
        return {"id": self.id, "claim": self.claim, "effect": self.effect, "95% interval": f"[{self.low:+.3f}, {self.high:+.3f}]",
                "seeds": len(self.values), "p holds (Holm)": self.p_holds_adjusted, "p fails (Holm)": self.p_fails_adjusted,
                "verdict": self.verdict}


def paired_effect(values: Sequence[float], references: Sequence[float], *, margin: float,
                  alpha: float = 0.05) -> tuple[float, float, float, float, float]:
    """(effect, low, high, p_holds, p_fails) of paired values over seeds; the p-values are NaN where
    fewer than two seeds or a zero spread of the differences leave the tests undefined."""
    if len(values) != len(references):
        raise ValueError(f"values and references: expected one of each per seed, got {len(values)} and {len(references)}")
    diffs = [a - b for a, b in zip(values, references, strict=True)]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, math.nan
    effect = statistics.fmean(diffs)
    if n < 2:
        return effect, math.nan, math.nan, math.nan, math.nan
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        return effect, effect, effect, math.nan, math.nan
    half = t_quantile(1 - alpha / 2, n - 1) * se
    p_holds = 1 - t_cdf(effect / se, n - 1)
    p_fails = t_cdf((effect - margin) / se, n - 1)
    return effect, effect - half, effect + half, p_holds, p_fails


def judge_claims(claims: Sequence[tuple[str, str, str, str]], metric: dict[str, Sequence[float]], *,
                 margin: float, alpha: float = 0.05, edge: float = 0.005) -> list[ClaimResult]:
    """Judge ``claims`` together (one Holm family per test).

    Args:
        claims: (id, claim text, arm, reference) each.
        metric: arm name → its metric per seed (the same seed order for every arm), e.g. robust AUC.
        margin: δ of the fails test, in the metric's units, stated before any result.
        alpha: family-wise error rate of each test (default 0.05; one-sided tests at α/2).
        edge: how close to 0 or 1 every value must be for "floor" / "ceiling" (default 0.005).
    """
    effects = [paired_effect(metric[arm], metric[ref], margin=margin, alpha=alpha) for _, _, arm, ref in claims]
    edges = []
    for _, _, arm, ref in claims:
        both = [*metric[arm], *metric[ref]]
        edges.append("floor" if max(both) <= edge else "ceiling" if min(both) >= 1 - edge else None)
    # Floors, ceilings and single seeds are not tested, so they do not enlarge the Holm family.
    tested = [e[3] if edge_ is None else math.nan for e, edge_ in zip(effects, edges, strict=True)]
    holds_adj = holm(tested)
    fails_adj = holm([e[4] if edge_ is None else math.nan for e, edge_ in zip(effects, edges, strict=True)])
    out = []
    for (cid, text, arm, ref), (effect, low, high, p_h, p_f), edge_, ph_adj, pf_adj in zip(
            claims, effects, edges, holds_adj, fails_adj, strict=True):
        if edge_ is not None:
            verdict = edge_
        elif math.isnan(p_h):
            verdict = "one seed" if len(metric[arm]) < 2 else "no spread"
        elif ph_adj < alpha / 2:
            verdict = "holds"
        elif pf_adj < alpha / 2:
            verdict = "fails"
        else:
            verdict = "inconclusive"
        out.append(ClaimResult(cid, text, arm, ref, tuple(metric[arm]), tuple(metric[ref]), effect, low, high, p_h, p_f,
                               ph_adj, pf_adj, margin, verdict))
    return out
