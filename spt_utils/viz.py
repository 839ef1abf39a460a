"""Figures and widgets: the interactive head heatmap, publication export, attention patterns.

* :class:`HeadSelector` — a layer×head heatmap (plotly ``FigureWidget``) whose selection
  (clicks, a top-k slider and a sign filter) is saved to ``heads.json`` on every change.
* :func:`export_figure` — consistent publication styling, written as PDF, SVG, PNG and HTML;
  every static image of a process (a notebook's kernel) is rendered in one headless browser
  (:class:`KaleidoSession`), opened on first use and closed at exit.
* :func:`attention_patterns` — circuitsvis attention patterns of chosen heads, rendered
  offline (the JavaScript bundled with circuitsvis is inlined; no CDN).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import warnings
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import circuitsvis.attention
import ipywidgets
import plotly.graph_objects as go
import plotly.io as pio
import torch
from IPython.display import HTML
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.io import atomic_write
from spt_utils.patching import (
    SIGNS,
    Head,
    HeadUncertainty,
    save_heads,
    top_heads,
    validate_heads,
)

FONT = {"family": "DejaVu Sans, Arial, sans-serif", "size": 13, "color": "black"}
STATIC_FORMATS = ("pdf", "svg", "png")
SELECTOR_CLASS = "spt-head-selector"  # CSS class of the widget's outer box (browser tests)
SELECTION_CLASS = "spt-head-selection"  # CSS class of the label listing the selected heads
_static_export_warned = False


def head_name(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


def style_figure(fig: go.Figure, *, colorbar_title: str | None = None) -> go.Figure:
    """Publication styling: one font, white background, axis titles "head" (x) / "layer" (y)."""
    fig.update_layout(
        template="simple_white",
        font=FONT,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        xaxis_title="head",
        yaxis_title="layer",
    )
    if colorbar_title is not None:
        fig.update_traces(colorbar_title_text=colorbar_title, selector={"type": "heatmap"})
    return fig


def head_heatmap(
    score: Float[Tensor, "layer head"],
    *,
    metric_name: str,
    title: str = "",
    selected: Sequence[Head] = (),
    uncertainty: HeadUncertainty | None = None,
) -> go.Figure:
    """A layer×head heatmap, diverging colours centred on 0, hover with head/score/rank (and,
    given ``uncertainty``, the 95% interval and the share of pairs with the score's sign);
    ``selected`` heads are marked with open squares."""
    values = score.detach().float().cpu()
    n_layers, n_heads = values.shape
    ranks = torch.empty(values.numel(), dtype=torch.long)
    ranks[torch.argsort(values.flatten().nan_to_num(float("-inf")), descending=True)] = (
        torch.arange(values.numel()) + 1
    )
    # customdata: [layer, head, field] = rank (, low, high, same-sign share)
    fields = [ranks.view(n_layers, n_heads).float()]
    hover = f"L%{{y}}H%{{x}}<br>{metric_name} %{{z:.3f}}<br>rank %{{customdata[0]:.0f}}"
    if uncertainty is not None:
        fields += [uncertainty.low, uncertainty.high, uncertainty.same_sign]
        hover += ("<br>95% CI [%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                  f"<br>same sign in %{{customdata[3]:.0%}} of {uncertainty.n_pairs} pairs")
    heatmap = go.Heatmap(
        z=values.tolist(),
        x=list(range(n_heads)),
        y=list(range(n_layers)),
        colorscale="RdBu_r",
        zmid=0,
        customdata=torch.stack(fields, -1).tolist(),
        hovertemplate=hover + "<extra></extra>",
        colorbar={"title": {"text": metric_name}},
        name="scores",
    )
    markers = go.Scatter(
        x=[h for _, h in selected],
        y=[layer for layer, _ in selected],
        mode="markers",
        marker={"symbol": "square-open", "size": 14, "color": "black", "line": {"width": 2}},
        hoverinfo="skip",
        name="selected",
        showlegend=False,
    )
    fig = go.Figure([heatmap, markers])
    fig.update_layout(title=title, width=520, height=max(360, 18 * n_layers + 120))
    fig.update_xaxes(dtick=1, range=[-0.5, n_heads - 0.5])
    fig.update_yaxes(dtick=1, range=[-0.5, n_layers - 0.5])
    return style_figure(fig, colorbar_title=metric_name)


class KaleidoSession:
    """One kaleido browser for every static image this process exports, instead of one
    browser launch per image (``fig.to_image``). It runs in its own event loop on a daemon
    thread (a notebook kernel's own loop is busy), opens on first use and closes at exit.
    When it cannot open (no browser), :meth:`render` raises that error every time without
    trying again."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.launches = 0  # browsers started (tests count them)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._browser: Any = None
        self._error: Exception | None = None

    def _call(self, coroutine: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout_s)

    def _open(self) -> None:
        import kaleido

        async def enter() -> Any:
            self._stack = contextlib.AsyncExitStack()
            return await self._stack.enter_async_context(kaleido.Kaleido(n=1))

        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="kaleido", daemon=True).start()
        self.launches += 1
        try:
            self._browser = self._call(enter())
        except Exception as error:
            self._error = error
            self._stop_loop()
            raise
        atexit.register(self.close)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None

    def render(self, fig: go.Figure, fmt: str, scale: float) -> bytes:
        """``fig`` as ``fmt`` bytes, sized as ``fig.to_image`` sizes it."""
        if self._error is not None:
            raise self._error
        if self._browser is None:
            self._open()
        opts = {"format": fmt, "scale": scale,
                "width": fig.layout.width or pio.defaults.default_width,
                "height": fig.layout.height or pio.defaults.default_height}
        return self._call(self._browser.calc_fig(fig.to_dict(), opts=opts))

    def close(self) -> None:
        """Close the browser (a later :meth:`render` opens a new one)."""
        if self._browser is None:
            return
        with contextlib.suppress(Exception):  # at exit the browser may already be gone
            self._call(self._stack.aclose())
        self._browser = self._stack = None
        self._stop_loop()


_session = KaleidoSession()


def export_figure(
    fig: go.Figure, figures_dir: str | Path, name: str, *, scale: float = 2.0
) -> list[Path]:
    """Write ``name`` as PDF, SVG, PNG (kaleido + chromium, one browser per process) and
    HTML under ``figures_dir``.

    When static export fails (no browser), only HTML is written, with one warning per
    session. Every file is written atomically. Returns the written paths.
    """
    global _static_export_warned
    figures_dir = Path(figures_dir)
    html_path = figures_dir / f"{name}.html"
    with atomic_write(html_path) as handle:
        handle.write(fig.to_html(include_plotlyjs=True, full_html=True))
    written = [html_path]
    try:
        images = {fmt: _session.render(fig, fmt, scale) for fmt in STATIC_FORMATS}
    except Exception as error:  # kaleido raises several types when no browser is found
        if not _static_export_warned:
            warnings.warn(
                f"Static figure export failed ({type(error).__name__}: {error}); writing HTML "
                "only. Install chromium (kaleido 1.x needs it) for PDF, SVG and PNG.",
                RuntimeWarning,
                stacklevel=2,
            )
            _static_export_warned = True
        return written
    for fmt, image in images.items():
        path = figures_dir / f"{name}.{fmt}"
        with atomic_write(path, "wb") as handle:
            handle.write(image)
        written.append(path)
    return written


def loss_curves(methods: dict[str, dict[str, Any]]) -> go.Figure:
    """Training loss per step for each method of a tuning index (``{"losses": [...]}``);
    methods without losses (few-shot prompting trains nothing) are left out."""
    fig = go.Figure()
    for method, entry in methods.items():
        losses = entry.get("losses") or []
        if losses:
            steps = list(range(1, len(losses) + 1))
            fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers", name=method))
    style_figure(fig).update_layout(
        title="Training loss per method", xaxis_title="step",
        yaxis_title="loss (final assistant turn)", width=640, height=400,
    )
    return fig


class HeadSelector:
    """Interactive head selection on a layer×head heatmap, saved to ``heads_path``.

    A click on a cell toggles that head; the top-k slider and the sign filter
    (``"positive"``: score > 0, heads that carry the challenge's effect; ``"negative"``:
    score < 0; ``"both"``: by |score|) replace the selection with the top-k heads of that
    sign. Given ``uncertainty``, the top-k draws only from heads whose 95% interval excludes
    0 (the label says how many qualify; a click can still add any head). Every change redraws
    the markers and rewrites ``heads_path`` atomically. Without a front end (papermill) the
    constructor applies the defaults through the same code path.

    For browser tests: the outer widget box carries the CSS class ``spt-head-selector`` and
    the label listing the selection ``spt-head-selection``; the heatmap is the box's plotly
    graph (``.spt-head-selector .js-plotly-plot``), layer on the y axis, head on the x axis.
    """

    def __init__(
        self,
        score: Float[Tensor, "layer head"],
        heads_path: str | Path,
        *,
        top_k: int = 8,
        sign: str = "positive",
        metric_name: str = "calibrated score",
        title: str = "",
        extra: dict | None = None,
        uncertainty: HeadUncertainty | None = None,
    ) -> None:
        if sign not in SIGNS:
            raise ValueError(f"sign: {sign!r} is not one of {SIGNS}")
        self.score = score.detach().float().cpu()
        self.uncertainty = uncertainty
        self.heads_path = Path(heads_path)
        self.extra = extra or {}
        self.metric_name = metric_name
        n_layers, n_heads = self.score.shape
        self.figure = go.FigureWidget(
            head_heatmap(self.score, metric_name=metric_name, title=title,
                         uncertainty=uncertainty)
        )
        self.figure.add_class(f"{SELECTOR_CLASS}-figure")
        for trace in self.figure.data:
            trace.on_click(self.on_click)
        self.top_k_slider = ipywidgets.IntSlider(
            value=top_k, min=0, max=n_layers * n_heads, description="top k"
        )
        self.sign_filter = ipywidgets.ToggleButtons(
            options=list(SIGNS), value=sign, description="sign"
        )
        self.label = ipywidgets.HTML()
        self.label.add_class(SELECTION_CLASS)
        self.top_k_slider.observe(self._on_filter_change, names="value")
        self.sign_filter.observe(self._on_filter_change, names="value")
        self.selection: list[Head] = []
        self.select_top(top_k, sign)

    # --- selection logic (testable without a browser) -----------------------------------

    @property
    def eligible(self) -> Tensor | None:
        """Heads the top-k may choose: those whose interval excludes 0 (None: all)."""
        return None if self.uncertainty is None else self.uncertainty.excludes_zero

    def select_top(self, k: int, sign: str) -> None:
        """Replace the selection with the top-``k`` (eligible) heads of ``sign``."""
        self._set_selection(top_heads(self.score, k, sign, eligible=self.eligible))

    def toggle(self, layer: int, head: int) -> None:
        """Add the head if unselected, remove it otherwise."""
        n_layers, n_heads = self.score.shape
        chosen = validate_heads([(layer, head)], n_layers, n_heads)[0]
        if chosen in self.selection:
            self._set_selection([h for h in self.selection if h != chosen])
        else:
            self._set_selection([*self.selection, chosen])

    def on_click(self, trace: go.BaseTraceType, points, state) -> None:
        """plotly ``on_click`` callback: toggle each clicked cell (x = head, y = layer)."""
        for head, layer in zip(points.xs, points.ys, strict=True):
            self.toggle(int(layer), int(head))

    def _on_filter_change(self, change: dict) -> None:
        self.select_top(self.top_k_slider.value, self.sign_filter.value)

    def _set_selection(self, heads: list[Head]) -> None:
        self.selection = list(heads)
        with self.figure.batch_update():
            markers = self.figure.data[1]
            markers.x = [h for _, h in self.selection]
            markers.y = [layer for layer, _ in self.selection]
        names = ", ".join(head_name(h) for h in self.selection) or "none"
        qualify = (
            "" if self.eligible is None else
            f" ({int(self.eligible.sum())} of {self.eligible.numel()} heads have a 95% CI "
            "excluding 0; top k picks only among them)"
        )
        self.label.value = f"<b>{len(self.selection)} selected:</b> {names}{qualify}"
        self.save()

    def save(self) -> None:
        """Write the selection to ``heads_path`` (atomic)."""
        save_heads(
            self.heads_path,
            self.selection,
            metric=self.metric_name,
            scores=[round(float(self.score[h]), 6) for h in self.selection],
            **self.extra,
        )

    def widget(self) -> ipywidgets.VBox:
        """The slider, the sign filter, the selection label and the heatmap in one box."""
        box = ipywidgets.VBox(
            [ipywidgets.HBox([self.top_k_slider, self.sign_filter]), self.label, self.figure]
        )
        box.add_class(SELECTOR_CLASS)
        return box

    def static_figure(self, title: str = "") -> go.Figure:
        """A plain (non-widget) copy of the heatmap with the current selection, for export."""
        return head_heatmap(
            self.score, metric_name=self.metric_name, title=title, selected=self.selection,
            uncertainty=self.uncertainty,
        )


@torch.no_grad()
def attention_patterns(
    model: TransformerBridge,
    tokens: Int[Tensor, " pos"],
    heads: Sequence[Head],
    *,
    html_path: str | Path | None = None,
) -> HTML:
    """circuitsvis attention patterns of ``heads`` on one prompt, rendered offline.

    The circuitsvis bundle is inlined in the HTML (its ``local_src``), so the output works
    without internet; ``html_path`` also writes it as a standalone page.
    """
    heads = validate_heads(list(heads), model.cfg.n_layers, model.cfg.n_heads)
    if not heads:
        raise ValueError("attention_patterns: no heads chosen")
    names = sorted({f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads})
    _, cache = model.run_with_cache(tokens[None].to(model.cfg.device), names_filter=names)
    # pattern: [batch, head, query_pos, key_pos]
    patterns = torch.stack(
        [cache[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in heads]
    ).cpu()
    rendered = circuitsvis.attention.attention_heads(
        attention=patterns,
        tokens=model.tokenizer.convert_ids_to_tokens(tokens.tolist()),
        attention_head_names=[head_name(h) for h in heads],
    )
    html = rendered.local_src  # inline JavaScript bundle, not the CDN import
    if html_path is not None:
        with atomic_write(html_path) as handle:
            handle.write(f"<!DOCTYPE html><html><body>{html}</body></html>")
    return HTML(html)


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
    title: str = "Effect against drift",
) -> go.Figure:
    """Each row (``group``, ``name``, and intervals under ``x`` and ``y``) as a point with
    95% intervals on both axes, one colour per group; the lower-left front of the rows
    (no other row lower on both) is joined by a dashed line."""
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
    fig.update_xaxes(type="log")
    return publication_figure(fig, title=title, xaxis_title=xaxis_title,
                              yaxis_title=yaxis_title)


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
