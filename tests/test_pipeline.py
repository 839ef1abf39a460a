"""The pipeline's parameters, profiles and resume rules (no notebook is executed here)."""

import ast
import dataclasses
import json
import runpy
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from spt_utils import models, organism, pipeline

COMMON = {"model_name", "run_dir", "seed", "figures_dir"}


def parameters_cell_names(path) -> set[str]:
    """Names the notebook's parameters cell assigns, read with nbformat (not the pipeline)."""
    notebook = nbformat.read(path, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    return {node.targets[0].id for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign)}


def test_profiles_name_existing_notebooks():
    prefixes = {path.name[:2] for path in pipeline.notebook_paths()}
    assert {"00", "01", "02", "03", "04", "05"} <= prefixes
    for profile, overrides in pipeline.PROFILES.items():
        assert set(overrides) <= prefixes, profile


@pytest.mark.parametrize("profile", sorted(pipeline.PROFILES))
def test_profile_keys_are_parameters_of_their_notebook(profile):
    for path in pipeline.notebook_paths():
        declared = parameters_cell_names(path)
        assert COMMON <= declared, path.name
        unknown = set(pipeline.PROFILES[profile].get(path.name[:2], {})) - declared
        assert not unknown, f"{profile} profile: {path.name} has no parameter {unknown}"
        assert pipeline.notebook_parameters(path) == declared


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown profile 'gpu'"):
        pipeline.parameters_for(pipeline.notebook_paths()[0], "gpu", {})


def test_options_override_the_profile_and_must_be_declared(tmp_path):
    tuning_notebook = next(p for p in pipeline.notebook_paths() if p.name.startswith("04"))
    assert pipeline.PROFILES["paper"]["04"]["autocast_dtype"] == "bfloat16"
    chosen = pipeline.parameters_for(tuning_notebook, "paper", {"seed": 1},
                                     {"autocast_dtype": "float32", "device": None})
    assert chosen["autocast_dtype"] == "float32" and chosen["seed"] == 1
    assert "device" not in chosen and chosen["spt_steps"] == 240
    bare = tmp_path / "07_bare.ipynb"
    cell = nbformat.v4.new_code_cell("model_name = 'x'", metadata={"tags": ["parameters"]})
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), bare)
    with pytest.raises(pipeline.RunError, match=r"07_bare.ipynb: its parameters cell has no "
                                                r"'device' to set"):
        pipeline.parameters_for(bare, "cpu", {}, {"device": "cuda"})


def test_device_and_dtype_reach_every_notebook_that_loads_a_model(tmp_path, monkeypatch):
    """run_pipeline's device/dtype become each notebook's device/model_dtype parameters;
    notebook 04's training autocast keeps its profile value."""
    import papermill

    executed = {}
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda source, target, parameters, **_: executed.update(
                            {Path(source).name: parameters}))
    pipeline.run_pipeline(tmp_path, profile="paper", figures_dir=tmp_path, device="cpu",
                          dtype="bfloat16")
    assert set(executed) == {p.name for p in pipeline.notebook_paths()}
    for name, parameters in executed.items():
        assert (parameters["device"], parameters["model_dtype"]) == ("cpu", "bfloat16"), name
    tuning = next(v for k, v in executed.items() if k.startswith("04"))
    assert tuning["autocast_dtype"] == pipeline.PROFILES["paper"]["04"]["autocast_dtype"]
    executed.clear()
    pipeline.run_pipeline(tmp_path / "defaults", profile="paper", figures_dir=tmp_path)
    assert all("device" not in p and "model_dtype" not in p for p in executed.values())


def test_a_run_records_the_commit_each_notebook_ran_at(tmp_path, monkeypatch):
    """Read as each notebook starts (commits may land during a long run), kept on resume."""
    import papermill

    notebooks = pipeline.notebook_paths()
    commits = iter(["began", "began", *[f"later {i}" for i in range(len(notebooks))]])
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "git_commit", lambda: next(commits))
    pipeline.run_pipeline(tmp_path, profile="test", figures_dir=tmp_path, notebooks=notebooks[:1])
    pipeline.run_pipeline(tmp_path, profile="test", figures_dir=tmp_path)
    saved = json.loads((tmp_path / pipeline.MANIFEST).read_text())
    # the first start and its notebook, then the resume's start and one commit per notebook
    assert saved["notebook_commits"] == {notebooks[0].name: "began"} | {
        path.name: f"later {index}" for index, path in enumerate(notebooks[1:], start=1)}
    assert saved["git_commit"] == "later 0"  # the commit of the latest start


def model_loads(path) -> list[ast.Call]:
    """Every ``models.load_model(...)`` call in the notebook's code cells."""
    notebook = nbformat.read(path, as_version=4)
    trees = [ast.parse(c.source) for c in notebook.cells if c.cell_type == "code"]
    return [node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "load_model"]


@pytest.mark.parametrize("path", pipeline.notebook_paths(), ids=lambda p: p.name[:2])
def test_every_model_load_takes_the_device_and_dtype_parameters(path):
    """Each notebook declares ``device = None`` and ``model_dtype = None`` (the library's
    default placement) and passes them to every ``models.load_model`` call."""
    defaults = {}
    notebook = nbformat.read(path, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    exec(cell.source, {}, defaults)  # noqa: S102 - the repository's own notebook
    assert defaults["device"] is None and defaults["model_dtype"] is None
    loads = model_loads(path)
    assert loads, f"{path.name} loads no model"
    for call in loads:
        passed = {k.arg: k.value.id for k in call.keywords if isinstance(k.value, ast.Name)}
        assert passed.get("device") == "device" and passed.get("dtype") == "model_dtype", (
            f"{path.name}: line {call.lineno} of its cell: {ast.unparse(call)}")


def test_a_notebook_without_one_parameters_cell_is_a_clear_error(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    path = tmp_path / "07_x.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(pipeline.RunError, match="07_x.ipynb: 0 cells are tagged 'parameters'"):
        pipeline.notebook_parameters(path)


@pytest.mark.parametrize("field, value", [("model", "tiny-random-llama"), ("profile", "test"),
                                          ("seed", 1)])
def test_resuming_with_other_settings_is_refused(tmp_path, field, value):
    started = {"model": "smollm2-135m-instruct", "profile": "cpu", "seed": 0}
    (tmp_path / "manifest.json").write_text(json.dumps({**started, "timings_s": {"x": 1}}))
    before = (tmp_path / "manifest.json").read_text()
    settings = {**started, field: value}
    with pytest.raises(pipeline.RunError, match=rf"manifest.json: field '{field}' is "
                                                rf"{started[field]!r} but this run asks for "
                                                rf"{value!r}"):
        pipeline.run_pipeline(tmp_path, model_name=settings["model"],
                              profile=settings["profile"], seed=settings["seed"])
    assert (tmp_path / "manifest.json").read_text() == before
    assert not (tmp_path / pipeline.DONE_DIR).exists()  # refused before anything ran
    pipeline.check_resume(tmp_path, started)  # the settings it began with are accepted


def test_a_damaged_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(pipeline.RunError, match="manifest.json: not a JSON manifest"):
        pipeline.read_manifest(tmp_path)


def test_time_left_scales_the_recorded_times_by_this_runs_pace(monkeypatch):
    default, other = models.RUN_MODEL, "another-model"
    monkeypatch.setitem(pipeline.RECORDED_TIMINGS_S, ("cpu", default),
                        {"00": 10, "01": 30, "02": 60})
    # nothing finished yet: the recorded times themselves
    assert pipeline.time_left("cpu", default, {}, ["00_a.ipynb", "01_b.ipynb"]) == 40
    # this run took twice the record so far, so the rest should too
    assert pipeline.time_left("cpu", default, {"00_a.ipynb": 20, "01_b.ipynb": 60},
                              ["02_c.ipynb"]) == 120
    assert pipeline.time_left("cpu", default, {"00_a.ipynb": 5}, []) == 0
    # notebook 00 planting the organism (minutes, not seconds) does not set the pace
    assert pipeline.time_left("cpu", default, {"00_a.ipynb": 700}, ["01_b.ipynb"]) == 30
    # a model with no record of its own is paced against the default model's
    assert pipeline.time_left("cpu", other, {"01_b.ipynb": 15}, ["02_c.ipynb"]) == 30
    # ... and one with its own record against its own (another split of the time)
    monkeypatch.setitem(pipeline.RECORDED_TIMINGS_S, ("cpu", other),
                        {"00": 10, "01": 5, "02": 100})
    assert pipeline.time_left("cpu", other, {"01_b.ipynb": 10}, ["02_c.ipynb"]) == 200
    # a profile with no record of the default model: its first record
    monkeypatch.setattr(pipeline, "RECORDED_TIMINGS_S", {("full", other): {"00": 1, "01": 7}})
    assert pipeline.time_left("full", default, {}, ["01_b.ipynb"]) == 7
    # no record for the profile or for one notebook: no estimate
    assert pipeline.time_left("test", default, {}, ["00_a.ipynb"]) is None
    assert pipeline.time_left("cpu", default, {}, ["07_new.ipynb"]) is None


def test_every_recorded_timing_names_a_profile_a_model_and_every_notebook():
    notebooks = {path.name[:2] for path in pipeline.notebook_paths()}
    for (profile, model_name), recorded in pipeline.RECORDED_TIMINGS_S.items():
        assert profile in pipeline.PROFILES, profile
        models.check_name(model_name)  # a model load_model resolves
        assert set(recorded) == notebooks, (profile, model_name)


def test_a_run_records_its_organism_and_refuses_another_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SPT_CACHE", str(tmp_path / "cache"))
    name = models.TINY_PREFIX + "llama-sycophant"
    assert pipeline.organism_record(name) is None  # not built yet
    assert pipeline.organism_record("smollm2-135m-instruct") is None  # not an organism
    card = organism.ensure(name, progress=False)
    record = pipeline.organism_record(name)
    assert record == {"planted_heads": card["planted_heads"], "recipe": card["recipe"],
                      "sha256": card["sha256"]}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"model": name, "organism": record}))
    before = (run_dir / "manifest.json").read_text()
    pipeline.check_organism(run_dir, name, record)  # the same organism: accepted
    pipeline.check_organism(run_dir, name, None)  # none recorded yet: accepted
    refused = "field 'organism' records other planted heads, head deltas or recipe"
    recipe = organism.RECIPES[name]
    # the recipe changed in the code, the cache not yet planted again (a notebook would)
    monkeypatch.setitem(organism.RECIPES, name, dataclasses.replace(recipe, seed=recipe.seed + 1))
    with pytest.raises(pipeline.RunError, match=refused):
        pipeline.run_pipeline(run_dir, model_name=name, profile="test")
    # planted again with the recipe the run began with, but other deltas (a corrupt rebuild)
    monkeypatch.setitem(organism.RECIPES, name, recipe)
    pipeline.check_organism(run_dir, name, record)
    changed = {**record, "sha256": {models.ORGANISM_DELTAS: "0" * 64}}
    with pytest.raises(pipeline.RunError, match=refused):
        pipeline.check_organism(run_dir, name, changed)
    assert (run_dir / "manifest.json").read_text() == before
    assert not (run_dir / pipeline.DONE_DIR).exists()  # refused before anything ran


def test_make_run_prints_a_progress_line_per_notebook(tmp_path, monkeypatch, capsys):
    """``python -m spt_utils.pipeline`` (what ``make run`` calls) logs each notebook's time and
    an estimate of what remains from the profile's recorded timings. Papermill is faked and
    each notebook "takes" twice its recorded time on a fake clock, so the estimate is twice
    the record of the notebooks left (once notebook 00, which sets no pace, is not alone)."""
    import papermill

    recorded = pipeline.RECORDED_TIMINGS_S["cpu", models.RUN_MODEL]
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def execute(source, target, **kwargs):
        clock[0] += 2 * recorded[Path(source).name[:2]]

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    for variable in ("SPT_MODEL", "SPT_PROFILE", "SPT_SEED"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("sys.argv", ["pipeline", "--model", models.TINY_MODEL, "--run-dir",
                                     str(tmp_path / "run"), "--figures-dir", str(tmp_path)])
    with pytest.warns(RuntimeWarning, match="found in sys.modules"), \
            pytest.raises(SystemExit) as exited:
        runpy.run_module("spt_utils.pipeline", run_name="__main__")
    assert exited.value.code == 0
    names = [path.name for path in pipeline.notebook_paths()]
    lines = [line for line in capsys.readouterr().err.splitlines() if " s (this run" in line]
    expected, so_far = [], 0.0
    for number, name in enumerate(names):
        took = 2 * recorded[name[:2]]
        so_far += took
        pace = 1 if number == 0 else 2  # notebook 00 alone sets no pace
        left = pace * sum(recorded[later[:2]] for later in names[number + 1:])
        expected.append(f"[spt] {name}: {round(float(took), 1)} s (this run so far: "
                        f"{so_far:.0f} s; about {left / 60:.0f} min left)")
    assert lines == expected


def test_notebooks_run_over_local_sockets_without_a_warning_or_widget_state(
    tmp_path, capfd, monkeypatch
):
    """ipykernel warns on every start over TCP ("without encryption"); the pipeline's
    kernels use IPC sockets in a temporary folder, removed after each notebook. Widgets'
    state is not saved with the executed notebook."""
    source = tmp_path / "07_hello.ipynb"
    parameters = nbformat.v4.new_code_cell(
        "model_name = run_dir = figures_dir = None\nseed = 0",
        metadata={"tags": ["parameters"]})
    cells = [parameters, nbformat.v4.new_code_cell("print(6 * 7)"),
             nbformat.v4.new_code_cell("import ipywidgets; ipywidgets.IntSlider(value=3)")]
    kernel = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernel}),
                   source)
    sockets = tmp_path / "tmp"
    sockets.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sockets))
    capfd.readouterr()
    pipeline.run_pipeline(tmp_path / "run", model_name=models.TINY_MODEL, profile="test",
                          figures_dir=tmp_path, notebooks=[source])
    executed = nbformat.read(tmp_path / "run" / source.name, as_version=4)
    assert executed.cells[-2].outputs[-1]["text"].endswith("42\n")
    # widgets' state is not saved with the executed notebook (a plotly one weighs 5 MB)
    assert "application/vnd.jupyter.widget-view+json" in executed.cells[-1].outputs[-1]["data"]
    assert "widgets" not in executed.metadata
    assert "without encryption" not in capfd.readouterr().err
    assert not list(sockets.iterdir())  # the sockets' folder is gone
