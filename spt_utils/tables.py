"""Paper-ready tables: the notebooks' results tables as booktabs LaTeX and CSV.

:func:`write_table` writes ``<name>.tex`` (a ``tabular`` with ``\\toprule``, ``\\midrule`` and
``\\bottomrule`` from the booktabs package, special characters escaped) and ``<name>.csv``
with the same cells. A cell may be text, a number, ``None`` (written "–"), an interval
``{"value", "low", "high"}`` (written ``0.42 [0.31, 0.55]``) or a rate of
:mod:`spt_utils.stats` (with ``k`` and ``n``: ``0.42 [0.31, 0.55] (21/50)``).
:func:`from_markdown` reads a markdown table (e.g. ``evaluation.results_table``) so that the
printed table and the written one are the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import pandas as pd

from spt_utils.io import atomic_write
from spt_utils.stats import format_rate

MISSING = "–"
# LaTeX's special characters, and the Unicode signs of the notebooks' headers and cells that
# pdfLaTeX's default input encoding does not know.
_LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "–": "--", "—": "---", "−": "$-$", "→": r"$\rightarrow$", "↑": r"$\uparrow$",
    "↓": r"$\downarrow$", "‖": r"$\|$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$",
    "…": r"\ldots{}",
}
_LATEX_PATTERN = re.compile("|".join(re.escape(char) for char in _LATEX))


def format_interval(value: float, low: float, high: float, digits: int = 2) -> str:
    """``0.42 [0.31, 0.55]``."""
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def cell_text(cell: Any, digits: int = 2) -> str:
    """A table cell as text: intervals and rates with their bounds, floats with ``digits``
    decimals, ``None`` and NaN as "–"."""
    if cell is None:
        return MISSING
    if isinstance(cell, Mapping):
        if {"k", "n"} <= cell.keys():
            return format_rate(cell)
        if {"value", "low", "high"} <= cell.keys():
            return format_interval(cell["value"], cell["low"], cell["high"], digits)
        raise ValueError(f"table cell {dict(cell)!r}: a mapping must be an interval "
                         "{'value', 'low', 'high'} or a rate with 'k' and 'n'")
    if isinstance(cell, bool | str | Integral):
        return str(cell)
    if isinstance(cell, Real):
        return MISSING if math.isnan(cell) else f"{cell:.{digits}f}"
    raise ValueError(f"table cell {cell!r}: not text, a number, an interval or a rate")


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters (and the notebooks' Unicode signs) escaped."""
    return _LATEX_PATTERN.sub(lambda match: _LATEX[match.group()], text)


def _frame(table: pd.DataFrame | Sequence[Mapping[str, Any]], digits: int) -> pd.DataFrame:
    """The table with every cell as text (a frame's index is kept when it is named)."""
    frame = pd.DataFrame(list(table)) if not isinstance(table, pd.DataFrame) else table
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()
    if frame.empty:
        raise ValueError("write_table: the table has no rows or no columns")
    return frame.map(lambda cell: cell_text(cell, digits)).rename(columns=str)


def _numeric(column: pd.Series) -> bool:
    return bool(column.map(lambda text: re.fullmatch(r"[-+]?\d+(\.\d+)?|–", text) is not None)
                .all())


def booktabs(frame: pd.DataFrame) -> str:
    """A ``tabular`` of a text frame: numeric columns right-aligned, the others left."""
    columns = "".join("r" if _numeric(frame[c]) else "l" for c in frame.columns)
    lines = [rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\"
              for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(
    table: pd.DataFrame | Sequence[Mapping[str, Any]],
    directory: str | Path,
    name: str,
    *,
    digits: int = 2,
) -> list[Path]:
    """Write ``table`` (a frame or rows of ``column → cell``) as ``<name>.tex`` (booktabs)
    and ``<name>.csv`` under ``directory``, atomically; returns both paths."""
    frame = _frame(table, digits)
    directory = Path(directory)
    tex, csv = directory / f"{name}.tex", directory / f"{name}.csv"
    with atomic_write(tex) as handle:
        handle.write(booktabs(frame))
    with atomic_write(csv) as handle:
        frame.to_csv(handle, index=False)
    return [tex, csv]


def from_markdown(text: str) -> pd.DataFrame:
    """A markdown table (``| a | b |`` rows, the second a ``|---|`` rule) as a text frame."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 2:
        raise ValueError("from_markdown: a table needs a header line and a rule line")
    for number, line in enumerate(lines, 1):
        if not (line.startswith("|") and line.endswith("|")):
            raise ValueError(f"from_markdown: line {number} is not a table row: {line!r}")
    if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1]):
        raise ValueError(f"from_markdown: line 2 is not a |---| rule: {lines[1]!r}")
    rows = [[cell.strip() for cell in line[1:-1].split("|")] for line in lines]
    header, body = rows[0], rows[2:]
    for number, row in enumerate(body, 3):
        if len(row) != len(header):
            raise ValueError(f"from_markdown: line {number} has {len(row)} cells, the header "
                             f"{len(header)}")
    return pd.DataFrame(body, columns=header)
