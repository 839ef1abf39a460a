"""Figures and widgets: the interactive head heatmap, publication export, attention patterns.

* :class:`HeadSelector` — a layer×head heatmap (plotly ``FigureWidget``) whose selection
  (clicks, a top-k slider and a sign filter) is saved to ``heads.json`` on every change.
* :func:`export_figure` — consistent publication styling, written as PDF, SVG, PNG and HTML;
  every static image of a process (a notebook's kernel) is rendered in one headless browser
  (:class:`KaleidoSession`), opened on first use and closed at exit.
* :func:`attention_patterns` — circuitsvis attention patterns of chosen heads, rendered
  offline (the JavaScript bundled with circuitsvis is inlined; no CDN).
* :class:`HeadLab` — the heatmap beside the model's reply: clicks toggle heads in a set that
  is knocked out (or steered, at the α slider's strength), and the reply, its verdict and
  both sides' logit differences update live (the measurements come from a probe, e.g.
  :class:`spt_utils.ablation.KnockoutProbe` or :class:`spt_utils.steering.SteeringProbe`).

The submodules, lowest first:

* :mod:`~spt_utils.viz.heatmap`: the publication font and style, the head heatmap, the
  head selector and attention patterns;
* :mod:`~spt_utils.viz.export`: :func:`export_figure` and its :class:`KaleidoSession`;
* :mod:`~spt_utils.viz.figures`: the shared publication template and the figures drawn in it;
* :mod:`~spt_utils.viz.updates`: the head lab's probe, requests, states and worker;
* :mod:`~spt_utils.viz.lab`: the head lab.
"""

from spt_utils.viz.export import (
    STATIC_FORMATS,
    KaleidoSession,
    export_figure,
)
from spt_utils.viz.figures import (
    Interval,
    interval_bars,
    knockout_sweep_figure,
    loss_curves,
    pareto_figure,
    publication_figure,
    sweep_pareto_figure,
)
from spt_utils.viz.heatmap import (
    FONT,
    SELECTION_CLASS,
    SELECTOR_CLASS,
    HeadSelector,
    attention_patterns,
    head_heatmap,
    head_name,
    style_figure,
)
from spt_utils.viz.lab import (
    LAB_CLASS,
    LAB_NUMBERS_CLASS,
    LAB_REPLY_CLASS,
    LAB_STATUS_CLASS,
    HeadLab,
)
from spt_utils.viz.updates import (
    LabProbe,
    LabRequest,
    LabState,
    LatestWins,
)

__all__ = [
    "FONT",
    "LAB_CLASS",
    "LAB_NUMBERS_CLASS",
    "LAB_REPLY_CLASS",
    "LAB_STATUS_CLASS",
    "SELECTION_CLASS",
    "SELECTOR_CLASS",
    "STATIC_FORMATS",
    "HeadLab",
    "HeadSelector",
    "Interval",
    "KaleidoSession",
    "LabProbe",
    "LabRequest",
    "LabState",
    "LatestWins",
    "attention_patterns",
    "export_figure",
    "head_heatmap",
    "head_name",
    "interval_bars",
    "knockout_sweep_figure",
    "loss_curves",
    "pareto_figure",
    "publication_figure",
    "style_figure",
    "sweep_pareto_figure",
]
