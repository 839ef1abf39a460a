"""The shared publication template: the Pareto figure, the interval bars and the knockout
sweep."""

from __future__ import annotations

import pytest

from spt_utils import viz


def _point(value, low, high):
    return {"value": value, "low": low, "high": high}


def _row(group, name, kl, admitted):
    return {"group": group, "name": name, "kl": _point(*kl), "admitted": _point(*admitted)}


def test_pareto_figure_marks_intervals_groups_and_the_front():
    rows = [_row("spt", "a", (0.1, 0.05, 0.2), (0.5, 0.4, 0.6)),
            _row("spt", "b", (0.3, 0.2, 0.4), (0.2, 0.1, 0.3)),
            _row("sft", "c", (0.4, 0.3, 0.5), (0.6, 0.5, 0.7))]
    fig = viz.pareto_figure(rows)
    spt, sft, front = fig.data
    assert (spt.name, sft.name, front.name) == ("spt", "sft", "front")
    assert list(spt.error_x.array) == pytest.approx([0.1, 0.1])
    assert list(spt.error_x.arrayminus) == pytest.approx([0.05, 0.1])
    assert list(spt.error_y.arrayminus) == pytest.approx([0.1, 0.1])
    # c is beaten by b on both axes: the front is a then b
    assert list(front.x) == [0.1, 0.3] and list(front.y) == [0.5, 0.2]
    assert fig.layout.font.family == viz.FONT["family"]


def test_pareto_figure_draws_base_as_a_labelled_line():
    rows = [_row("spt", "a", (0.1, 0.05, 0.2), (0.5, 0.4, 0.6))]
    assert [trace.name for trace in viz.pareto_figure(rows).data] == ["spt", "front"]
    fig = viz.pareto_figure(rows, base=_point(0.28, 0.15, 0.44))
    line = fig.data[-1]
    assert line.name == "base 0.28 [0.15, 0.44]"
    assert list(line.y) == [0.28, 0.28] and list(line.x) == [0.05, 0.2]  # the rows' KL span


def test_sweep_figure_shows_the_eval_split_once_measured_with_base_as_its_line():
    def split(kl):
        return [{"method": "base", "group": "base", "name": "base", "kl": _point(0, 0, 0),
                 "target": _point(0.3, 0.2, 0.4)},
                {"method": "spt", "group": "spt", "name": "spt", "kl": _point(kl, kl / 2, kl * 2),
                 "target": _point(0.1, 0.0, 0.2)}]
    sweep = {"dev": split(0.01)}
    fig = viz.sweep_pareto_figure(sweep, yaxis_title="rate")
    assert [t.name for t in fig.data] == ["spt", "front", "base 0.30 [0.20, 0.40]"]
    assert list(fig.data[0].x) == [0.01] and "dev split" in fig.layout.title.text
    sweep["eval"] = split(0.2)
    fig = viz.sweep_pareto_figure(sweep, yaxis_title="rate")
    assert list(fig.data[0].x) == [0.2] and "eval split" in fig.layout.title.text
    sweep["model"] = "smollm2-135m-instruct"  # a sweep that records its model names it
    assert "Sweep of smollm2-135m-instruct on the eval split" in viz.sweep_pareto_figure(
        sweep, yaxis_title="rate").layout.title.text


def test_interval_bars_leave_out_missing_metrics():
    rows = {"base": {"admitted": _point(0.5, 0.3, 0.7)},
            "spt": {"admitted": _point(0.2, 0.1, 0.4), "corrected": _point(0.1, 0.0, 0.3)}}
    fig = viz.interval_bars(rows, [("admitted", "admitted"), ("corrected", "corrected")])
    assert list(fig.data[0].x) == ["admitted"]
    assert list(fig.data[1].x) == ["admitted", "corrected"]
    assert list(fig.data[1].error_y.array) == pytest.approx([0.2, 0.2])


def test_knockout_sweep_figure_draws_both_panels_with_titles_and_legend_in_the_frame():
    by_k = [{"k": k, "top": {"remaining": r, "low": r - 0.2, "high": r + 0.1}, "bottom": 1.1,
             "random": _point(0.9, 0.7, 1.2), "layer_matched": None}
            for k, r in ((1, 0.5), (2, 0.2))]
    generation = [{"k": 0, "kind": "none", "admitted": {**_point(0.1, 0.0, 0.3), "n": 10}},
                  {"k": 2, "kind": "top", "admitted": {**_point(0.4, 0.2, 0.6), "n": 10}}]
    fig = viz.knockout_sweep_figure({"method": "mean", "n_pairs": 8, "by_k": by_k}, generation)
    assert [t.name for t in fig.data] == ["random sets, middle 95%", "top-k", "bottom-k",
                                          "none (generation)", "top (generation)"]
    assert list(fig.data[1].error_y.arrayminus) == pytest.approx([0.2, 0.2])
    assert fig.data[-1].xaxis == "x2" and list(fig.data[-1].y) == [0.4]
    # each panel's title in two short lines, the legend under the panels
    assert all("<br>" in a.text for a in fig.layout.annotations)
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0
    assert fig.layout.font.family == viz.FONT["family"]
    assert len(viz.knockout_sweep_figure({"method": "zero", "n_pairs": 8, "by_k": by_k})
               .layout.annotations) == 1
    # each panel names its n and labels its axes; the k swept are the only ticks
    assert "8 held-out pairs" in fig.layout.annotations[0].text
    assert "10 held-out questions" in fig.layout.annotations[1].text
    assert "random sets" not in fig.layout.annotations[1].text  # none judged on fewer
    assert fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text
    assert list(fig.layout.xaxis.tickvals) == [1, 2] and fig.layout.xaxis2.type == "category"


def test_one_k_draws_its_random_sets_as_a_box_and_the_planted_heads_beside_the_top():
    """The lean default sweeps k = 8 alone: the random sets' middle 95% is a box around it
    (a band of no width would draw nothing), and generation's kinds are categories."""
    by_k = [{"k": 8, "top": {"remaining": 0.2, "low": 0.1, "high": 0.3}, "bottom": 1.0,
             "random": _point(0.9, 0.6, 1.3), "layer_matched": None}]
    generation = [{"k": 8, "kind": kind, "admitted": {**_point(0.5, 0.3, 0.7), "n": n}}
                  for kind, n in (("top", 10), ("random", 4), ("planted", 10))]
    fig = viz.knockout_sweep_figure({"method": "mean", "n_pairs": 8, "by_k": by_k}, generation)
    # random sets judged on the first 4 of the 10 questions: the title names both
    assert "10 held-out questions" in fig.layout.annotations[1].text
    assert "random sets: first 4" in fig.layout.annotations[1].text
    band = fig.data[0]
    assert list(band.x) == pytest.approx([7.7, 8.3, 8.3, 7.7])
    assert list(band.y) == pytest.approx([1.3, 1.3, 0.6, 0.6])
    points = {t.name: t.x[0] for t in fig.data if t.name.endswith("(generation)")}
    assert points == {"top (generation)": "top 8", "random (generation)": "random 8",
                      "planted (generation)": "planted 8"}
    assert list(fig.layout.xaxis.range) == pytest.approx([7.4, 8.6])
