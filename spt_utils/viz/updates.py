"""The head lab's updates: what it asks of the model (:class:`LabProbe`), one update's
request and what it shows (:class:`LabRequest`, :class:`LabState`), and the worker thread
that runs them, the latest change winning (:class:`LatestWins`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from spt_utils.patching import Head


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
