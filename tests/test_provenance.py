"""Provenance: every saved result records the run that made it, and a loader given
``expect=`` refuses a result made with another model or tokenizer (issue 15, item 6)."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spt_utils import ablation, data, io, models, patching, tuning, viz

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return models.make_tiny_tokenizer()


@pytest.fixture(scope="module")
def run(tokenizer) -> dict:
    return io.provenance(models.TINY_MODEL, tokenizer, profile="test", seed=3)


@pytest.fixture(scope="module")
def other_tokenizer_run(run) -> dict:
    other = models.make_tiny_tokenizer()
    other.add_tokens(["<not-in-the-tiny-vocabulary>"])
    return io.provenance(models.TINY_MODEL, other, profile="test", seed=3)


def test_the_record_holds_each_field(tokenizer, run):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(p.split("==")[1] for p in pins if p.startswith("transformer-lens=="))
    assert run["model"] == models.TINY_MODEL and run["profile"] == "test" and run["seed"] == 3
    assert run["git_commit"] == commit
    assert run["transformer_lens"] == pinned
    assert set(run) == set(io.PROVENANCE_FIELDS)
    # the fingerprint follows the vocabulary: equal for an identical tokenizer, not otherwise
    assert run["tokenizer"] == io.tokenizer_fingerprint(models.make_tiny_tokenizer())
    assert json.dumps(run)  # JSON-serialisable (heads.json, spt_tuning.json, metadata)


def test_check_provenance_names_the_field(run, other_tokenizer_run):
    io.check_provenance(run, dict(run, seed=99, profile="cpu"), "x.pt")  # only identity counts
    io.check_provenance(None, None, "x.pt")  # nothing expected: nothing checked
    with pytest.raises(io.ProvenanceError, match=r"x.pt: field 'provenance.model' is "
                                                 r"'tiny-random-llama' but this run's is 'm'"):
        io.check_provenance(run, dict(run, model="m"), "x.pt")
    with pytest.raises(io.ProvenanceError, match=r"field 'provenance.tokenizer'"):
        io.check_provenance(run, other_tokenizer_run, "x.pt")
    with pytest.raises(io.ProvenanceError, match="x.pt: no provenance recorded"):
        io.check_provenance(None, run, "x.pt")
    damaged = {k: v for k, v in run.items() if k != "seed"}
    with pytest.raises(io.ProvenanceError, match=r"field 'provenance.seed' is missing"):
        io.check_provenance(damaged, run, "x.pt")
    with pytest.raises(io.ProvenanceError, match="must be a mapping"):
        io.check_provenance("tiny-random-llama", run, "x.pt")


def expect_round_trip(load, path: Path, run: dict, other: dict) -> None:
    """``load(path, expect=...)``: accepts ``run``, refuses ``other``'s tokenizer."""
    load(path, expect=run)
    with pytest.raises(io.ProvenanceError, match=rf"{path.name}.*'provenance.tokenizer'"):
        load(path, expect=other)


def test_heads_json(tmp_path, run, other_tokenizer_run):
    path = tmp_path / "heads.json"
    patching.save_heads(path, [(1, 2)], provenance=run, metric="score")
    assert json.loads(path.read_text())["provenance"] == run
    expect_round_trip(patching.load_heads, path, run, other_tokenizer_run)
    patching.save_heads(path, [(1, 2)])  # written without provenance: loads unchecked only
    assert patching.load_heads(path) == [(1, 2)]
    with pytest.raises(io.ProvenanceError, match="heads.json: no provenance recorded"):
        patching.load_heads(path, expect=run)


def test_patching_scores(tmp_path, run, other_tokenizer_run):
    path = tmp_path / "patching.pt"
    score = torch.tensor([[0.2, -0.1], [0.4, 0.0]])
    scores = patching.HeadScores("path", score, score, patching.Calibration(0.0, 1.0))
    scores.save(path, provenance=run)  # the keyword records it; the scores keep none
    assert scores.provenance is None
    assert torch.load(path, weights_only=True)["provenance"] == run
    expect_round_trip(patching.HeadScores.load, path, run, other_tokenizer_run)
    assert patching.HeadScores.load(path).provenance == run


def test_head_means(tmp_path, run, other_tokenizer_run):
    path = tmp_path / "means.pt"
    means = ablation.HeadMeans(torch.randn(5, 2, 4, 16), counts=torch.ones(5), n_prompts=1,
                               provenance=run)
    means.save(path)
    expect_round_trip(ablation.HeadMeans.load, path, run, other_tokenizer_run)
    ablation.HeadMeans(torch.randn(5, 2, 4, 16), counts=torch.ones(5), n_prompts=1).save(path)
    with pytest.raises(io.ProvenanceError, match="means.pt: no provenance recorded"):
        ablation.HeadMeans.load(path, expect=run)
    means.save(path, provenance=other_tokenizer_run)  # the keyword wins over the field
    assert ablation.HeadMeans.load(path).provenance == other_tokenizer_run


def test_patching_pairs(tmp_path, tokenizer, run, other_tokenizer_run):
    path = tmp_path / "pairs.pt"
    pairs = data.build_patching_pairs(data.load_starter().select(range(2)), tokenizer)
    pairs.save(path, provenance=run)
    expect_round_trip(data.PatchingPairs.load, path, run, other_tokenizer_run)
    assert data.PatchingPairs.load(path).first(1).provenance == run


def test_synthesized_data_records_provenance(tokenizer, tmp_path, run, other_tokenizer_run):
    questions = data.load_starter().select(range(30))
    answers = {q["id"]: {"answer": f"It is {q['correct_answer']}.", "correct": i % 2 == 0}
               for i, q in enumerate(questions)}
    synthesized = data.synthesize(
        questions, tokenizer, sizes={"patching": (2, 0), "train": (2, 2), "dev": (1, 1),
                                     "eval": (1, 1)},
        n_train=4, seed=0, answers=answers, protocol="free_form", n_arithmetic=1)
    paths = synthesized.save(tmp_path, provenance=run)
    assert json.loads(paths["synthesis"].read_text())["provenance"] == run
    expect_round_trip(data.PatchingPairs.load, paths["pairs"], run, other_tokenizer_run)


def test_head_selector_saves_its_provenance(tmp_path, run, other_tokenizer_run):
    path = tmp_path / "heads.json"
    selector = viz.HeadSelector(torch.tensor([[0.5, -0.2], [0.1, 0.3]]), path, top_k=1,
                                provenance=run)
    selector.toggle(1, 1)  # a click rewrites the file, still with the provenance
    assert patching.load_heads(path, expect=run) == [(0, 0), (1, 1)]
    with pytest.raises(io.ProvenanceError, match="heads.json: field 'provenance.tokenizer'"):
        patching.load_heads(path, expect=other_tokenizer_run)


@pytest.fixture(scope="module")
def spt_setup():
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    return bridge, tuning.prepare("spt", bridge, [(0, 1)])


def test_tuned_folder_and_index(tmp_path, spt_setup, run, other_tokenizer_run):
    bridge, setup = spt_setup
    folder = tuning.export_hf(setup, bridge.tokenizer, tmp_path / "spt",
                              base_model=models.TINY_MODEL, provenance=run)
    expect_round_trip(lambda path, expect: tuning.load_tuned(path, expect=expect), folder,
                      run, other_tokenizer_run)
    with pytest.raises(io.ProvenanceError, match=r"spt_tuning.json: field 'provenance.model'"):
        tuning.load_tuned(folder, expect=dict(run, model="smollm2-135m-instruct"))
    tuning.save_index(tmp_path, {"spt": {"folder": "spt"}}, provenance=run)
    assert json.loads((tmp_path / "index.json").read_text())["provenance"] == run


def test_head_delta_file(tmp_path, run, other_tokenizer_run):
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    setup = tuning.prepare("spt", bridge, [(1, 0)])
    path = tuning.save_head_deltas(tmp_path / "deltas.safetensors", setup,
                                   base_model=models.TINY_MODEL, provenance=run)
    with safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["provenance"]) == run
    base = models.load_model(models.TINY_MODEL, device="cpu").original_model
    expect_round_trip(lambda p, expect: tuning.apply_head_deltas(base, p, expect=expect),
                      path, run, other_tokenizer_run)
