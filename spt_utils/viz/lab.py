"""Figures and widgets: the interactive head heatmap, publication export, attention patterns.

* :class:`HeadSelector` — a layer×head heatmap (plotly ``FigureWidget``) whose selection
  (clicks, a top-k slider and a sign filter) is saved to ``heads.json`` on every change.
* :func:`export_figure` — consistent publication styling, written as PDF, SVG, PNG and HTML;
  every static image of a process (a notebook's kernel) is rendered in one headless browser
  (:class:`KaleidoSession`), opened on first use and closed at exit.
* :func:`attention_patterns` — circuitsvis attention patterns of chosen heads, rendered
  offline (the JavaScript bundled with circuitsvis is inlined; no CDN).
* :class:`HeadLab` — the heatmap beside the model's reply: clicks toggle heads in a knockout
  set, and the reply, its verdict and both sides' logit differences update live (the
  measurements come from a probe, e.g. :class:`spt_utils.ablation.KnockoutProbe`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import html
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import circuitsvis.attention
import ipywidgets
import plotly.graph_objects as go
import plotly.io as pio
import torch
from IPython.display import HTML
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.io import atomic_write, write_json
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
    outlined: Sequence[Head] = (),
) -> go.Figure:
    """A layer×head heatmap, diverging colours centred on 0, hover with head/score/rank (and,
    given ``uncertainty``, the 95% interval and the share of pairs with the score's sign);
    ``selected`` heads are marked with open squares, ``outlined`` ones (e.g. an organism's
    planted heads) with larger green ones."""
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
    traces = [heatmap, markers]
    if outlined:
        traces.append(go.Scatter(
            x=[h for _, h in outlined], y=[layer for layer, _ in outlined], mode="markers",
            marker={"symbol": "square-open", "size": 20, "color": "#1a9850",
                    "line": {"width": 2}},
            hoverinfo="skip", name="planted", showlegend=False))
    fig = go.Figure(traces)
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
    constructor applies the defaults through the same code path. With ``autosave=False`` only
    :meth:`save` writes the file; ``on_change`` is called with the selection after every
    later change (not for the constructor's default).

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
        autosave: bool = True,
        on_change: Callable[[list[Head]], None] | None = None,
        provenance: dict | None = None,
        eligible: Tensor | None = None,
        outlined: Sequence[Head] = (),
    ) -> None:
        if sign not in SIGNS:
            raise ValueError(f"sign: {sign!r} is not one of {SIGNS}")
        self.score = score.detach().float().cpu()
        if eligible is not None and eligible.shape != self.score.shape:
            raise ValueError(f"eligible: shape {list(eligible.shape)} is not the score's "
                             f"{list(self.score.shape)}")
        self.uncertainty = uncertainty
        self._eligible = eligible
        self.outlined = list(outlined)
        self.heads_path = Path(heads_path)
        self.extra = extra or {}
        self.provenance = provenance  # saved with the selection (spt_utils.io.provenance)
        self.metric_name = metric_name
        n_layers, n_heads = self.score.shape
        self.figure = go.FigureWidget(
            head_heatmap(self.score, metric_name=metric_name, title=title,
                         uncertainty=uncertainty, outlined=self.outlined)
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
        self.autosave = autosave
        self.on_change: Callable[[list[Head]], None] | None = None
        self.select_top(top_k, sign)
        self.on_change = on_change

    # --- selection logic (testable without a browser) -----------------------------------

    @property
    def eligible(self) -> Tensor | None:
        """Heads the top-k may choose: those given, else those whose interval excludes 0
        (None: all)."""
        if self._eligible is not None:
            return self._eligible
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
        if self.autosave:
            self.save()
        if self.on_change is not None:
            self.on_change(list(self.selection))

    def save(self) -> None:
        """Write the selection to ``heads_path`` (atomic)."""
        save_heads(
            self.heads_path,
            self.selection,
            provenance=self.provenance,
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
            uncertainty=self.uncertainty, outlined=self.outlined,
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
    and the split named in the title."""
    split = "eval" if "eval" in sweep else "dev"
    base = next(row for row in sweep[split] if row["method"] == "base")
    return pareto_figure([row for row in sweep[split] if row is not base], y="target",
                         yaxis_title=yaxis_title, base=base["target"],
                         title=f"Sweep on the {split} split: effect against drift")


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


# --- the live head lab: clicks change the knockout set, the model replies -----------------

LAB_CLASS = "spt-head-lab"  # CSS class of the lab's outer box (browser tests)
LAB_REPLY_CLASS = "spt-lab-reply"  # the reply under the knockout set
LAB_NUMBERS_CLASS = "spt-lab-numbers"  # the table of numbers (cells carry data-key/-value)
LAB_STATUS_CLASS = "spt-lab-status"  # busy / ready / error (data-state)


class LabProbe(Protocol):
    """What :class:`HeadLab` asks of the model; :class:`spt_utils.ablation.KnockoutProbe`
    is the one the notebooks use (this module does not import the hook code)."""

    questions: list[dict]
    scaled_methods: tuple[str, ...]  # the methods that take an ``alpha`` (a steering)

    @property
    def methods(self) -> tuple[str, ...]: ...

    def conversation(self, question: int) -> list[dict]: ...

    def reply(self, heads: Sequence[Head], method: str, question: int,
              alpha: float | None = None) -> dict: ...

    def pair_metrics(self, heads: Sequence[Head], method: str,
                     alpha: float | None = None) -> dict: ...


@dataclass(frozen=True)
class LabRequest:
    """One update of the lab: the head set (in click order), the intervention (an ablation
    or a steering), the question, and the steering's strength (None for a knockout)."""

    heads: tuple[Head, ...]
    method: str
    question: int
    alpha: float | None = None


@dataclass
class LabState:
    """What the lab shows for a request: the reply under the knockout set (``{"reply",
    "admitted", "kept"}``), the reply with nothing ablated, the probe's pair metrics and the
    seconds the update took."""

    request: LabRequest
    reply: dict
    baseline: dict
    metrics: dict
    seconds: float


class LatestWins:
    """Runs ``work(request)`` on a worker thread, one request at a time, without blocking the
    caller. A request submitted while one runs waits as the single pending request; a newer
    one replaces it (latest wins, counted in ``replaced``), so a burst of clicks costs at most
    one update after the running one. ``done(request, result)``, or ``failed(request,
    error)`` when ``work`` or ``done`` raises, runs on the worker thread."""

    def __init__(
        self,
        work: Callable[[Any], Any],
        done: Callable[[Any, Any], None],
        failed: Callable[[Any, Exception], None],
    ) -> None:
        self._work, self._done, self._failed = work, done, failed
        self._condition = threading.Condition()
        self._pending: list[Any] = []  # at most one request
        self._running = False
        self.replaced = 0

    @property
    def busy(self) -> bool:
        return self._running

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def submit(self, request: Any) -> None:
        with self._condition:
            if self._running:
                self.replaced += len(self._pending)
                self._pending[:] = [request]
                return
            self._running = True
        threading.Thread(target=self._loop, args=(request,), name="spt-head-lab",
                         daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no request runs or waits; False if ``timeout`` seconds passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._running, timeout)

    def _next(self) -> Any:
        with self._condition:
            if self._pending:
                return self._pending.pop()
            self._running = False
            self._condition.notify_all()
            return None

    def _loop(self, request: Any) -> None:
        try:
            while request is not None:
                try:
                    self._done(request, self._work(request))
                except Exception as error:  # reported through `failed`; the worker goes on
                    self._failed(request, error)
                request = self._next()
        finally:  # `failed` itself raised: leave the worker idle, not stuck
            with self._condition:
                if self._running:
                    self._running = False
                    self._pending.clear()
                    self._condition.notify_all()


def _number_cell(key: str, value: float, digits: int) -> str:
    """A table cell carrying its full-precision value for tests (``data-value``)."""
    return f'<td data-key="{key}" data-value="{value!r}">{value:.{digits}f}</td>'


def _interval_cell(key: str, interval: Interval, digits: int) -> str:
    return (f'<td data-key="{key}" data-value="{interval["value"]!r}" '
            f'data-low="{interval["low"]!r}" data-high="{interval["high"]!r}">'
            f'{interval["value"]:.{digits}f} [{interval["low"]:.{digits}f}, '
            f'{interval["high"]:.{digits}f}]</td>')


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


class HeadLab:
    """The head heatmap beside the model's reply: clicks toggle heads in the set that is
    knocked out, or steered.

    Each change (a click, the heatmap's top-k slider and sign filter, the ablation or the
    question dropdown, the α slider) reruns, with the set ablated (or steered), the chosen
    question's reply to the challenge (judged: admitted a mistake, still names the correct
    answer) and the logit
    differences of both sides of every pair of the probe's questions: the chosen pair's and
    their mean with a bootstrap 95% interval, and the share of the challenge effect that
    remains (1 = intact, 0 = removed). Updates run on a worker thread with a busy state; a
    change during an update queues one pending update (:class:`LatestWins`), so the notebook
    never freezes. The reply is shown as soon as it is generated, the numbers after it; a
    change made while the reply was generated skips that update's numbers (the pending
    update measures the newer set). While an update runs the model carries the knockout's
    hooks: use the model elsewhere only when the lab is idle (:meth:`wait`). "reset" empties
    the set, "save" writes it to ``heads_path`` like :class:`HeadSelector`.

    Steering mode: a probe's ``scaled_methods`` (:class:`spt_utils.steering.SteeringProbe`'s
    ``"steer"``) appear in the dropdown beside the ablations, and the α slider (enabled for
    them alone) sets how strongly the set is steered; α = 0 is the unsteered model.

    Without a front end (papermill, CI), :meth:`run_script` applies clicks synchronously
    through the same code path and :meth:`save_state` writes what the lab shows as JSON.
    For browser tests: the outer box has the CSS class ``spt-head-lab``; the reply
    ``spt-lab-reply``; the numbers' table ``spt-lab-numbers`` (each cell's ``data-key`` and
    full-precision ``data-value``); the status ``spt-lab-status`` (``data-state``: busy,
    ready or error).
    """

    def __init__(
        self,
        probe: LabProbe,
        score: Float[Tensor, "layer head"],
        heads_path: str | Path,
        *,
        method: str = "mean",
        question: int = 0,
        alpha: float = 1.0,
        metric_name: str = "calibrated score",
        title: str = "",
        extra: dict | None = None,
        uncertainty: HeadUncertainty | None = None,
    ) -> None:
        if method not in probe.methods:
            raise ValueError(f"HeadLab: method {method!r} is not one of the probe's "
                             f"{probe.methods}")
        if not 0 <= question < len(probe.questions):
            raise ValueError(f"HeadLab: question {question} is not in 0…"
                             f"{len(probe.questions) - 1}")
        self.probe = probe
        self.selector = HeadSelector(
            score, heads_path, top_k=0, metric_name=metric_name, title=title, extra=extra,
            uncertainty=uncertainty, autosave=False, on_change=lambda heads: self._request(),
        )
        self.method_dropdown = ipywidgets.Dropdown(
            options=list(probe.methods), value=method, description="ablation",
            layout=ipywidgets.Layout(width="180px"))
        self.question_dropdown = ipywidgets.Dropdown(
            options=[(f"{i + 1}. {q['question'][:70]}", i) for i, q in
                     enumerate(probe.questions)],
            value=question, description="question", layout=ipywidgets.Layout(width="460px"))
        self.alpha_slider = ipywidgets.FloatSlider(
            value=alpha, min=0.0, max=max(8.0, alpha), step=0.25, description="steer α",
            continuous_update=False, readout_format=".2f",
            disabled=method not in probe.scaled_methods, layout=ipywidgets.Layout(width="300px"))
        self.reset_button = ipywidgets.Button(description="reset")
        self.save_button = ipywidgets.Button(description="save")
        self.status = ipywidgets.HTML()
        self.status.add_class(LAB_STATUS_CLASS)
        self.conversation_view = ipywidgets.HTML()
        self.numbers = ipywidgets.HTML()
        self.numbers.add_class(LAB_NUMBERS_CLASS)
        self.bars = go.FigureWidget(self._bar_figure())
        self.method_dropdown.observe(self._method_changed, names="value")
        self.alpha_slider.observe(lambda change: self._request(), names="value")
        self.question_dropdown.observe(lambda change: self._request(), names="value")
        self.reset_button.on_click(lambda button: self.reset())
        self.save_button.on_click(lambda button: self.save())
        self.error: Exception | None = None
        self.script: list[Head] = []
        self._baselines: dict[int, dict] = {}  # question → its reply with nothing ablated
        self._metrics: tuple[tuple, dict] | None = None  # (heads, method, alpha) → metrics
        self._synchronous = True  # the first update runs before the lab is shown
        self._worker = LatestWins(self._compute, self._done, self._failed)
        self._last_request: LabRequest | None = None
        self.state: LabState | None = None
        self._request()
        self._synchronous = False

    # --- updates ----------------------------------------------------------------------

    def current_request(self) -> LabRequest:
        method = self.method_dropdown.value
        return LabRequest(tuple(self.selector.selection), method, self.question_dropdown.value,
                          self.alpha_slider.value if self._scaled(method) else None)

    def _scaled(self, method: str) -> bool:
        return method in self.probe.scaled_methods

    def _method_changed(self, change: dict) -> None:
        self.alpha_slider.disabled = not self._scaled(change["new"])
        self._request()

    def _request(self) -> None:
        request = self.current_request()
        if request == self._last_request:
            return
        self._last_request = request
        if self._synchronous:
            self._show(self._compute(request))
            return
        self._set_status("busy", "updating: " + self._describe(request)
                         + (" (after the running update)" if self._worker.busy else ""))
        self._worker.submit(request)

    def _compute(self, request: LabRequest) -> LabState | None:
        """The reply, then the pair metrics. On the worker thread the reply is shown as soon
        as it is there, and a newer pending change supersedes the rest (None)."""
        started = time.perf_counter()
        heads = list(request.heads)
        if request.question not in self._baselines:
            self._baselines[request.question] = self.probe.reply(
                [], request.method, request.question, request.alpha)
        baseline = self._baselines[request.question]
        reply = (self.probe.reply(heads, request.method, request.question, request.alpha)
                 if heads else baseline)
        key = (request.heads, request.method, request.alpha)
        if self._metrics is None or self._metrics[0] != key:
            if not self._synchronous:
                if self._worker.pending:
                    return None
                self.conversation_view.value = self._conversation_html(request, reply,
                                                                       baseline)
                self._set_status("busy", "measuring the pairs: " + self._describe(request))
            self._metrics = key, self.probe.pair_metrics(heads, request.method,
                                                         request.alpha)
        return LabState(request, reply, baseline, self._metrics[1],
                        time.perf_counter() - started)

    def _done(self, request: LabRequest, state: LabState | None) -> None:
        if state is not None:
            self._show(state)
        if self._worker.pending:
            self._set_status("busy", "updating: a newer change")

    def _failed(self, request: LabRequest, error: Exception) -> None:
        self.error = error
        if request == self._last_request:
            self._last_request = None  # the same change may be retried
        self._set_status("error", f"error: {type(error).__name__}: {error}")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no update runs or waits; False if ``timeout`` seconds passed first."""
        return self._worker.wait(timeout)

    # --- buttons and the headless path ------------------------------------------------

    def reset(self) -> None:
        """Empty the knockout set."""
        self.selector.top_k_slider.value = 0
        self.selector.select_top(0, self.selector.sign_filter.value)

    def save(self) -> None:
        """Write the knockout set to ``heads_path`` (as :meth:`HeadSelector.save`)."""
        self.selector.save()
        if self.status.value and "data-state=\"busy\"" not in self.status.value:
            self._set_status("ready", f"saved {len(self.selector.selection)} heads to "
                             f"{self.selector.heads_path}")

    def run_script(self, clicks: Sequence[Head]) -> LabState:
        """Click each head in turn (a toggle), updating synchronously after each click, as
        the live lab does; returns the final state."""
        self.wait()
        n_layers, n_heads = self.selector.score.shape
        clicks = validate_heads([tuple(c) for c in clicks], n_layers, n_heads)
        self._synchronous = True
        try:
            for layer, head in clicks:
                self.selector.toggle(layer, head)
                self.script.append((layer, head))
        finally:
            self._synchronous = False
        assert self.state is not None
        return self.state

    def save_state(self, path: str | Path) -> dict:
        """Write what the lab shows (set, reply, verdict, numbers, the clicks of
        :meth:`run_script`) as JSON; returns it. An error when the last update failed."""
        self.wait()
        if self.error is not None:  # the state shown is an older request's
            raise RuntimeError(f"save_state: the last update failed ({self.error})") from self.error
        if self.state is None:
            raise RuntimeError("save_state: the lab has no state yet")
        request, metrics = self.state.request, self.state.metrics
        question = self.probe.questions[request.question]
        record = {
            "heads": [list(h) for h in request.heads], "method": request.method,
            "alpha": request.alpha, "question": {"index": request.question, "id": question["id"],
                         "question": question["question"]},
            "conversation": self.probe.conversation(request.question),
            **self.state.reply, "baseline": self.state.baseline,
            "pair": self._pair(metrics, request.question),
            "pairs": {key: metrics[key] for key in
                      ("n_pairs", "clean_reference", "clean_counterfactual", "reference",
                       "counterfactual", "remaining")},
            "per_pair": metrics["per_pair"], "script": [list(h) for h in self.script],
            "seconds": self.state.seconds,
        }
        write_json(path, record)
        return record

    # --- display ----------------------------------------------------------------------

    def _pair(self, metrics: dict, question: int) -> dict:
        """The chosen question's own pair in the metrics."""
        ident = self.probe.questions[question]["id"]
        return next(p for p in metrics["per_pair"] if p["question_id"] == ident)

    @staticmethod
    def _describe(request: LabRequest) -> str:
        names = ", ".join(head_name(h) for h in request.heads) or "no heads"
        strength = "" if request.alpha is None else f", α={request.alpha:g}"
        return f"{names} ({request.method}{strength})"

    @staticmethod
    def _verb(request: LabRequest) -> str:
        """What is done to the set: ``"knocked out"`` or ``"steered"``."""
        return "knocked out" if request.alpha is None else "steered"

    def _set_status(self, state: str, text: str) -> None:
        colour = {"busy": "#b36b00", "ready": "#2a7a2a", "error": "#b00020"}[state]
        self.status.value = (f'<span data-state="{state}" style="color: {colour}">'
                             f"{html.escape(text)}</span>")

    def _show(self, state: LabState) -> None:
        self.state = state
        self.error = None
        self.conversation_view.value = self._conversation_html(state.request, state.reply,
                                                               state.baseline)
        self.numbers.value = self._numbers_html(state)
        self._update_bars(state.metrics, self._verb(state.request))
        self._set_status("ready", f"ready: {self._describe(state.request)}, "
                         f"{state.seconds:.1f} s")

    def _conversation_html(self, request: LabRequest, reply: dict, baseline: dict) -> str:
        turns = [m for m in self.probe.conversation(request.question) if m["role"] != "system"]
        rows = [f"<p><b>{m['role']}:</b> {html.escape(m['content'])}</p>" for m in turns]
        rows.append(f'<p class="{LAB_REPLY_CLASS}" style="background: #fff4e0; padding: 4px">'
                    f"<b>assistant, {html.escape(self._describe(request))} "
                    f"{self._verb(request)}:</b> "
                    f"{html.escape(reply['reply'])}</p>")
        rows.append(f"<p>admits a mistake: <b>{_yes_no(reply['admitted'])}</b> · still names "
                    f"the correct answer: <b>{_yes_no(reply['kept'])}</b></p>")
        if request.heads:
            rows.append(f'<p style="color: #666">with nothing {self._verb(request)}: '
                        f"{html.escape(baseline['reply'])} (admits: "
                        f"{_yes_no(baseline['admitted'])}, names the correct answer: "
                        f"{_yes_no(baseline['kept'])})</p>")
        return "".join(rows)

    def _numbers_html(self, state: LabState) -> str:
        metrics, verb = state.metrics, self._verb(state.request)
        pair = self._pair(metrics, state.request.question)
        rows = [
            "<tr><th></th><th colspan=2>this question's pair</th>"
            f"<th colspan=2>mean over {metrics['n_pairs']} pairs</th></tr>",
            f"<tr><th></th><th>clean</th><th>{verb}</th><th>clean</th>"
            f"<th>{verb} [95% CI]</th></tr>",
        ]
        for side in ("reference", "counterfactual"):
            rows.append(
                f"<tr><th>logit diff., {side}</th>"
                + _number_cell(f"pair.clean_{side}", pair[f"clean_{side}"], 3)
                + _number_cell(f"pair.{side}", pair[side], 3)
                + _number_cell(f"pairs.clean_{side}", metrics[f"clean_{side}"], 3)
                + _interval_cell(f"pairs.{side}", metrics[side], 3) + "</tr>")
        rows.append("<tr><th>effect remaining</th><td>1</td>"
                    + _number_cell("pair.remaining", pair["remaining"], 2) + "<td>1</td>"
                    + _interval_cell("pairs.remaining", metrics["remaining"], 2) + "</tr>")
        return (f'<table class="{LAB_NUMBERS_CLASS}-table" style="white-space: nowrap; '
                f'margin-right: 16px">{"".join(rows)}</table>')

    @staticmethod
    def _bar_figure() -> go.Figure:
        figure = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], subplot_titles=(
            "logit difference", "remaining"))
        figure.add_bar(name="clean", x=["reference", "counterfactual"], y=[0, 0],
                       marker_color="grey", row=1, col=1)
        figure.add_bar(name="knocked out", x=["reference", "counterfactual"], y=[0, 0],
                       marker_color="crimson", row=1, col=1)
        figure.add_bar(name="remaining", x=["intervened"], y=[0], marker_color="crimson",
                       showlegend=False, row=1, col=2)
        figure.add_hline(y=1, line_dash="dot", line_color="black", row=1, col=2)
        return publication_figure(figure, title="", xaxis_title="", yaxis_title="",
                                  width=440, height=280).update_layout(
            barmode="group", margin={"l": 40, "r": 10, "t": 40, "b": 30},
            legend={"orientation": "h", "y": -0.12})

    def _update_bars(self, metrics: dict, verb: str) -> None:
        sides = [metrics["reference"], metrics["counterfactual"]]
        with self.bars.batch_update():
            clean, ablated, remaining = self.bars.data
            ablated.name = verb  # the legend: knocked out or steered
            clean.y = [metrics["clean_reference"], metrics["clean_counterfactual"]]
            ablated.y = [side["value"] for side in sides]
            ablated.error_y = _error(sides)
            remaining.y = [metrics["remaining"]["value"]]
            remaining.error_y = _error([metrics["remaining"]])

    def widget(self) -> ipywidgets.VBox:
        """The controls and the status; the heatmap (with its slider and sign filter) beside
        the conversation; the numbers beside the bars."""
        controls = ipywidgets.HBox([self.method_dropdown, self.alpha_slider,
                                    self.question_dropdown, self.reset_button,
                                    self.save_button])
        self.conversation_view.layout = ipywidgets.Layout(flex="1 1 0%", min_width="320px")
        box = ipywidgets.VBox([
            controls, self.status,
            ipywidgets.HBox([self.selector.widget(), self.conversation_view]),
            ipywidgets.HBox([self.numbers, self.bars]),
        ])
        box.add_class(LAB_CLASS)
        return box
