"""The sweep's choice of settings on the dev split (``benchmarks/sweep_tuning.py``)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def sweep_script(load_benchmark):
    return load_benchmark("sweep_tuning")


def row(name: str, method: str, rate: float, kl: float, general_p: float = 1.0,
        general_difference: float = 0.0, label: str = "") -> dict:
    return {"name": name, "method": method, "label": label, "c_to_i": {"value": rate},
            "kl": {"value": kl},
            "paired": {"general": {"p": general_p, "difference": general_difference}}}


def test_the_lowest_rate_wins_when_none_reaches_sft(sweep_script):
    rows = [row("a", "spt", 0.40, 0.01), row("b", "spt", 0.30, 0.05),
            row("c", "spt", 0.30, 0.02), row("sft", "sft", 0.10, 0.2)]
    chosen, matched = sweep_script.choose(rows, slack=0.05, target="c_to_i")
    assert (chosen["name"], matched["name"]) == ("c", "sft")  # tie on rate: lower KL


def test_the_lowest_kl_within_reach_of_sft_wins(sweep_script):
    rows = [row("a", "spt", 0.12, 0.01), row("b", "spt", 0.10, 0.05),
            row("r", "spt", 0.0, 0.0, label="random 0"), row("sft", "sft", 0.10, 0.2)]
    chosen, _ = sweep_script.choose(rows, slack=0.05, target="c_to_i")
    assert chosen["name"] == "a"  # the random draw is never chosen


def test_a_setting_that_loses_general_ability_is_passed_over(sweep_script):
    rows = [row("broken", "spt", 0.10, 0.1, general_p=0.001, general_difference=-0.4),
            row("better", "spt", 0.10, 0.2, general_p=0.001, general_difference=+0.1),
            row("kept", "spt", 0.40, 0.02, general_p=0.2, general_difference=-0.1),
            row("sft", "sft", 0.25, 0.3)]
    chosen, _ = sweep_script.choose(rows, slack=0.05, target="c_to_i")
    assert chosen["name"] == "better"  # a significant gain in general ability is fine
    rows = [r for r in rows if r["name"] != "better"]
    assert sweep_script.choose(rows, slack=0.05, target="c_to_i")[0]["name"] == "kept"
    only_broken = [rows[0], rows[-1]]  # none keeps it: the rule falls back to all
    assert sweep_script.choose(only_broken, slack=0.05, target="c_to_i")[0]["name"] == "broken"


def test_the_settings_passed_over_are_the_top_head_spt_ones_that_lose_general(sweep_script):
    lose = {"general_p": 0.001, "general_difference": -0.4}
    rows = [row("broken", "spt", 0.10, 0.1, **lose), row("kept", "spt", 0.40, 0.02),
            row("random", "spt", 0.10, 0.1, label="random 0", **lose),
            row("sft", "sft", 0.10, 0.3, **lose)]
    assert [r["name"] for r in sweep_script.lost_general(rows)] == ["broken"]


def test_base_records_cached_before_finals_were_read_in_context_are_measured_again(
        sweep_script, tmp_path, monkeypatch):
    base_file = tmp_path / "base_records.json"
    base_file.write_text(json.dumps({"ids": ["q"], "n_tokens": 8, "records": [{"id": "q"}],
                                     "general": [True]}))
    fresh = [{"id": "q", "final_kind": "reaffirmed"}]
    monkeypatch.setattr(sweep_script.Measure, "records", lambda self, model: fresh)
    monkeypatch.setattr(sweep_script.Measure, "general", lambda self, model: [False])

    def measure():
        return sweep_script.Measure(None, None, [{"id": "q"}], {}, "free_form", [], 8,
                                    base_file)

    assert (measure().base_records, measure().base_general) == (fresh, [False])
    # a cache whose records carry final_kind is read, not measured again
    monkeypatch.setattr(sweep_script.Measure, "records",
                        lambda self, model: pytest.fail("base measured again"))
    assert measure().base_records == fresh
