"""The pipeline's parameters, profiles and resume rules (no notebook is executed here)."""

import ast
import json

import nbformat
import pytest

from spt_utils import pipeline

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


def test_options_override_the_profile_and_must_be_declared():
    tuning_notebook = next(p for p in pipeline.notebook_paths() if p.name.startswith("04"))
    assert pipeline.PROFILES["paper"]["04"]["dtype"] == "bfloat16"
    chosen = pipeline.parameters_for(tuning_notebook, "paper", {"seed": 1},
                                     {"dtype": "float32", "device": None})
    assert chosen["dtype"] == "float32" and chosen["seed"] == 1 and "device" not in chosen
    assert chosen["spt_steps"] == 240
    first = pipeline.notebook_paths()[0]
    assert "device" not in parameters_cell_names(first)  # until the notebooks declare it
    with pytest.raises(pipeline.RunError, match=r"00_meet_the_model.ipynb: its parameters cell "
                                                r"has no 'device', so --device cannot"):
        pipeline.parameters_for(first, "cpu", {}, {"device": "cuda"})


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
