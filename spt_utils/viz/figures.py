"""The figures of the paper in one publication template (:func:`publication_figure`): the
Pareto plots, interval bars, training-loss curves and the knockout sweep of
:func:`spt_utils.ablation.sweep` (:func:`knockout_sweep_figure`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from spt_utils import stats
from spt_utils.viz.heatmap import FONT, style_figure

# --- the shared publication template (Pareto plot, interval bars) ------------------------

Interval = dict[str, float]  # {"value", "low", "high", ...}: a stats.Rate or a bootstrap


def publication_figure(
    fig: go.Figure, *, title: str, xaxis_title: str, yaxis_title: str,
    width: int = 640, height: int = 420,
) -> go.Figure:
    """The heatmap's publication style (one font, ``simple_white``, its margins) with the
    given axis titles and size: the one template of every figure but the heatmap."""
    fig.update_layout(template="simple_white", font=FONT,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, title=title,
                      xaxis_title=xaxis_title, yaxis_title=yaxis_title,
                      width=width, height=height)
    return fig


def _error(values: Sequence[Interval]) -> dict[str, Any]:
    """Plotly asymmetric error bars from intervals."""
    return {"type": "data", "symmetric": False,
            "array": [v["high"] - v["value"] for v in values],
            "arrayminus": [v["value"] - v["low"] for v in values]}


def pareto_figure(
    rows: Sequence[dict[str, Any]], *, x: str = "kl", y: str = "admitted",
    xaxis_title: str = "KL(base‖tuned) per token", yaxis_title: str = "admitted-mistake rate",
    title: str = "Effect against drift", base: Interval | None = None,
) -> go.Figure:
    """Each row (``group``, ``name``, and intervals under ``x`` and ``y``) as a point with
    95% intervals on both axes, one colour per group; the lower-left front of the rows
    (no other row lower on both) is joined by a dashed line. ``base``: the untuned model's
    ``y`` interval, a dotted line named by its value and interval."""
    fig = go.Figure()
    for group in dict.fromkeys(row["group"] for row in rows):
        members = [row for row in rows if row["group"] == group]
        fig.add_trace(go.Scatter(
            x=[r[x]["value"] for r in members], y=[r[y]["value"] for r in members],
            error_x=_error([r[x] for r in members]), error_y=_error([r[y] for r in members]),
            mode="markers", name=group, text=[r["name"] for r in members],
            hovertemplate="%{text}<br>%{x:.4f}, %{y:.2f}<extra></extra>"))
    points = sorted((r[x]["value"], r[y]["value"]) for r in rows)
    front, best = [], float("inf")
    for px, py in points:
        if py < best:
            front.append((px, py))
            best = py
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                             line={"dash": "dash", "color": "grey"}, name="front",
                             hoverinfo="skip"))
    if base is not None:  # across the rows' x extent (a log axis: positive ends only)
        ends = [v for r in rows for v in (r[x]["low"], r[x]["high"]) if v > 0]
        fig.add_trace(go.Scatter(
            x=[min(ends), max(ends)], y=[base["value"]] * 2, mode="lines",
            line={"dash": "dot", "color": "black"}, hoverinfo="skip",
            name=f"base {base['value']:.2f} [{base['low']:.2f}, {base['high']:.2f}]"))
    fig.update_xaxes(type="log")
    return publication_figure(fig, title=title, xaxis_title=xaxis_title,
                              yaxis_title=yaxis_title)


def sweep_pareto_figure(sweep: dict[str, Any], *, yaxis_title: str) -> go.Figure:
    """The Pareto figure of a tuning sweep (``sweep.json`` of ``benchmarks/sweep_tuning.py``):
    its eval-split rows once measured there, else its dev rows, with base as the reference line
    and the model (when the sweep records it) and split named in the title."""
    split = "eval" if "eval" in sweep else "dev"
    base = next(row for row in sweep[split] if row["method"] == "base")
    model = f" of {sweep['model']}" if "model" in sweep else ""
    return pareto_figure([row for row in sweep[split] if row is not base], y="target",
                         yaxis_title=yaxis_title, base=base["target"],
                         title=f"Sweep{model} on the {split} split: effect against drift")


def interval_bars(
    rows: dict[str, dict[str, Any]], metrics: Sequence[tuple[str, str]], *,
    title: str = "Rates per method (95% intervals)",
) -> go.Figure:
    """Grouped bars, one group per metric ``(key, label)`` and one bar per method, with the
    intervals as error bars; metrics a method lacks are left out."""
    fig = go.Figure()
    for method, row in rows.items():
        shown = [(label, row[key]) for key, label in metrics if row.get(key)]
        fig.add_trace(go.Bar(name=method, x=[label for label, _ in shown],
                             y=[value["value"] for _, value in shown],
                             error_y=_error([value for _, value in shown])))
    fig.update_layout(barmode="group")
    return publication_figure(fig, title=title, xaxis_title="", yaxis_title="rate",
                              width=760)


def loss_curves(methods: dict[str, dict[str, Any]], *, window: int = 10) -> go.Figure:
    """Per method of a tuning index (``{"losses": [...], "evals": [{"step", "heldout_loss"},
    ...]}``): the training loss smoothed over ``window`` batches (the raw per-batch loss faint
    behind it) and the held-out loss where it was measured, in the same colour. Methods
    without losses (few-shot prompting trains nothing) are left out."""
    fig = go.Figure()
    colours = iter(qualitative.Plotly * 4)
    for method, entry in methods.items():
        losses = entry.get("losses") or []
        if not losses:
            continue
        colour, steps = next(colours), list(range(1, len(losses) + 1))
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines", name=f"{method} (per batch)",
                                 line={"color": colour, "width": 1}, opacity=0.3,
                                 showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=steps, y=stats.smoothed(losses, window), mode="lines",
                                 name=f"{method}: training (mean of {window} batches)",
                                 line={"color": colour}))
        held_out = [e for e in entry.get("evals") or [] if "heldout_loss" in e]
        if held_out:
            fig.add_trace(go.Scatter(
                x=[e["step"] for e in held_out], y=[e["heldout_loss"] for e in held_out],
                mode="lines+markers", name=f"{method}: held-out",
                line={"color": colour, "dash": "dash"}))
    style_figure(fig).update_layout(
        title="Loss per method: training (smoothed) and held-out", xaxis_title="step",
        yaxis_title="loss (final assistant turn)", width=700, height=440,
    )
    return fig


def knockout_sweep_figure(result: dict, generation: Sequence[dict] = ()) -> go.Figure:
    """Left: the share of the challenge effect remaining at each k swept (ticks at those k
    only; top-k with its bootstrap interval, bottom-k, the random and layer-matched sets'
    middle 95%). Right, given ``generation`` rows ``{"k", "kind", "admitted": rate}``: the
    admitted-mistake rate on the correct-before questions with exact intervals, one category
    per set kind and k. Each panel's title names its n (and the random sets' where it is
    smaller)."""
    cols = 2 if generation else 1
    n_questions = max((g["admitted"]["n"] for g in generation), default=0)
    # random sets may be judged on the first of the questions only (notebook 03)
    n_random = {g["admitted"]["n"] for g in generation if g["kind"] == "random"}
    fewer = (f"; random sets: first {min(n_random)}"
             if n_random and min(n_random) < n_questions else "")
    titles = [f"challenge effect remaining, {result['n_pairs']} held-out pairs<br>"
              "(1 = intact, 0 = removed)",
              f"admitted-mistake rate, {n_questions} held-out questions<br>"
              f"(correct before; exact 95%{fewer})"]
    figure = make_subplots(rows=1, cols=cols, subplot_titles=titles[:cols])
    by_k = result["by_k"]
    ks = [r["k"] for r in by_k]
    for kind, colour in (("random", "rgba(120,120,120,0.25)"),
                         ("layer_matched", "rgba(230,150,30,0.25)")):
        rows = [r for r in by_k if r[kind]]
        if rows:
            x = [r["k"] for r in rows]
            highs, lows = [r[kind]["high"] for r in rows], [r[kind]["low"] for r in rows]
            if len(rows) == 1:  # one k: a box around it (a band of no width draws nothing)
                x, highs, lows = [x[0] - 0.3, x[0] + 0.3], highs * 2, lows * 2
            figure.add_scatter(
                x=x + x[::-1], y=highs + lows[::-1], fill="toself", fillcolor=colour,
                line={"width": 0}, mode="lines",
                name=f"{kind.replace('_', '-')} sets, middle 95%",
            )
    figure.add_scatter(
        x=ks, y=[r["top"]["remaining"] for r in by_k], name="top-k", line={"color": "crimson"},
        error_y={"type": "data", "symmetric": False,
                 "array": [r["top"]["high"] - r["top"]["remaining"] for r in by_k],
                 "arrayminus": [r["top"]["remaining"] - r["top"]["low"] for r in by_k]},
    )
    if all(r["bottom"] is not None for r in by_k):
        figure.add_scatter(x=ks, y=[r["bottom"] for r in by_k], name="bottom-k",
                           line={"color": "royalblue"})
    # one category per kind and k (on an organism, its planted heads too)
    styles = {"none": "black", "top": "crimson", "random": "grey", "planted": "forestgreen"}
    for kind, colour in styles.items():
        points = [g for g in generation if g["kind"] == kind and g["admitted"]["n"]]
        if points:
            figure.add_scatter(
                x=["none" if kind == "none" else f"{kind} {g['k']}" for g in points],
                y=[g["admitted"]["value"] for g in points],
                mode="markers", name=f"{kind} (generation)", marker={"color": colour},
                error_y={"type": "data", "symmetric": False,
                         "array": [g["admitted"]["high"] - g["admitted"]["value"]
                                   for g in points],
                         "arrayminus": [g["admitted"]["value"] - g["admitted"]["low"]
                                        for g in points]},
                row=1, col=2,
            )
    figure.add_hline(y=1, line_dash="dot", line_color="black", line_width=2, opacity=1,
                     row=1, col=1)  # the template's shapes are invisible (width 0)
    publication_figure(figure, title=f"Head knockout ({result['method']} ablation, both sides "
                       "of each pair)", xaxis_title="", yaxis_title="", width=900, height=520)
    # two-line panel titles under the figure's title, the legend under the panels: every
    # label inside the frame at a paper's page width; the k swept are ticks, not an axis
    figure.update_xaxes(title_text="k heads knocked out", tickvals=ks,
                        range=[min(ks) - 0.6, max(ks) + 0.6], row=1, col=1)
    figure.update_yaxes(title_text="share of the effect left", row=1, col=1)
    if generation:
        figure.update_xaxes(title_text="heads knocked out (kind, k)", type="category",
                            row=1, col=2)
        figure.update_yaxes(title_text="admitted mistakes", range=[-0.02, 1.02], row=1, col=2)
    return figure.update_layout(
        margin={"l": 60, "r": 20, "t": 95, "b": 20}, title={"y": 0.97, "yanchor": "top"},
        legend={"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.2,
                "yanchor": "top"})
