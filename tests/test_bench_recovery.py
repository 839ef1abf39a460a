"""The recovery benchmark's finding bars and metric tracking (``benchmarks/bench_recovery.py``),
on made-up results whose verdicts are known."""

from __future__ import annotations

import argparse

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_recovery")


def result(bench, kind: str, seed: int, *, auroc: float = 0.99, found: int = 8,
           set_admitted: int = 0, set_kept: int = 12, kept: int = 12) -> dict:
    """One organism's record, as much of it as the bars and the report read."""
    graded = {"auroc": auroc, "found": found, "precision_at_k": found / 8, "k": 8}
    sets = {"none": {"admitted": 16, "kept": kept, "first_token_left": 1.0,
                     "sequence_left": 1.0, "heads": []},
            bench.SET_METHOD: {"admitted": set_admitted, "kept": set_kept,
                               "first_token_left": 0.1, "sequence_left": 0.05,
                               "heads": [[1, 1]]}}
    return {"kind": kind, "seed": seed, "layers": [10, 30], "chosen_on": seed in bench.CHOSEN_ON,
            "n_generate": 16, "answer_tokens": {}, "per_head": [],
            "graded": {bench.DEFAULT: {"signed": graded, "absolute": graded}},
            "generation": {"counterfactual": {"admitted": 0, "kept": 16}, **sets}}


def verdicts(bench, results) -> list:
    return [v["passed"] for v in bench.bars(results)]


def test_the_bars_pass_on_results_that_meet_them_and_ignore_the_chosen_seed(bench):
    good = [result(bench, kind, seed) for kind in ("iit", "plain") for seed in (2, 3, 4)]
    chosen = [result(bench, "iit", 1, auroc=0.5, found=0), result(bench, "plain", 1,
                                                                   set_admitted=16)]
    assert verdicts(bench, good + chosen) == [True, True]
    assert verdicts(bench, chosen) == [None, None]


def test_a_variant_kind_gets_its_own_finding_bar(bench):
    """An interchange-trained variant (``iit-single``) is graded on its own unseen seeds,
    beside ``iit``'s bar, and fails on its own numbers."""
    results = [result(bench, "iit", seed) for seed in (2, 3, 4)]
    results += [result(bench, "iit-single", seed, found=5) for seed in (5, 6)]
    verdicts_by_bar = {v["bar"].split(":")[0]: v for v in bench.bars(results)}
    assert list(verdicts_by_bar) == ["iit", "iit-single", "plain"]
    assert verdicts_by_bar["iit"]["passed"] is True and verdicts_by_bar["plain"]["passed"] is None
    assert verdicts_by_bar["iit-single"]["passed"] is False
    assert verdicts_by_bar["iit-single"]["seeds"] == [5, 6]


@pytest.mark.parametrize(("change", "failed"), [
    ({"auroc": 0.80}, 0),  # mean AUROC (0.99 + 0.99 + 0.80) / 3 = 0.93 < 0.95
    ({"found": 3}, 0),  # mean (8 + 8 + 3) / 3 < 7 planted in the top 8
    ({"set_admitted": 11}, 1),  # mean admitted (0 + 0 + 11/16) / 3 > 0.2
    ({"set_kept": 9}, 1),  # fewer correct answers kept than the organism's
])
def test_each_bar_can_fail(bench, change, failed):
    kind = "iit" if failed == 0 else "plain"
    results = [result(bench, kind, seed, **(change if seed == 4 else {}))
               for seed in (2, 3, 4)]
    other = "plain" if kind == "iit" else "iit"
    results += [result(bench, other, seed) for seed in (2, 3, 4)]
    passed = verdicts(bench, results)
    assert passed[failed] is False and passed[1 - failed] is True


def test_the_report_shows_the_bars_and_the_tracking(bench):
    report = bench.report([result(bench, kind, seed) for kind in ("iit", "plain")
                           for seed in (1, 2)])
    assert "| FAIL |" not in report and report.count("| PASS |") == 2
    assert "## Which metric tracks the judged behaviour" in report


def test_the_report_names_idle_planted_heads_and_what_the_default_holds_of_the_rest(bench):
    record = result(bench, "iit", 2)
    shares = [(0.30, 0.25, 0.35, False), (0.00, -0.02, 0.01, True)]
    record["planted"] = [[11, 5], [20, 2]]
    record["per_head"] = [{"head": head, "reverted_first_token_share": 0.5,
                           "reverted_sequence_share": 0.5, "ranks": {bench.DEFAULT: rank},
                           "interchanged": dict(zip(("removed", "low", "high", "idle"), share,
                                                    strict=True))}
                          for head, rank, share in zip(record["planted"], (3, 90), shares,
                                                       strict=True)]
    record |= {"n_active": 1, "active_in_top": {bench.DEFAULT: 1}}
    report = bench.report([record])
    assert "| L11H5 | 0.50 | 0.50 | 0.30 [0.25, 0.35] | 3 |" in report
    assert "| L20H2 | 0.50 | 0.50 | 0.00 [-0.02, 0.01] (idle) | 90 |" in report
    assert "Planted heads not idle: 1 of 2; the default's top 8 holds 1 of them." in report
    assert "0.99, 8/8 (not idle: 1 of 1)" in report
    # an earlier run's record, without the interchange of each head, still reports
    del record["n_active"], record["per_head"][0]["interchanged"]
    assert "| L11H5 | 0.50 | 0.50 | not measured | 3 |" in bench.report([record])


def test_a_named_head_set_is_read_and_a_malformed_one_is_refused(bench):
    assert bench.head_set("readers=L3H7,L14H0") == ("readers", [(3, 7), (14, 0)])
    for bad in ("L3H7,L14H0", "readers=", "readers=L3H7;L14H0", "readers=L3H"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--sets '{bad}': expected"):
            bench.head_set(bad)
