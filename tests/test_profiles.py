"""Per-model paper profiles (appendix C, tables 13-14) in spt_utils.pipeline."""

from __future__ import annotations

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
