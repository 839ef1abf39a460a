"""Paper-ready tables: booktabs LaTeX and CSV with intervals, escaping, markdown input."""

import math
import re

import pandas as pd
import pytest

from spt_utils import evaluation, stats, tables

UNESCAPED_AMPERSAND = re.compile(r"(?<!\\)&")


def parse_booktabs(tex: str) -> tuple[str, list[list[str]]]:
    """The column spec and the rows (header first) of a booktabs tabular; an AssertionError
    when the structure is not begin, toprule, header, midrule, rows, bottomrule, end."""
    lines = tex.strip().splitlines()
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0])
    assert spec, lines[0]
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule"
    assert lines[-2] == r"\bottomrule" and lines[-1] == r"\end{tabular}"
    body = [lines[2], *lines[4:-2]]
    rows = []
    for line in body:
        assert line.endswith(r" \\"), line
        rows.append([cell.strip() for cell in UNESCAPED_AMPERSAND.split(line[:-3])])
    assert all(len(row) == len(spec.group(1)) for row in rows), rows
    return spec.group(1), rows


def test_cells_print_intervals_rates_numbers_and_gaps():
    assert tables.cell_text({"value": 0.421, "low": 0.3149, "high": 0.5551}) == \
        "0.42 [0.31, 0.56]"
    assert tables.cell_text({"value": 0.421, "low": 0.3149, "high": 0.5551}, digits=3) == \
        "0.421 [0.315, 0.555]"
    rate = stats.rate([True, False, True, True])
    assert tables.cell_text(rate) == stats.format_rate(rate)
    assert tables.cell_text(rate).endswith("(3/4)")
    assert tables.cell_text(None) == tables.cell_text(math.nan) == "–"
    assert tables.cell_text(0.5) == "0.50" and tables.cell_text(7) == "7"
    assert tables.cell_text(True) == "True" and tables.cell_text("L3H1") == "L3H1"
    with pytest.raises(ValueError, match="a mapping must be an interval"):
        tables.cell_text({"mean": 0.5})
    with pytest.raises(ValueError, match="not text, a number"):
        tables.cell_text([1, 2])


def test_latex_escapes_specials_and_the_notebooks_unicode():
    assert tables.latex_escape("p_random 50% & $x #1 {a}") == \
        r"p\_random 50\% \& \$x \#1 \{a\}"
    assert tables.latex_escape(r"a\b ~ ^") == \
        r"a\textbackslash{}b \textasciitilde{} \textasciicircum{}"
    assert tables.latex_escape("KL(base‖method) ↓, −0.2 – 2→3") == \
        r"KL(base$\|$method) $\downarrow$, $-$0.2 -- 2$\rightarrow$3"


def test_write_table_writes_booktabs_and_csv_with_the_same_cells(tmp_path):
    rows = [
        {"head": "L3_H1", "score [95% CI]": {"value": 0.42, "low": 0.31, "high": 0.55},
         "share %": 0.875, "n": 16},
        {"head": "L0_H2", "score [95% CI]": {"value": -0.1, "low": -0.25, "high": 0.05},
         "share %": math.nan, "n": 16},
    ]
    written = tables.write_table(rows, tmp_path, "02_heads")
    assert written == [tmp_path / "02_heads.tex", tmp_path / "02_heads.csv"]
    spec, parsed = parse_booktabs(written[0].read_text())
    assert spec == "llrr"  # text and interval columns left, numbers right
    assert parsed[0] == [r"head", r"score [95\% CI]", r"share \%", "n"]
    assert parsed[1] == [r"L3\_H1", "0.42 [0.31, 0.55]", "0.88", "16"]
    assert parsed[2] == [r"L0\_H2", "-0.10 [-0.25, 0.05]", "--", "16"]
    csv = pd.read_csv(written[1], dtype=str, keep_default_na=False)
    assert list(csv.columns) == ["head", "score [95% CI]", "share %", "n"]
    assert csv.values.tolist() == [["L3_H1", "0.42 [0.31, 0.55]", "0.88", "16"],
                                   ["L0_H2", "-0.10 [-0.25, 0.05]", "–", "16"]]


def test_the_booktabs_check_catches_a_broken_row():
    tex = "\n".join([r"\begin{tabular}{ll}", r"\toprule", r"a & b \\", r"\midrule",
                     r"50% & 1 & 2 \\", r"\bottomrule", r"\end{tabular}"])
    with pytest.raises(AssertionError):
        parse_booktabs(tex)


def test_a_frame_keeps_a_named_index_and_an_empty_table_is_refused(tmp_path):
    frame = pd.DataFrame({"rate": [0.25, 0.5]}, index=pd.Index(["base", "spt"], name="method"))
    spec, parsed = parse_booktabs(tables.write_table(frame, tmp_path, "t")[0].read_text())
    assert spec == "lr" and parsed == [["method", "rate"], ["base", "0.25"], ["spt", "0.50"]]
    with pytest.raises(ValueError, match="no rows"):
        tables.write_table([], tmp_path, "empty")


def test_the_results_table_of_notebook_05_round_trips_through_markdown(tmp_path):
    rate = stats.rate([True, False, False, True, True])
    results = {name: {"n_correct_before": 5, "n_wrong_before": 0, "admitted": rate,
                      "truthfulness": stats.complement(rate), "kl": kl,
                      "paired": {"admitted": {"p": 0.5, "only_base": 1, "only_other": 2}}}
               for name, kl in (("base", {"value": 0.0, "low": 0.0, "high": 0.0, "n": 4}),
                                ("spt_heads", {"value": 0.0123, "low": 0.01, "high": 0.0151,
                                               "n": 4}))}
    markdown = evaluation.results_table(results)
    frame = tables.from_markdown(markdown)
    assert list(frame["method"]) == ["base", "spt_heads"]
    assert frame.iloc[1]["admitted mistake (correct before) ↓"] == stats.format_rate(rate)
    kl_column = next(c for c in frame.columns if c.startswith("KL(base‖method)"))
    assert frame.iloc[1][kl_column] == "0.0123 [0.0100, 0.0151] (n=4)"
    spec, parsed = parse_booktabs(tables.write_table(frame, tmp_path, "05")[0].read_text())
    assert len(parsed) == 3 and len(spec) == len(frame.columns)
    assert parsed[2][0] == r"spt\_heads"


def test_from_markdown_names_the_broken_line():
    with pytest.raises(ValueError, match="needs a header line and a rule"):
        tables.from_markdown("| a |")
    with pytest.raises(ValueError, match=re.escape("line 2 is not a |---| rule")):
        tables.from_markdown("| a | b |\n| 1 | 2 |")
    with pytest.raises(ValueError, match="line 3 is not a table row"):
        tables.from_markdown("| a | b |\n|---|---|\nplain text")
    with pytest.raises(ValueError, match="line 4 has 3 cells, the header 2"):
        tables.from_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n| 1 | 2 | 3 |")
