"""Per-model paper profiles (appendix C, tables 13-14) in spt_utils.pipeline."""

from __future__ import annotations

import ast
import contextlib
import json

import pytest

from spt_utils import pipeline


def parameters(model_name: str, notebook: str, profile: str = "paper") -> dict:
    return pipeline.parameters_for(pipeline.NOTEBOOKS / notebook, profile,
                                   {"model_name": model_name})


@pytest.mark.parametrize(("model_name", "heads", "spt_lr", "sft_lr", "batch", "spt_steps",
                          "sft_steps"), [
    # the values typed from tables 13 (SFT) and 14 (SPT) of the paper
    ("meta-llama/Llama-2-7b-chat-hf", 32, 1e-5, 5e-6, 32, 240, 120),
    ("meta-llama/Llama-2-13b-chat-hf", 64, 1e-5, 5e-6, 32, 240, 120),
    ("meta-llama/Llama-2-70b-chat-hf", 192, 1e-5, 5e-6, 64, 120, 60),
    ("mistralai/Mistral-7B-Instruct-v0.2", 32, 5e-6, 5e-6, 32, 240, 120),
    ("Qwen/Qwen2.5-7B-Instruct", 32, 5e-6, 5e-7, 32, 240, 100),
    ("Qwen/Qwen-14B-Chat", 64, 5e-6, 5e-7, 32, 240, 100),
    ("Qwen/Qwen2.5-72B-Instruct", 192, 4e-6, 1e-6, 64, 100, 60),
    ("/models/llama-2-70b-chat", 192, 1e-5, 5e-6, 64, 120, 60),
])
def test_paper_profile_follows_the_tables(model_name, heads, spt_lr, sft_lr, batch, spt_steps,
                                          sft_steps):
    assert parameters(model_name, "02_path_patching.ipynb")["top_k"] == heads
    tuning = parameters(model_name, "04_pinpoint_tuning.ipynb")
    assert (tuning["spt_lr"], tuning["sft_lr"], tuning["batch_size"], tuning["spt_steps"],
            tuning["sft_steps"]) == (spt_lr, sft_lr, batch, spt_steps, sft_steps)
    assert tuning["autocast_dtype"] == "bfloat16"  # bf16 autocast, as the paper trained


def test_models_outside_the_tables_get_the_generic_paper_profile():
    generic = pipeline.PROFILES["paper"]
    for name in ("smollm2-135m-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "google/gemma-2-9b-it"):
        assert pipeline.paper_row(name) is None
        assert parameters(name, "04_pinpoint_tuning.ipynb") == {
            "model_name": name, "profile": "paper", **generic["04"]}
    # the cpu profile never takes the tables' values (the profile's name is recorded)
    cpu = parameters("meta-llama/Llama-2-70b-chat-hf", "02_path_patching.ipynb", "cpu")
    assert cpu == {"model_name": "meta-llama/Llama-2-70b-chat-hf", "profile": "cpu"}


def test_paper_kl_corpus_is_what_ships():
    from spt_utils import evaluation

    shipped = len(evaluation.load_kl_corpus())
    assert parameters("any/model", "05_evaluation.ipynb")["n_kl_docs"] == shipped


def effective(notebook_prefix: str, profile: str) -> dict:
    """A notebook's parameters under ``profile``: its parameters cell's literal defaults (read
    with ast, not the pipeline), then the profile's overrides."""
    (path,) = pipeline.NOTEBOOKS.glob(f"{notebook_prefix}_*.ipynb")
    cells = json.loads(path.read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    defaults = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign):
            with contextlib.suppress(ValueError):
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return {**defaults, **pipeline.PROFILES[profile].get(notebook_prefix, {})}


BASELINES = {"lora_attn", "lora_heads", "prompt_tuning"}


def test_the_lean_default_still_tests_every_claim():
    """Issue 27's floor for the default ``cpu`` profile: >= 60 known and >= 30 wrong-before
    eval questions; base, SPT, SFT, a random-head control and few-shot; knockout against >= 50
    random and >= 10 layer-matched sets."""
    known, wrong = effective("01", "cpu")["n_eval"]
    assert known >= 60 and wrong >= 30
    knockout = effective("03", "cpu")
    assert knockout["n_random"] >= 50 and knockout["n_layer_matched"] >= 10
    assert {"spt", "sft"} <= set(effective("04", "cpu")["methods"])
    evaluated = effective("05", "cpu")
    assert {"base", "spt", "sft", "few_shot"} <= set(evaluated["methods"])
    assert effective("04", "cpu")["random_head_draws"] >= 1
    assert evaluated["random_head_draws"] >= 1


@pytest.mark.parametrize("profile", ["full", "paper", "test"])
def test_full_paper_and_test_profiles_keep_every_baseline(profile):
    assert BASELINES <= set(effective("04", profile)["methods"])
    evaluated = set(effective("05", profile)["methods"])
    assert BASELINES | {"base", "spt", "sft", "few_shot"} <= evaluated
    assert effective("04", profile)["planted_bound"] and effective("05", profile)["planted_bound"]
    if profile != "test":  # random heads as a distribution, on every model
        assert effective("04", profile)["random_head_draws"] >= 5
        assert effective("05", profile)["random_head_draws"] >= 5


def test_only_the_lean_default_leaves_the_ablation_methods_comparison_out():
    assert effective("03", "cpu")["compare_methods"] is False
    assert all(effective("03", profile)["compare_methods"] is True
               for profile in ("full", "paper", "test"))


def test_the_full_profile_keeps_the_earlier_cpu_sizes():
    """``SPT_PROFILE=full`` is the CPU run before the lean default (commit af2db90's values;
    random sets judged by generation since the interchange knockout, issue 36: 20, the fewest
    whose exact p can fall below 0.05)."""
    assert effective("01", "full")["n_eval"] == [80, 60]
    assert effective("02", "full")["n_oracle_layers"] == 3
    assert {key: effective("03", "full")[key] for key in
            ("k_values", "n_random", "n_layer_matched", "n_generate", "n_random_generate")} == {
        "k_values": [4, 8], "n_random": 100, "n_layer_matched": 20, "n_generate": 60,
        "n_random_generate": 20}
    assert effective("03", "full")["n_random_questions"] is None  # every question


@pytest.mark.parametrize("profile", ["cpu", "full", "paper"])
def test_generation_against_random_sets_is_a_check_in_every_real_profile(profile):
    """The permutation p of top-k against the random sets judged by generation can fall
    below 0.05 (20 sets: 1/21), on questions that top-k is compared with them on."""
    settings = effective("03", profile)
    assert 1 / (1 + settings["n_random_generate"]) < 0.05
    assert settings["n_random_questions"] is None or (
        0 < settings["n_random_questions"] <= settings["n_generate"])


def test_the_lean_default_leaves_steering_out_and_names_it():
    """Issue 27 over 28: the lean default evaluates no steering (the lab still steers), and
    the README's list of what the default leaves out says so."""
    assert effective("05", "cpu")["steering_kinds"] == []
    assert effective("03", "cpu")["lab_alpha"] > 0
    readme = (pipeline.NOTEBOOKS.parent / "README.md").read_text()
    left_out = readme.split("What the default leaves out", 1)[1].split("\n\n", 1)[0]
    assert "steering" in left_out


@pytest.mark.parametrize("profile", ["full", "paper", "test"])
def test_every_other_profile_steers_at_the_heads_and_the_residual_stream(profile):
    """Issue 28: both steerings are evaluated in the full, paper and test profiles, with a
    grid to choose from on dev (one alpha only in the smoke profile) and residual layers
    inside the model."""
    evaluated = effective("05", profile)
    assert set(evaluated["steering_kinds"]) == {"heads", "residual"}
    for grid in ("steer_head_alphas", "steer_residual_alphas"):  # each kind its own grid
        assert len(evaluated[grid]) >= (1 if profile == "test" else 2)
        assert all(alpha > 0 for alpha in evaluated[grid])
    assert evaluated["steer_layers"] and all(0 <= f <= 1 for f in evaluated["steer_layers"])
    if profile in ("full", "paper"):
        assert len(evaluated["steer_layers"]) >= 3


@pytest.mark.parametrize("profile", sorted(pipeline.PROFILES))
def test_knockout_permutation_checks_can_pass_in_every_real_profile(profile):
    """Notebook 03's p against n random (layer-matched) sets is (1 + #) / (1 + n): its floor
    1/(1 + n) must lie below 0.05 or the check can never pass. The test profile's few sets
    cannot: there the notebook reports the checks as undecided (asserted by its own test)."""
    knockout = effective("03", profile)
    floors = {key: 1 / (1 + knockout[key]) for key in ("n_random", "n_layer_matched")}
    if profile == "test":
        assert all(floor >= 0.05 for floor in floors.values())
    else:
        assert all(floor < 0.05 for floor in floors.values()), floors
