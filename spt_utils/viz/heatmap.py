"""The layer×head heatmap (:func:`head_heatmap`, in the publication style of
:func:`style_figure`), the interactive head selection on it (:class:`HeadSelector`) and
attention patterns (:func:`attention_patterns`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import circuitsvis.attention
import ipywidgets
import plotly.graph_objects as go
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
SELECTOR_CLASS = "spt-head-selector"  # CSS class of the widget's outer box (browser tests)
SELECTION_CLASS = "spt-head-selection"  # CSS class of the label listing the selected heads


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
    diverging: bool | None = None,
) -> go.Figure:
    """A layer×head heatmap with hover of head/score/rank (and, given ``uncertainty``, the 95%
    interval and the share of pairs with the score's sign). A signed score (``diverging``;
    None: when the scores take both signs) gets diverging colours on a range symmetric about
    0, any other a sequential scale. ``selected`` heads are marked with black open squares,
    ``outlined`` ones (e.g. an organism's planted heads) with larger green ones, each named in
    the legend."""
    values = score.detach().float().cpu()
    finite = values[values.isfinite()]
    if diverging is None:
        diverging = bool((finite < 0).any() and (finite > 0).any())
    bound = float(finite.abs().max()) if len(finite) else 1.0
    colours = ({"colorscale": "RdBu_r", "zmid": 0, "zmin": -bound, "zmax": bound}
               if diverging else {"colorscale": "Viridis"})
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
        **colours,
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
        showlegend=bool(selected),
    )
    traces = [heatmap, markers]
    if outlined:
        traces.append(go.Scatter(
            x=[h for _, h in outlined], y=[layer for layer, _ in outlined], mode="markers",
            marker={"symbol": "square-open", "size": 20, "color": "#1a9850",
                    "line": {"width": 2}},
            hoverinfo="skip", name="planted (ground truth)", showlegend=True))
    fig = go.Figure(traces)
    fig.update_layout(title=title, width=520, height=max(360, 18 * n_layers + 150),
                      legend={"orientation": "h", "x": 0, "y": -0.11, "yanchor": "top"})
    fig.update_xaxes(dtick=1, range=[-0.5, n_heads - 0.5])
    fig.update_yaxes(dtick=1, range=[-0.5, n_layers - 0.5])
    return style_figure(fig, colorbar_title=metric_name)


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
            markers.showlegend = bool(self.selection)
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
