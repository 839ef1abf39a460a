import json
import random

import pytest

from spt_utils import data, patching, tracking
from spt_utils.tracking import Condition


def _rho_without_ties(x: list[float], y: list[float]) -> float:
    """Spearman's rho by its textbook formula, 1 - 6 sum d^2 / (n (n^2 - 1)) (no ties)."""
    rank_x = {v: i for i, v in enumerate(sorted(x))}
    rank_y = {v: i for i, v in enumerate(sorted(y))}
    n = len(x)
    squared = sum((rank_x[a] - rank_y[b]) ** 2 for a, b in zip(x, y, strict=True))
    return 1 - 6 * squared / (n * (n * n - 1))


def _conditions(ordered: str, n: int = 12) -> list[Condition]:
    """``n`` conditions whose admitted count rises with the ``ordered`` metric's share left,
    the other metric's shares a seeded shuffle of it (no ties on either side)."""
    admitted = list(range(n))
    shuffled = [i + 0.5 for i in range(n)]
    random.Random(3).shuffle(shuffled)
    other = next(m for m in tracking.METRICS if m != ordered)
    return [Condition("knockout" if i % 2 else "tuned", f"c{i}", admitted[i], n,
                      {ordered: i / n, other: shuffled[i] / n}) for i in range(n)]


@pytest.mark.parametrize("ordered", tracking.METRICS)
def test_the_metric_that_ranks_conditions_as_the_judge_does_tracks_it(ordered):
    conditions = _conditions(ordered)
    result = tracking.tracking(conditions, n_boot=500)
    other = next(m for m in tracking.METRICS if m != ordered)
    admitted = [c.admitted / c.n for c in conditions]
    assert result["pooled"][ordered]["rho"] == pytest.approx(1.0)
    assert result["pooled"][other]["rho"] == pytest.approx(
        _rho_without_ties([c.left[other] for c in conditions], admitted))
    assert result["tracks"] == ordered
    sign = 1 if ordered == "sequence" else -1
    assert sign * result["pooled"]["difference"]["low"] > 0
    assert result["n_conditions"] == {"knockout": 6, "steering": 0, "tuned": 6}
    assert "steering" not in result and set(result) >= {"knockout", "tuned", "pooled"}


def test_metrics_that_agree_leave_the_choice_undecided():
    conditions = [Condition("tuned", f"c{i}", i, 8, {"first_token": i / 8, "sequence": i / 8})
                  for i in range(8)]
    result = tracking.tracking(conditions, n_boot=200)
    assert result["pooled"]["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert result["tracks"] is None
    assert "undecided" in tracking.report(conditions, result)


def test_tracking_needs_three_conditions():
    with pytest.raises(ValueError, match="2 conditions"):
        tracking.tracking(_conditions("sequence")[:2])


def test_effect_is_the_calibrations_reference_minus_counterfactual(tiny_model):
    pairs = data.build_patching_pairs(data.load_starter().select(range(3)),
                                      tiny_model.tokenizer, wording="matched")
    runs = patching.first_token_runs(pairs)
    calibration = patching.calibrate_runs(tiny_model, runs)
    assert tracking.effect(tiny_model, runs) == pytest.approx(
        calibration.reference - calibration.counterfactual, rel=1e-5)


def test_a_run_knocked_out_by_another_method_is_refused_by_file_and_field(tmp_path):
    (tmp_path / "knockout").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "x", "profile": None,
                                                        "seed": 0}))
    summary = tmp_path / "knockout" / "summary.json"
    summary.write_text(json.dumps({"method": "mean", "generation": []}))
    with pytest.raises(ValueError, match=rf"{summary}: field 'method' is 'mean'"):
        tracking.measure_run(tmp_path)


def test_a_run_without_its_knockout_summary_names_the_missing_file(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "x", "profile": None,
                                                        "seed": 0}))
    with pytest.raises(FileNotFoundError, match="knockout/summary.json: missing"):
        tracking.measure_run(tmp_path)
