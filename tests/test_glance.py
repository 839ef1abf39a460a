"""The README's results block (``scripts/glance.py``): written from the run of record's
summaries in ``docs/record/``, so it cannot drift from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def glance():
    spec = importlib.util.spec_from_file_location("glance", REPO / "scripts" / "glance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_block_is_the_scripts_output_for_the_committed_run_of_record(glance):
    readme = (REPO / "README.md").read_text()
    written = readme.split(glance.BEGIN + "\n", 1)[1].split(glance.END, 1)[0]
    assert written == glance.block(glance.load(glance.RECORD))


def test_the_block_reads_its_numbers_from_the_summaries(glance, tmp_path):
    for name in glance.RECORD_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((glance.RECORD / name).read_text())
    summary = json.loads((tmp_path / "knockout/summary.json").read_text())
    summary["verdict"] = "A VERDICT OF NO RUN"
    (tmp_path / "knockout/summary.json").write_text(json.dumps(summary))
    assert "verdict **A VERDICT OF NO RUN**" in glance.block(glance.load(tmp_path))
    (tmp_path / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        glance.load(tmp_path)


def test_the_block_names_failed_and_undecided_parts_of_the_claim(glance):
    saved = glance.load(glance.RECORD)
    claim = saved["results.json"]["claim"]
    keys = list(claim["checks"])
    claim["checks"] = {key: {**check, "passed": True} for key, check in claim["checks"].items()}
    claim["checks"][keys[1]]["passed"] = None
    claim["holds"] = None
    assert f"**is undecided at this n** (undecided: {keys[1]})." in glance.block(saved)
    claim["checks"][keys[0]]["passed"], claim["holds"] = False, False
    assert (f"**does not hold** (failed: {keys[0]}) (undecided: {keys[1]})."
            in glance.block(saved))


def test_rewrite_replaces_only_the_block(glance, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{glance.BEGIN}\nold\n{glance.END}\n\n## Rest\n")
    glance.rewrite(readme, "new\n")
    assert readme.read_text() == f"# Title\n\n{glance.BEGIN}\nnew\n{glance.END}\n\n## Rest\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- glance --> … <!-- /glance --> markers"):
        glance.rewrite(readme, "new\n")


def test_the_readme_table_is_the_scripts_output_for_every_recorded_model(glance):
    """Issue 37: one table of every method on every model, from the committed records."""
    readme = (REPO / "README.md").read_text()
    written = readme.split(glance.TABLE_BEGIN + "\n", 1)[1].split(glance.TABLE_END, 1)[0]
    assert written == glance.models_block(glance.load_models())


def _record(folder, model, profile="cpu", seed=0):
    """A model's record: the run of record's results under another model's manifest."""
    folder.mkdir(parents=True)
    manifest = json.loads((REPO / "docs/record/manifest.json").read_text())
    manifest.update(model=model, profile=profile, seed=seed)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "results.json").write_text((REPO / "docs/record/results.json").read_text())


def test_the_table_has_a_row_per_method_and_model_and_each_runs_command(glance, tmp_path):
    _record(tmp_path / "record", "organism-a")
    _record(tmp_path / "models" / "model-b", "model-b", profile="full", seed=3)
    results = json.loads((tmp_path / "models/model-b/results.json").read_text())
    results["results"]["spt"]["admitted"] = {"value": 0.5, "low": 0.25, "high": 0.75,
                                             "k": 7, "n": 14}
    (tmp_path / "models/model-b/results.json").write_text(json.dumps(results))
    text = glance.models_block(glance.load_models(tmp_path / "record", tmp_path / "models"))
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 * len(results["results"])
    assert "| `model-b` | spt | 0.50 [0.25, 0.75] (7/14) |" in text
    assert "`SPT_MODEL=organism-a make run`" in text
    assert "`SPT_MODEL=model-b SPT_PROFILE=full SPT_SEED=3 make run`" in text
    _record(tmp_path / "models" / "again", "organism-a")
    with pytest.raises(ValueError, match="organism-a recorded more than once"):
        glance.load_models(tmp_path / "record", tmp_path / "models")


def test_a_run_finished_at_several_commits_names_each_with_its_notebooks(glance):
    notebooks = [f"0{i}_x.ipynb" for i in range(7)]
    manifest = {"git_commit": "c" * 40, "timings_s": dict.fromkeys(notebooks, 1.0)}
    assert glance.commits(manifest) == "commit ccccccc"  # none recorded per notebook
    manifest["notebook_commits"] = dict.fromkeys(notebooks, "a" * 40)
    assert glance.commits(manifest) == "commit aaaaaaa"  # not the latest start's
    manifest["notebook_commits"] |= {"02_x.ipynb": "c" * 40, "03_x.ipynb": "c" * 40,
                                     "05_x.ipynb": "c" * 40, "06_x.ipynb": "c" * 40,
                                     "04_x.ipynb": "b" * 40}
    assert glance.commits(manifest) == (
        "commits aaaaaaa (00-01), ccccccc (02-03, 05-06), bbbbbbb (04)")
    del manifest["notebook_commits"]["00_x.ipynb"]  # finished before commits were recorded
    assert glance.commits(manifest).startswith("commits unknown (00), aaaaaaa (01), ")
    assert glance.commits({"git_commit": None}) == "commit unknown"


def test_recording_a_model_twice_is_refused_before_anything_is_written(glance, tmp_path,
                                                                       monkeypatch):
    _record(tmp_path / "record", "organism-a")
    for name in glance.RECORD_FILES:  # the run of record's other summaries
        if not (tmp_path / "record" / name).exists():
            (tmp_path / "record" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "record" / name).write_text((glance.RECORD / name).read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"{glance.BEGIN}\nold\n{glance.END}\n{glance.TABLE_BEGIN}\nold\n"
                      f"{glance.TABLE_END}\n")
    monkeypatch.setattr(glance, "RECORD", tmp_path / "record")
    monkeypatch.setattr(glance, "MODELS", tmp_path / "models")
    monkeypatch.setattr(glance, "REPO", tmp_path)
    monkeypatch.setattr("sys.argv", ["glance", str(tmp_path / "record"), "--model"])
    with pytest.raises(SystemExit, match="organism-a is the run of record's model"):
        glance.main()
    assert not (tmp_path / "models").exists() and "old" in readme.read_text()
    _record(tmp_path / "run", "model-b")
    monkeypatch.setattr("sys.argv", ["glance", str(tmp_path / "run"), "--model"])
    glance.main()
    assert (tmp_path / "models/model-b/results.json").is_file()
    assert "| `model-b` | spt |" in readme.read_text()
    for name in glance.RECORD_FILES:  # the same model as a run of record: refused
        if not (tmp_path / "run" / name).exists():
            (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "run" / name).write_text((glance.RECORD / name).read_text())
    before = readme.read_text()
    monkeypatch.setattr("sys.argv", ["glance", str(tmp_path / "run"), "--record"])
    with pytest.raises(SystemExit, match="records this model already"):
        glance.main()
    assert readme.read_text() == before
