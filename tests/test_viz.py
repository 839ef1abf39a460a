import json
import struct
import time
import types
import warnings

import kaleido
import pytest
import torch

from spt_utils import data, patching, viz

SCORE = torch.tensor([[0.5, -0.9, 0.0], [0.1, 0.3, -0.2]])


def click(selector, layer, head, trace=0):
    """What plotly's front end sends for a click on a heatmap cell (x = head, y = layer)."""
    points = types.SimpleNamespace(xs=[head], ys=[layer], point_inds=[[layer, head]])
    selector.on_click(selector.figure.data[trace], points, None)


def markers(selector):
    data_ = selector.figure.data[1]
    return sorted(zip(data_.y, data_.x, strict=True))


def test_selector_saves_the_top_k_default_without_a_front_end(tmp_path):
    path = tmp_path / "heads.json"
    selector = viz.HeadSelector(SCORE, path, top_k=2, sign="positive", extra={"method": "path"})
    assert selector.selection == [(0, 0), (1, 1)]
    record = json.loads(path.read_text())
    assert record["heads"] == [[0, 0], [1, 1]] and record["method"] == "path"
    assert record["scores"] == [0.5, 0.3]
    assert patching.load_heads(path) == [(0, 0), (1, 1)]
    assert markers(selector) == [(0, 0), (1, 1)]


def test_click_toggles_a_head_and_saves(tmp_path):
    path = tmp_path / "heads.json"
    selector = viz.HeadSelector(SCORE, path, top_k=1)
    click(selector, 1, 2)
    assert selector.selection == [(0, 0), (1, 2)]
    assert markers(selector) == [(0, 0), (1, 2)]
    assert patching.load_heads(path) == [(0, 0), (1, 2)]
    click(selector, 0, 0, trace=1)  # a click on the marker itself
    assert patching.load_heads(path) == [(1, 2)]
    assert "L1H2" in selector.label.value
    with pytest.raises(ValueError, match="out of range"):
        selector.toggle(2, 0)


def test_slider_and_sign_filter_preselect(tmp_path):
    selector = viz.HeadSelector(SCORE, tmp_path / "heads.json", top_k=1)
    selector.sign_filter.value = "negative"
    assert selector.selection == [(0, 1)]
    selector.top_k_slider.value = 3
    assert selector.selection == [(0, 1), (1, 2)]  # only two negative heads
    selector.sign_filter.value = "both"
    assert selector.selection == [(0, 1), (0, 0), (1, 1)]
    assert patching.load_heads(tmp_path / "heads.json") == selector.selection
    with pytest.raises(ValueError, match="sign"):
        viz.HeadSelector(SCORE, tmp_path / "x.json", sign="up")


def test_heatmap_is_centred_with_hover_and_ranks(tmp_path):
    fig = viz.head_heatmap(SCORE, metric_name="calibrated score", selected=[(1, 1)])
    heatmap = fig.data[0]
    assert heatmap.zmid == 0 and "rank" in heatmap.hovertemplate
    # SCORE spans -0.9 … 0.5: the colour range is symmetric about 0, both ends used
    assert (heatmap.zmin, heatmap.zmax) == pytest.approx((-0.9, 0.9))
    assert [(t.name, t.showlegend) for t in fig.data[1:]] == [("selected", True)]
    ranks = viz.head_heatmap(SCORE.abs() + 1, metric_name="rank score",
                             outlined=[(0, 0)])  # one sign: a sequential scale
    assert ranks.data[0].zmid is None and ranks.data[0].zmin is None
    assert ranks.data[0].colorscale != heatmap.colorscale
    assert [(t.name, t.showlegend) for t in ranks.data[1:]] == [
        ("selected", False), ("planted (ground truth)", True)]
    assert heatmap.customdata[0][0] == [1] and heatmap.customdata[0][1] == [6]
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert heatmap.colorbar.title.text == "calibrated score"
    widget = viz.HeadSelector(SCORE, tmp_path / "h.json").widget()
    assert viz.SELECTOR_CLASS in widget._dom_classes


def test_hover_shows_the_interval_and_top_k_takes_only_heads_whose_interval_excludes_zero(
    tmp_path,
):
    # SCORE = [[0.5, -0.9, 0.0], [0.1, 0.3, -0.2]]; (0, 1)'s interval holds 0
    low = torch.tensor([[0.25, -1.5, -0.1], [0.05, 0.125, -0.5]])
    high = torch.tensor([[0.75, 0.25, 0.1], [0.5, 0.5, -0.125]])
    same_sign = torch.tensor([[1.0, 0.5, 0.5], [0.75, 1.0, 0.75]])
    uncertainty = patching.HeadUncertainty(low=low, high=high, same_sign=same_sign, n_pairs=4)
    fig = viz.head_heatmap(SCORE, metric_name="score", uncertainty=uncertainty)
    assert "95% CI" in fig.data[0].hovertemplate and "of 4 pairs" in fig.data[0].hovertemplate
    assert fig.data[0].customdata[1][1][1:] == [0.125, 0.5, 1.0]
    selector = viz.HeadSelector(SCORE, tmp_path / "h.json", top_k=4, sign="both",
                                uncertainty=uncertainty)
    # |score| order: (0,1) 0.9, (0,0) 0.5, (1,1) 0.3, (1,2) 0.2, (1,0) 0.1; (0,2) = 0 and
    # (0,1) have intervals holding 0
    assert selector.selection == [(0, 0), (1, 1), (1, 2), (1, 0)]
    assert "4 of 6 heads" in selector.label.value
    selector.toggle(0, 1)  # a click still adds it
    assert (0, 1) in selector.selection


def test_export_writes_html_only_with_one_warning_when_static_export_fails(
    tmp_path, monkeypatch
):
    fig = viz.head_heatmap(SCORE, metric_name="score")

    def no_browser(*args, **kwargs):
        raise RuntimeError("no chromium")

    monkeypatch.setattr(kaleido, "Kaleido", no_browser)
    monkeypatch.setattr(viz.export, "_session", viz.KaleidoSession())
    monkeypatch.setattr(viz.export, "_static_export_warned", False)
    loops = spy_on_event_loops(monkeypatch)
    with pytest.warns(RuntimeWarning, match="HTML only"):
        written = viz.export_figure(fig, tmp_path, "heatmap")
    assert len(loops) == 1 and loops[0].is_closed()  # no unclosed loop left (ResourceWarning)
    assert [p.name for p in written] == ["heatmap.html"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        viz.export_figure(fig, tmp_path, "again")  # no second warning
    assert (tmp_path / "again.html").exists()
    assert viz.export._session.launches == 1  # a missing browser is not looked for again


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24)."""
    return struct.unpack(">II", path.read_bytes()[16:24])


def spy_on_event_loops(monkeypatch) -> list:
    """The event loops the export module opens from now on (the list fills as they open)."""
    loops, new_event_loop = [], viz.export.asyncio.new_event_loop

    def recorded():
        loops.append(new_event_loop())
        return loops[-1]

    monkeypatch.setattr(viz.export.asyncio, "new_event_loop", recorded)
    return loops


def test_export_writes_all_formats_from_one_browser(tmp_path, monkeypatch):
    session = viz.KaleidoSession()
    monkeypatch.setattr(viz.export, "_session", session)
    loops = spy_on_event_loops(monkeypatch)
    heatmap = viz.head_heatmap(SCORE, metric_name="score")
    written = viz.export_figure(heatmap, tmp_path, "h", scale=2.0)
    assert sorted(p.suffix for p in written) == [".html", ".pdf", ".png", ".svg"]
    assert (tmp_path / "h.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "h.svg").read_text().startswith("<svg")
    assert png_size(tmp_path / "h.png") == (2 * heatmap.layout.width, 2 * heatmap.layout.height)
    curves = viz.loss_curves({"spt": {"losses": [2.0, 1.0]}})
    viz.export_figure(curves, tmp_path, "curves", scale=1.0)
    assert all((tmp_path / f"curves.{fmt}").stat().st_size > 0 for fmt in viz.STATIC_FORMATS)
    assert session.launches == 1  # six images, one browser
    assert not loops[0].is_closed()
    session.close()
    assert loops[0].is_closed()  # closing the session closes its loop (no ResourceWarning)


def test_export_is_byte_identical_for_the_same_figure(tmp_path, monkeypatch):
    """Two exports of one figure, a second apart (chromium dates its PDFs to the second;
    plotly draws random ids into SVG and HTML), give the same bytes in every format."""
    monkeypatch.setattr(viz.export, "_session", session := viz.KaleidoSession())
    heatmap = viz.head_heatmap(SCORE, metric_name="score", selected=[(0, 1)])
    first = viz.export_figure(heatmap, tmp_path / "a", "h", scale=1.0)
    time.sleep(1.1)
    second = viz.export_figure(heatmap, tmp_path / "b", "h", scale=1.0)
    assert len(first) == 4
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    session.close()
    # the fix keeps a PDF's length (its cross-reference offsets) and names no date
    pdf = b"%PDF /CreationDate (D:20261206134744+00'00')/ModDate (D:20261206134747Z)"
    fixed = viz.export.reproducible(pdf, "pdf")
    assert len(fixed) == len(pdf) and b"2026" not in fixed
    svg = b'<svg><defs id="defs-7fd618"/><clipPath id="clip7fd618x"/></svg>'
    assert viz.export.reproducible(svg, "svg") == svg.replace(b"7fd618", b"000000")


def test_attention_patterns_render_offline(tmp_path, tiny_model):
    pairs = data.build_patching_pairs(data.load_starter().select(range(1)), tiny_model.tokenizer)
    tokens = pairs.reference[0, : int(pairs.reference_last[0]) + 1]
    html = viz.attention_patterns(tiny_model, tokens, [(1, 3), (0, 0)],
                                  html_path=tmp_path / "attn.html")
    assert "unpkg.com" not in html.data and "CircuitsVis.render" in html.data
    assert "L1H3" in html.data
    assert (tmp_path / "attn.html").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="out of range"):
        viz.attention_patterns(tiny_model, tokens, [(0, 9)])


def test_loss_curves_plot_every_trained_method_and_skip_few_shot():
    index = {
        "spt": {"kind": "spt", "losses": [2.0, 1.5, 1.2]},
        "sft": {"kind": "sft", "losses": [2.0, 1.0]},
        "few_shot": {"kind": "few_shot", "k": 4},
    }
    index["spt"]["evals"] = [{"step": 3, "heldout_loss": 1.4}]
    fig = viz.loss_curves(index, window=2)
    assert [trace.name for trace in fig.data] == [
        "spt (per batch)", "spt: training (mean of 2 batches)", "spt: held-out",
        "sft (per batch)", "sft: training (mean of 2 batches)"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [2.0, 1.5, 1.2]
    assert list(fig.data[1].y) == pytest.approx([2.0, 1.75, 1.35])  # trailing means of 2
    assert (list(fig.data[2].x), list(fig.data[2].y)) == ([3], [1.4])
    assert fig.data[1].line.color == fig.data[2].line.color != fig.data[4].line.color
    assert fig.layout.xaxis.title.text == "step"


def test_selector_preselects_only_the_given_eligible_heads_and_outlines_planted_ones(tmp_path):
    n_layers, n_heads = SCORE.shape
    eligible = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    eligible[1:] = True  # layer 0 may not be preselected
    best_outside_layer_0 = patching.top_heads(SCORE[1:], 2, "both")
    selector = viz.HeadSelector(SCORE, tmp_path / "h.json", top_k=2, sign="both",
                                eligible=eligible, outlined=[(0, 1)])
    assert selector.selection == [(layer + 1, head) for layer, head in best_outside_layer_0]
    planted = selector.figure.data[2]
    assert (list(planted.x), list(planted.y)) == ([1], [0])
    exported = selector.static_figure()
    assert (list(exported.data[2].x), list(exported.data[2].y)) == ([1], [0])
    assert len(viz.head_heatmap(SCORE, metric_name="s").data) == 2  # nothing outlined
    with pytest.raises(ValueError, match="eligible: shape"):
        viz.HeadSelector(SCORE, tmp_path / "h.json", eligible=eligible[1:])
