"""Publication export: every figure as PDF, SVG, PNG and HTML, the static images of a
process rendered in one headless browser (:class:`KaleidoSession`)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import re
import threading
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from spt_utils.io import atomic_write

STATIC_FORMATS = ("pdf", "svg", "png")
_static_export_warned = False


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
        self._thread: threading.Thread | None = None
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
        self._thread = threading.Thread(target=self._loop.run_forever, name="kaleido",
                                        daemon=True)
        self._thread.start()
        self.launches += 1
        try:
            self._browser = self._call(enter())
        except Exception as error:
            self._error = error
            self._stop_loop()
            raise
        atexit.register(self.close)

    def _stop_loop(self) -> None:
        """Stop the loop, wait for its thread, and close it (its selector and self-pipe)."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)
        if not self._thread.is_alive():  # a loop still running cannot be closed
            self._loop.close()
        self._loop = self._thread = None

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

# what the renderers draw at random or from the clock: plotly.js's figure id in SVG ids,
# chromium's PDF creation and modification dates
_SVG_FIGURE_ID = re.compile(rb'<defs id="defs-([0-9a-f]{6})"')
_PDF_DATES = re.compile(rb"/(CreationDate|ModDate) \(D:\d{14}")


def _with_fixed_ids(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` whose traces have fixed uids (plotly draws random ones, which name
    gradients and ids in the SVG and HTML)."""
    fixed = go.Figure(fig)
    for index, trace in enumerate(fixed.data):
        trace.uid = trace.uid or f"trace{index}"
    return fixed


def reproducible(image: bytes, fmt: str) -> bytes:
    """``image`` with what differs between two renders of one figure fixed: in SVG the
    figure's random id (replaced everywhere by ``000000``), in PDF the dates (a fixed date of
    the same length, so the PDF's byte offsets stay right)."""
    if fmt == "svg" and (found := _SVG_FIGURE_ID.search(image)):
        return image.replace(found.group(1), b"000000")
    if fmt == "pdf":
        return _PDF_DATES.sub(lambda m: b"/" + m.group(1) + b" (D:20000101000000", image)
    return image


def export_figure(
    fig: go.Figure, figures_dir: str | Path, name: str, *, scale: float = 2.0
) -> list[Path]:
    """Write ``name`` as PDF, SVG, PNG (kaleido + chromium, one browser per process) and
    HTML under ``figures_dir``, byte-identical for the same figure (:func:`reproducible`).

    When static export fails (no browser), only HTML is written, with one warning per
    session. Every file is written atomically. Returns the written paths.
    """
    global _static_export_warned
    figures_dir = Path(figures_dir)
    fig = _with_fixed_ids(fig)
    html_path = figures_dir / f"{name}.html"
    with atomic_write(html_path) as handle:
        handle.write(fig.to_html(include_plotlyjs=True, full_html=True, div_id=name))
    written = [html_path]
    try:
        images = {fmt: reproducible(_session.render(fig, fmt, scale), fmt)
                  for fmt in STATIC_FORMATS}
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
