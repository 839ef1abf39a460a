"""Intervals and paired tests for the rates the workbench reports.

Rates get exact (Clopper-Pearson) 95% intervals with their n, from TransformerLens's
``success_rate_ci``: unlike a percentile bootstrap, the interval stays honest at 0 or n
successes. Two methods measured on the same questions are compared by the exact McNemar
test on the questions where they disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformer_lens.utilities.statistics import success_rate_ci

Rate = dict[str, float]  # {"value", "low", "high", "k", "n"}


def rate(successes: Sequence[bool], *, confidence: float = 0.95) -> Rate:
    """k/n with an exact Clopper-Pearson interval; NaN (n = 0) for an empty sample."""
    return rate_of(sum(bool(s) for s in successes), len(successes), confidence=confidence)


def rate_of(k: int, n: int, *, confidence: float = 0.95) -> Rate:
    """:func:`rate` from the counts: k successes in n trials."""
    if n == 0:
        return {"value": math.nan, "low": math.nan, "high": math.nan, "k": 0, "n": 0}
    interval = success_rate_ci([True] * k + [False] * (n - k), confidence=confidence)
    return {"value": interval.point_estimate, "low": interval.ci_low, "high": interval.ci_high,
            "k": interval.n_successes, "n": interval.n_trials}


def complement(value: Rate) -> Rate:
    """1 − a rate, its interval's ends swapped (e.g. confidence = 1 − admitted rate)."""
    return {**value, "value": 1 - value["value"], "low": 1 - value["high"],
            "high": 1 - value["low"], "k": value["n"] - value["k"]}


def _binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (sum of the outcomes no
    more likely than k)."""
    if n == 0:
        return 1.0
    probabilities = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = probabilities[k]
    return min(1.0, sum(p for p in probabilities if p <= observed * (1 + 1e-9)))


def mcnemar(base: Sequence[bool], other: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test of two paired binary outcomes (the same questions, in order).

    ``only_base`` counts questions where only ``base`` is true, ``only_other`` where only
    ``other`` is, ``base_true`` where ``base`` is; the p-value is the two-sided binomial test
    of their split (1 when they never disagree). ``difference`` is rate(other) − rate(base).
    """
    if len(base) != len(other):
        raise ValueError(f"mcnemar: {len(base)} base outcomes but {len(other)} paired ones")
    only_base = sum(1 for b, o in zip(base, other, strict=True) if b and not o)
    only_other = sum(1 for b, o in zip(base, other, strict=True) if o and not b)
    n = len(base)
    return {
        "only_base": only_base, "only_other": only_other, "n": n, "base_true": sum(map(bool, base)),
        "difference": (only_other - only_base) / n if n else math.nan,
        "p": _binomial_two_sided(min(only_base, only_other), only_base + only_other),
    }


def format_rate(value: Rate | None) -> str:
    """``0.42 [0.33, 0.52] (21/50)``; "–" for a missing and "n/a (0)" for an empty rate."""
    if value is None:
        return "–"
    if value["n"] == 0:
        return "n/a (0)"
    return (f"{value['value']:.2f} [{value['low']:.2f}, {value['high']:.2f}] "
            f"({value['k']}/{value['n']})")


def permutation_p(as_extreme: int, n_sets: int) -> float:
    """The permutation p-value of an observed set against ``n_sets`` random ones, of which
    ``as_extreme`` did at least as well (ties count against the observed):
    ``(1 + as_extreme) / (1 + n_sets)``; its smallest value is ``1 / (1 + n_sets)``."""
    if not 0 <= as_extreme <= n_sets:
        raise ValueError(f"permutation_p: {as_extreme} of {n_sets} random sets")
    return (1 + as_extreme) / (1 + n_sets)


def permutation_check(p: float | None, n_sets: int, *, alpha: float = 0.05) -> bool | None:
    """Whether a permutation p-value over ``n_sets`` random sets, ``(1 + #{as extreme}) / (1 +
    n_sets)``, is below ``alpha``; None (undecided) where even the smallest p it can reach,
    ``1 / (1 + n_sets)``, is not: such a check cannot pass, whatever the heads do."""
    if p is None or 1 / (1 + n_sets) >= alpha:
        return None
    return p < alpha


def mcnemar_floor(k: int) -> float:
    """The smallest p an exact two-sided McNemar test reaches when at most ``k`` pairs can
    disagree: all ``k`` one way, 2 · 0.5^k (1 at k = 0)."""
    return min(1.0, 2 * 0.5 ** k)


def pairs_to_decide(alpha: float = 0.05) -> int:
    """The fewest pairs able to disagree for which :func:`mcnemar_floor` is below ``alpha``."""
    return math.floor(math.log2(2 / alpha)) + 1


def mcnemar_check(test: dict[str, float], *, lower: bool, alpha: float = 0.05) -> bool | None:
    """Whether a :func:`mcnemar` test shows the other outcome's rate lower (``lower``) or
    higher than base's at p < ``alpha``; None (undecided) where even every pair that can move
    that way doing so (base's true ones for lower, its false ones for higher) would not reach
    ``alpha`` (:func:`mcnemar_floor`)."""
    room = test["base_true"] if lower else test["n"] - test["base_true"]
    if mcnemar_floor(room) >= alpha:
        return None
    return test["p"] < alpha and (test["difference"] < 0 if lower else test["difference"] > 0)


def verdict(checks: dict[str, bool | None]) -> str:
    """"PASS" when every check passed, "FAIL" when one failed, else "UNDECIDED" (a check
    its sample cannot decide)."""
    if any(ok is False for ok in checks.values()):
        return "FAIL"
    return "PASS" if all(ok is True for ok in checks.values()) else "UNDECIDED"


VERDICT_MARKS = {True: "PASS", False: "FAIL", None: "UNDECIDED"}


def verdict_report(checks: dict[str, bool | None]) -> str:
    """Each check on its own line after its mark (PASS, FAIL or UNDECIDED), then the verdict
    (:func:`verdict`): a notebook's closing cell."""
    lines = [f"{VERDICT_MARKS[ok]:<9} {check}" for check, ok in checks.items()]
    return "\n".join([*lines, f"verdict: {verdict(checks)}"])


def hypergeometric_tail(hits: int, drawn: int, marked: int, total: int) -> float:
    """P(X >= ``hits``) for X the marked items among ``drawn`` of ``total`` items drawn
    without replacement, ``marked`` of them marked: the exact p that a ranking's top
    ``drawn`` holds at least ``hits`` planted heads by chance."""
    if not 0 <= marked <= total or not 0 <= drawn <= total:
        raise ValueError(f"hypergeometric_tail: {drawn} drawn and {marked} marked of {total}")
    ways = sum(math.comb(marked, k) * math.comb(total - marked, drawn - k)
               for k in range(max(hits, 0), min(drawn, marked) + 1))
    return ways / math.comb(total, drawn)


def smoothed(values: Sequence[float], window: int = 10) -> list[float]:
    """The trailing mean of each value and the ``window - 1`` before it (fewer at the
    start): a per-batch training loss read without one batch's noise."""
    if window < 1:
        raise ValueError(f"smoothed: window {window} is not a positive count")
    return [sum(values[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window))
            for i in range(len(values))]


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, tied values sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            ranks[order[position]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rank correlation (ties at their average rank) with its n; NaN when either
    side is constant or n < 3."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    n = len(x)
    rx, ry = _average_ranks(list(x)), _average_ranks(list(y))
    if n < 3 or len(set(rx)) < 2 or len(set(ry)) < 2:
        return {"rho": math.nan, "n": n}
    mx, my = sum(rx) / n, sum(ry) / n
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return {"rho": covariance / spread, "n": n}
