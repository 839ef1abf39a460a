"""Execute every notebook in order with the `test` profile (small parameters)."""

import json

import nbformat
import pytest

from spt_utils import pipeline

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module")
def executed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    figures = tmp_path_factory.mktemp("figures")
    manifest = pipeline.run_pipeline(run_dir, profile="test", figures_dir=figures)
    return run_dir, manifest


def test_committed_notebooks_have_no_outputs():
    for path in pipeline.notebook_paths():
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert any("parameters" in c.metadata.get("tags", []) for c in code), path.name


def test_every_notebook_executes(executed_run):
    run_dir, manifest = executed_run
    for path in pipeline.notebook_paths():
        assert (run_dir / path.name).exists()
        assert path.name in manifest["timings_s"]
    saved = json.loads((run_dir / "manifest.json").read_text())
    assert saved["profile"] == "test" and saved["versions"]["transformer-lens"] == "4.3.0"


def test_resume_skips_finished_notebooks(executed_run, capsys):
    run_dir, _ = executed_run
    pipeline.run_pipeline(run_dir, profile="test", notebooks=pipeline.notebook_paths()[:1])
    assert "already finished" in capsys.readouterr().out


def test_the_head_lab_saved_its_scripted_state(executed_run):
    """Notebook 03 clicked the top 2 heads headlessly and saved what its lab showed."""
    run_dir, _ = executed_run
    state = json.loads((run_dir / "knockout" / "lab_state.json").read_text())
    top = json.loads((run_dir / "heads.json").read_text())["heads"][:2]
    assert state["heads"] == top and state["script"] == top
    assert isinstance(state["reply"], str) and state["reply"]
    assert isinstance(state["admitted"], bool) and isinstance(state["kept"], bool)
    per_pair, pairs = state["per_pair"], state["pairs"]
    assert pairs["n_pairs"] == len(per_pair) >= 1
    assert state["pair"] in per_pair and state["pair"]["question_id"] == state["question"]["id"]

    def mean(key):
        return sum(p[key] for p in per_pair) / len(per_pair)

    effect = mean("clean_reference") - mean("clean_counterfactual")
    remaining = (mean("reference") - mean("counterfactual")) / effect
    assert pairs["remaining"]["value"] == pytest.approx(remaining, rel=1e-4, abs=1e-6)
    for key in ("reference", "counterfactual", "remaining"):
        assert pairs[key]["low"] <= pairs[key]["value"] <= pairs[key]["high"]
