"""The live head lab (:class:`HeadLab`) and the cells of its table of numbers."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path

import ipywidgets
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from spt_utils.io import write_json
from spt_utils.patching import Head, HeadUncertainty, validate_heads
from spt_utils.viz.figures import Interval, _error, publication_figure
from spt_utils.viz.heatmap import HeadSelector, head_name
from spt_utils.viz.updates import LabProbe, LabRequest, LabState, LatestWins

# --- the live head lab: clicks change the knockout set, the model replies -----------------

LAB_CLASS = "spt-head-lab"  # CSS class of the lab's outer box (browser tests)
LAB_REPLY_CLASS = "spt-lab-reply"  # the reply under the knockout set
LAB_NUMBERS_CLASS = "spt-lab-numbers"  # the table of numbers (cells carry data-key/-value)
LAB_STATUS_CLASS = "spt-lab-status"  # busy / ready / error (data-state)


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
