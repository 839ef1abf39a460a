import itertools
import math

import pytest

from spt_utils import stats


def test_rate_is_k_over_n_with_an_exact_interval_that_stays_open_at_zero():
    value = stats.rate([False] * 6)
    assert (value["k"], value["n"], value["value"], value["low"]) == (0, 6, 0.0, 0.0)
    # Clopper-Pearson upper bound for 0/6 at 95%: 1 - 0.025 ** (1/6)
    assert value["high"] == pytest.approx(1 - 0.025 ** (1 / 6), rel=1e-6)
    three = stats.rate([True] * 3 + [False] * 7)
    assert three["value"] == 0.3
    # Clopper-Pearson bounds by definition: P(X >= 3 | low) = P(X <= 3 | high) = 0.025
    assert 1 - _binomial_cdf(2, 10, three["low"]) == pytest.approx(0.025, abs=1e-6)
    assert _binomial_cdf(3, 10, three["high"]) == pytest.approx(0.025, abs=1e-6)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_empty_rate_is_nan_and_complement_swaps_the_interval():
    assert math.isnan(stats.rate([])["value"]) and stats.rate([])["n"] == 0
    value = stats.rate([True, False, False, False])
    flipped = stats.complement(value)
    assert flipped["value"] == 0.75 and flipped["k"] == 3
    assert (flipped["low"], flipped["high"]) == pytest.approx((1 - value["high"], 1 - value["low"]))


@pytest.mark.parametrize(("only_base", "only_other", "agree"), [(0, 9, 5), (3, 4, 10), (1, 12, 0)])
def test_mcnemar_is_the_doubled_binomial_tail_of_the_discordant_split(only_base, only_other,
                                                                      agree):
    base = [True] * only_base + [False] * only_other + [True] * agree
    other = [False] * only_base + [True] * only_other + [True] * agree
    result = stats.mcnemar(base, other)
    discordant = only_base + only_other
    expected = min(1.0, 2 * _binomial_cdf(min(only_base, only_other), discordant, 0.5))
    assert result["p"] == pytest.approx(expected, rel=1e-9)
    assert (result["only_base"], result["only_other"]) == (only_base, only_other)
    assert result["difference"] == pytest.approx((only_other - only_base) / len(base))


def test_mcnemar_without_disagreement_and_with_unpaired_lengths():
    assert stats.mcnemar([True, False], [True, False])["p"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        stats.mcnemar([True], [True, False])


def test_format_rate_shows_the_interval_and_n():
    assert stats.format_rate(stats.rate([True, False])).endswith("(1/2)")
    assert stats.format_rate(stats.rate([])) == "n/a (0)"


def test_spearman_against_the_textbook_formula():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    d2 = sum((a - b) ** 2 for a, b in zip([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], strict=True))
    assert stats.spearman(x, y)["rho"] == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))
    # ties share their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    tied = stats.spearman([0.0, 0.0, 1.0], [1.0, 2.0, 3.0])["rho"]
    assert tied == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert math.isnan(stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["rho"])
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        stats.spearman([1.0, 2.0, 3.0], [1.0, 2.0])


def test_a_permutation_check_its_sets_cannot_decide_is_undecided():
    # p = (1 + #as extreme) / (1 + n): 10 sets can reach 1/11 = 0.09 at best, 20 sets 1/21
    assert stats.permutation_check(1 / 11, 10) is None
    assert stats.permutation_check(1 / 21, 20) is True
    assert stats.permutation_check(2 / 21, 20) is False
    assert stats.permutation_check(None, 20) is None
    assert stats.permutation_check(1 / 20, 19) is None  # 0.05 is not below 0.05
    assert stats.verdict({"a": True, "b": True}) == "PASS"
    assert stats.verdict({"a": True, "b": None}) == "UNDECIDED"
    assert stats.verdict({"a": False, "b": None}) == "FAIL"


def test_smoothed_is_the_trailing_mean_of_up_to_window_values():
    assert stats.smoothed([4.0, 2.0, 6.0, 0.0], window=2) == [4.0, 3.0, 4.0, 3.0]
    assert stats.smoothed([3.0, 1.0], window=5) == [3.0, 2.0]  # fewer at the start
    assert stats.smoothed([], window=3) == []
    with pytest.raises(ValueError, match="window 0"):
        stats.smoothed([1.0], window=0)


def test_verdict_report_marks_each_check_and_ends_with_the_verdict():
    report = stats.verdict_report({"a holds": True, "b holds": None})
    assert report.splitlines() == ["PASS      a holds", "UNDECIDED b holds",
                                   "verdict: UNDECIDED"]
    assert stats.verdict_report({"a": True, "b": False}).endswith("verdict: FAIL")


@pytest.mark.parametrize(("hits", "drawn", "marked", "total"),
                         [(0, 3, 2, 7), (1, 3, 2, 7), (2, 3, 2, 7), (3, 3, 2, 7), (2, 4, 3, 9)])
def test_hypergeometric_tail_counts_every_draw(hits, drawn, marked, total):
    """By enumeration: the share of all ``drawn``-subsets holding at least ``hits`` of the
    first ``marked`` items."""
    subsets = list(itertools.combinations(range(total), drawn))
    expected = sum(sum(i < marked for i in s) >= hits for s in subsets) / len(subsets)
    assert stats.hypergeometric_tail(hits, drawn, marked, total) == pytest.approx(expected)
    with pytest.raises(ValueError, match="9 marked of 7"):
        stats.hypergeometric_tail(1, 3, 9, 7)


def test_mcnemar_check_is_undecided_where_no_split_reaches_alpha():
    # n = 5: all five pairs one way give p = 2 / 32 = 0.0625 >= 0.05, so no outcome decides
    assert stats.mcnemar_check(stats.mcnemar([True] * 5, [False] * 5), lower=True) is None
    six_lower = stats.mcnemar([True] * 6, [False] * 6)  # p = 2 / 64
    assert stats.mcnemar_check(six_lower, lower=True) is True
    assert stats.mcnemar_check(six_lower, lower=False) is None  # no base-false pair to rise
    both_ways = stats.mcnemar([True] * 6 + [False] * 6, [False] * 12)
    assert stats.mcnemar_check(both_ways, lower=False) is False  # significant, the other way
    tied = stats.mcnemar([True, False] * 6, [False, True] * 6)
    assert stats.mcnemar_check(tied, lower=True) is False


def test_mcnemar_check_counts_only_the_pairs_that_can_move_the_tested_way():
    """Base true on 3 of 30: at most 3 pairs can go lower (p >= 2 / 8 whatever happens), so
    "lower" is undecided though n = 30; 27 can go higher, so "higher" is decided."""
    base = [True] * 3 + [False] * 27
    test = stats.mcnemar(base, [False] * 30)
    assert test["base_true"] == 3 and test["p"] == pytest.approx(0.25)
    assert stats.mcnemar_check(test, lower=True) is None
    assert stats.mcnemar_check(stats.mcnemar(base, [True] * 30), lower=False) is True
    assert stats.mcnemar_check(stats.mcnemar(base, base), lower=False) is False


@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.25, 0.3])
def test_pairs_to_decide_is_the_first_k_whose_floor_is_below_alpha(alpha):
    k = next(k for k in range(1, 50) if 2 * 0.5 ** k < alpha)  # by counting up
    assert stats.pairs_to_decide(alpha) == k
    assert stats.mcnemar_floor(k) < alpha <= stats.mcnemar_floor(k - 1)
    assert stats.mcnemar_floor(0) == 1.0


def test_permutation_p_counts_ties_against_the_observed():
    assert stats.permutation_p(0, 10) == pytest.approx(1 / 11)  # none as good: the floor
    assert stats.permutation_p(3, 19) == pytest.approx(4 / 20)
    assert stats.permutation_p(20, 20) == 1.0
    assert stats.permutation_check(stats.permutation_p(0, 10), 10) is None  # 1/11 >= 0.05
    assert stats.permutation_check(stats.permutation_p(0, 20), 20) is True  # 1/21 < 0.05
    with pytest.raises(ValueError, match="11 of 10 random sets"):
        stats.permutation_p(11, 10)
