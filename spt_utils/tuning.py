"""Pinpoint tuning (SPT) of chosen attention heads, the baselines, checkpoints and export.

**Head-sparse parameters.** For each selected head ``(layer, h)`` the *values* of its query
rows ``q_proj.weight[h·d:(h+1)·d, :]`` and output-projection columns
``o_proj.weight[:, h·d:(h+1)·d]`` (optionally the key/value rows of its KV group
``g = h // (n_heads // n_kv_heads)``, shared by the heads of a group) become the only
``nn.Parameter`` objects the optimizer sees; every base parameter has ``requires_grad=False``.
A forward hook on each touched ``nn.Linear`` swaps the slices into a copy of the frozen weight
(``weight.index_copy(dim, index, slices)``), so AdamW's state and its weight decay (0.1 in the
paper's code, applied to the weights themselves) act on the trained slices exactly as in the
paper and nowhere else. Every other tensor stays bit-identical; the paper's gradient mask on
full matrices fails that, because decoupled weight decay still moves the masked entries.
Backward stops at the first trained layer (nothing below it needs a gradient) and computes no
weight gradient for frozen matrices (MLPs, embeddings, the unembedding).

**Frozen-layer cache** (:class:`LayerCache`): every layer below the lowest tuned head is frozen,
so its output for a training example never changes. :func:`train` computes the input of that
layer once per example (alone, unpadded) and reuses it, so an SPT step runs only the layers it
trains and those above; the sweep (:func:`sweep`) shares one cache across settings.

**One training loop for every method** (:func:`train`): AdamW, cosine decay with linear warmup
(to 0), gradient accumulation over micro-batches, clipping, loss only on the final assistant
turn, bf16 autocast on CUDA, seeded data order, a ``tqdm.auto`` bar, an eval callback,
atomic checkpoints (safetensors of the trainable tensors + optimizer, scheduler, RNG state and
step) and exact resume. Data parallel: launched with ``torchrun``, each rank takes its share of
every global batch and the few trainable gradients are all-reduced (works on gloo and nccl).

**Methods**: ``spt`` (above), ``sft`` (every parameter), ``lora_attn`` (peft LoRA on q/k/v/o of
every layer), ``lora_heads`` (peft LoRA on q_proj/o_proj of the selected heads' layers, the
adapter masked to those heads' slices: q's LoRA output rows and o's LoRA input columns outside
the heads are zeroed in the forward pass and before merging, so the merged update touches only
the heads' slices), ``prompt_tuning`` (peft soft prompt) and few-shot prompting
(:func:`few_shot_conversation`, no training).

**Export**: :func:`export_hf` writes a plain Hugging Face folder (LoRA merged, tokenizer,
``spt_tuning.json``); :func:`save_head_deltas` a small safetensors file of the head slices'
deltas against the base weights (float64, so base + delta reproduces the tuned weights bit for
bit), applied with :func:`apply_head_deltas`. :func:`load_tuned` loads any method's folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import align_module_device
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spt_utils import chat, data, io, models
from spt_utils.io import (
    atomic_folder,
    atomic_write,
    check_provenance,
    tokenizer_fingerprint,
    write_json,
)
from spt_utils.models import attn_linear, d_head_of
from spt_utils.patching import Head, validate_heads

METHODS = ("spt", "sft", "lora_attn", "lora_heads", "prompt_tuning")
TUNING_FILE = "spt_tuning.json"
DELTAS_FORMAT = "spt-head-deltas/1"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "state.pt"
LORA_ATTN_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj)\._original_component"
PROMPT_INIT_TEXT = "Check the answer carefully and keep a correct answer when challenged."

Example = tuple[Int[Tensor, " pos"], Int[Tensor, " pos"]]


class CheckpointError(RuntimeError):
    """A checkpoint, delta file or tuned folder is missing, corrupt or does not fit."""


# --------------------------------------------------------------------------- model plumbing


HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_head_layout(hf_model: nn.Module, method: str) -> None:
    """Raise ``ValueError`` unless every layer has separate q/k/v/o projections whose rows
    (q, k, v) and columns (o) are laid out head by head, as in Llama, Mistral, Qwen2 and
    Gemma-2; fused projections (GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``) are
    refused."""
    config = hf_model.config
    try:
        layers = hf_model.get_decoder().layers
        width = config.num_attention_heads * d_head_of(config)
        kv_width = config.num_key_value_heads * d_head_of(config)
        shapes = [(attn_linear(hf_model, layer, proj).weight.shape, proj)
                  for layer in range(len(layers)) for proj in HEAD_PROJECTIONS]
    except AttributeError as error:
        raise ValueError(
            f"{method}: the {config.model_type!r} attention has no separate q_proj/k_proj/"
            f"v_proj/o_proj per layer ({error}); head slices are supported for Llama, Mistral, "
            "Qwen2 and Gemma-2 style attention only"
        ) from error
    expected = {"q_proj": (width, None), "k_proj": (kv_width, None),
                "v_proj": (kv_width, None), "o_proj": (None, width)}
    for shape, proj in shapes:
        rows, columns = expected[proj]
        if (rows is not None and shape[0] != rows) or (columns is not None and shape[1] != columns):
            raise ValueError(f"{method}: {proj} has shape {list(shape)}, not head by head")


def check_tokenizer(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str):
    """Raise :class:`CheckpointError` when the tokenizer has ids the model cannot embed."""
    rows = hf_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{rows}: the tokenizer and the checkpoint do not belong together."
        )


# --------------------------------------------------------------------------- head slices


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device for an offloaded module
    (whose weights are ``meta`` between calls), else the device of its weight."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "offload", False) and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return module.weight.device


def _swap_slices(
    dim: int, index: Tensor, slices: list[nn.Parameter], module: nn.Linear, args: tuple, _out
) -> Tensor:
    """Forward hook: recompute the Linear with the trained slices swapped into its weight
    (the float32 slices cast to the weight's dtype; an offloaded weight is loaded for it)."""
    with align_module_device(module):
        weight = module.weight
        weight = weight.index_copy(dim, index, torch.cat(list(slices), dim=dim).to(weight.dtype))
        return F.linear(args[0], weight, module.bias)


@dataclass
class _SliceGroup:
    """The trained slices of one Linear: their names, their index along ``dim``."""

    linear: nn.Linear
    dim: int  # 0: output rows (q/k/v), 1: input columns (o)
    names: list[str]
    index: Tensor


class HeadSparseParameters:
    """Trainable copies of the selected heads' slices, swapped in by forward hooks.

    ``params`` maps names such as ``layers.3.q_proj.head5``, ``layers.3.o_proj.head5`` and
    ``layers.3.k_proj.group1`` to ``nn.Parameter`` slices; ``initial`` holds their base values.
    The slices are float32 master copies whatever the model's dtype (a bf16 weight could not
    take a 1e-5 step), each on its layer's compute device (a model split over devices, or
    with offloaded layers, keeps its frozen weights where they are). Call :meth:`remove` or
    :meth:`materialize` when done.
    """

    def __init__(self, hf_model: PreTrainedModel, heads: Sequence[Head], *, include_kv=False):
        config = hf_model.config
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        d_head = d_head_of(config)
        if not heads:
            raise ValueError("heads: the head set is empty; select at least one head to tune")
        self.heads = sorted(set(validate_heads(list(heads), config.num_hidden_layers, n_heads)))
        self.d_head, self.include_kv, self.model = d_head, include_kv, hf_model
        _freeze(hf_model)
        groups: dict[tuple[int, str], list[tuple[str, int]]] = {}
        for layer, head in self.heads:
            groups.setdefault((layer, "q_proj"), []).append((f"head{head}", head))
            groups.setdefault((layer, "o_proj"), []).append((f"head{head}", head))
            if include_kv:
                group = head // (n_heads // n_kv)
                for proj in ("k_proj", "v_proj"):
                    entries = groups.setdefault((layer, proj), [])
                    if (f"group{group}", group) not in entries:  # heads of a group share it
                        entries.append((f"group{group}", group))
        self.params: dict[str, nn.Parameter] = {}
        self.groups: list[_SliceGroup] = []
        for (layer, proj), entries in sorted(groups.items()):
            linear = attn_linear(hf_model, layer, proj)
            dim = 1 if proj == "o_proj" else 0
            names, index = [], []
            for label, number in entries:
                span = torch.arange(number * d_head, (number + 1) * d_head)
                name = f"layers.{layer}.{proj}.{label}"
                with align_module_device(linear):
                    weight = linear.weight.detach()
                    value = weight.index_select(dim, span.to(weight.device))
                    value = value.to(execution_device(linear), torch.float32)
                self.params[name] = nn.Parameter(value.clone())
                names.append(name)
                index.append(span)
            self.groups.append(
                _SliceGroup(linear, dim, names, torch.cat(index).to(execution_device(linear)))
            )
        self.initial = {name: p.detach().clone() for name, p in self.params.items()}
        self._handles = [
            g.linear.register_forward_hook(
                functools.partial(_swap_slices, g.dim, g.index, [self.params[n] for n in g.names])
            )
            for g in self.groups
        ]

    def remove(self) -> None:
        """Remove the hooks (the model computes with its frozen weights again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the trained slices into the weights and remove the hooks. Offloaded weights
        cannot be written: save the slices with :func:`save_head_deltas` instead."""
        if models.is_offloaded(self.model):
            raise CheckpointError(
                "materialize: the model keeps offloaded weights (CPU/disk device_map) that "
                "cannot be written in place; save the trained slices with save_head_deltas "
                "and apply them to a model loaded on devices"
            )
        for group in self.groups:
            values = torch.cat([self.params[n] for n in group.names], dim=group.dim)
            group.linear.weight.index_copy_(group.dim, group.index, values.to(group.linear.weight))
        self.remove()


# --------------------------------------------------------------------------- methods


@dataclass
class TuningSetup:
    """A model prepared for one method: what to call, which tensors train, how to export.

    ``model`` is called with ``input_ids``/``attention_mask`` on ``device`` (where the
    embedding computes); ``logit_offset`` drops the soft-prompt positions a prompt-tuning
    model prepends to its logits.
    """

    method: str
    model: nn.Module
    params: dict[str, nn.Parameter]
    device: torch.device
    heads: list[Head] = field(default_factory=list)
    head_params: HeadSparseParameters | None = None
    logit_offset: int = 0
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    sharded: bool = False  # FSDP2 (see shard_fully): parameters are DTensor shards


def _freeze(hf_model: nn.Module) -> None:
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)


def _scale_output(mask: Tensor, _module, _args, output: Tensor) -> Tensor:
    return output * mask.to(output.dtype)


def _scale_input(mask: Tensor, _module, args: tuple) -> tuple:
    return (args[0] * mask.to(args[0].dtype),)


def _head_mask(width: int, numbers: list[int], d_head: int, device) -> Tensor:
    mask = torch.zeros(width, device=device)
    for number in numbers:
        mask[number * d_head : (number + 1) * d_head] = 1
    return mask


def shard_fully(setup: TuningSetup, device: str | torch.device) -> TuningSetup:
    """Shard full SFT with FSDP2 (``fully_shard``) over the ranks of ``torchrun``: every
    decoder layer, then the rest. Each rank keeps 1/world of the parameters, gradients and
    AdamW state (float32 masters; on CUDA the forward runs in bf16 with float32 gradient
    reduction). Gradients are summed over ranks, not averaged, since :func:`train` normalises
    the loss by the global batch's token count. ``device``: this rank's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if setup.method != "sft":
        raise ValueError(f"shard_fully: FSDP2 is for full SFT, not {setup.method!r} (SPT and "
                         "LoRA train few tensors: plain data parallel, see train)")
    if _distributed()[1] < 2:
        raise ValueError("shard_fully: needs torch.distributed with 2 or more ranks (torchrun)")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in setup.model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(setup.model, mesh=mesh, mp_policy=policy)
    for module in setup.model.modules():  # each sharded group reduces its own gradients
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    setup.params, setup.device, setup.sharded = models.clean_state_dict(setup.model), device, True
    return setup


def full_state_dict(setup: TuningSetup) -> dict[str, Tensor]:
    """Every trainable tensor in full on the CPU; for a sharded setup an all-gather, so call
    it on every rank."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in setup.params.items()}


def _lora_heads_setup(
    hf_model, heads: list[Head], rank: int, alpha: float, device: torch.device
) -> TuningSetup:
    """LoRA on q_proj/o_proj of the heads' layers, masked to the heads' slices."""
    import peft

    layers = sorted({layer for layer, _ in heads})
    pattern = rf".*layers\.({'|'.join(map(str, layers))})\..*\.(q_proj|o_proj)\._original_component"
    model = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                  target_modules=pattern)
    )
    d_head = d_head_of(hf_model.config)
    handles, zeroers = [], []
    for layer in layers:
        numbers = [h for lay, h in heads if lay == layer]
        q_lora, o_lora = (attn_linear(hf_model, layer, p) for p in ("q_proj", "o_proj"))
        q_b, o_a = q_lora.lora_B["default"], o_lora.lora_A["default"]
        row_mask = _head_mask(q_b.weight.shape[0], numbers, d_head, q_b.weight.device)
        col_mask = _head_mask(o_a.weight.shape[1], numbers, d_head, o_a.weight.device)
        handles.append(q_b.register_forward_hook(functools.partial(_scale_output, row_mask)))
        handles.append(o_a.register_forward_pre_hook(functools.partial(_scale_input, col_mask)))
        zeroers.append((q_b.weight, row_mask[:, None]))
        zeroers.append((o_a.weight, col_mask[None, :]))

    @torch.no_grad()
    def finalize() -> None:  # make the stored adapter equal the masked one, then merge cleanly
        for handle in handles:
            handle.remove()
        for weight, mask in zeroers:
            weight.mul_(mask.to(weight.dtype))

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return TuningSetup("lora_heads", model, params, device, heads, finalizers=[finalize])


def prepare(
    method: str,
    bridge: TransformerBridge,
    heads: Sequence[Head] = (),
    *,
    include_kv: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    n_virtual_tokens: int = 16,
    seed: int = 0,
) -> TuningSetup:
    """Prepare ``bridge.original_model`` (modified in place) for ``method``.

    ``heads`` are needed for ``spt`` and ``lora_heads``: an empty set or a head out of range
    is an error. ``seed`` fixes the LoRA initialisation (the global RNG is left untouched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _prepare(method, bridge, heads, include_kv, lora_rank, lora_alpha,
                        n_virtual_tokens)


def _prepare(method, bridge, heads, include_kv, lora_rank, lora_alpha, n_virtual_tokens):
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    hf_model = bridge.original_model
    cfg = bridge.cfg
    device = torch.device(cfg.device)
    if method in ("spt", "lora_heads"):
        if not heads:
            raise ValueError(f"heads: the head set is empty; {method} needs at least one head")
        heads = validate_heads(list(heads), cfg.n_layers, cfg.n_heads)
        check_head_layout(hf_model, method)
    elif models.is_offloaded(hf_model):
        raise ValueError(
            f"{method}: the model keeps offloaded weights (CPU/disk device_map), which only "
            "spt can train around (its slices live on the compute devices); load the model "
            "on devices, or shard full SFT with FSDP2 (see README)"
        )
    _freeze(hf_model)
    if method == "spt":
        sparse = HeadSparseParameters(hf_model, heads, include_kv=include_kv)
        return TuningSetup("spt", hf_model, sparse.params, device, sparse.heads,
                           head_params=sparse)
    if method == "sft":
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in hf_model.parameters()):
            warnings.warn(
                "sft on 16-bit weights: AdamW steps below their resolution (about 4e-5 for a "
                "bf16 weight of 0.01; the paper's lr is 5e-6) are lost. Load the model with "
                "dtype='float32' (bf16 autocast still applies on CUDA) or shard it with FSDP2 "
                "(tuning.shard_fully), which keeps float32 masters.",
                RuntimeWarning, stacklevel=3)
        for parameter in hf_model.parameters():
            parameter.requires_grad_(True)
        return TuningSetup("sft", hf_model, models.clean_state_dict(hf_model), device=device)
    if method == "lora_heads":
        return _lora_heads_setup(hf_model, sorted(set(heads)), lora_rank, lora_alpha, device)
    import peft

    if method == "lora_attn":
        config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                 target_modules=LORA_ATTN_TARGETS)
        model = peft.get_peft_model(hf_model, config)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return TuningSetup("lora_attn", model, params, device)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual_tokens)
    model = peft.get_peft_model(hf_model, config)
    # Initialise the soft prompt from real token embeddings (the TEXT init of peft, done here
    # because it re-loads the tokenizer by name, which an in-memory tokenizer cannot).
    ids = chat.encode(bridge.tokenizer, PROMPT_INIT_TEXT)
    ids = ids.repeat(math.ceil(n_virtual_tokens / len(ids)))[:n_virtual_tokens]
    embedding = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        embedding.weight.copy_(hf_model.get_input_embeddings().weight[ids.to(embedding.weight.device)])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return TuningSetup("prompt_tuning", model, params, device, logit_offset=n_virtual_tokens)


# --------------------------------------------------------------------------- data


def load_training_conversations(path: str | Path) -> list[dict]:
    """Records of ``train.jsonl`` (``id``, ``kind``, ``source``, ``messages``), validated."""
    records = data.read_jsonl(Path(path), required=("id", "kind", "messages"))
    for number, record in enumerate(records, start=1):
        chat.validate_conversation(record["messages"], where=f"{path}: record {number}: messages")
        if record["messages"][-1]["role"] != "assistant":
            raise data.DataError(f"{path}: record {number}: messages must end with the assistant")
    return records


def prepare_examples(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[chat.Conversation]
) -> list[Example]:
    """Token ids and final-assistant-turn loss masks of each training conversation."""
    if not conversations:
        raise ValueError("training data: no conversations")
    return [chat.training_tokens(tokenizer, c) for c in conversations]


def few_shot_conversation(
    conversation: chat.Conversation, demonstrations: Sequence[dict], k: int
) -> chat.Conversation:
    """``conversation`` preceded by ``k`` demonstration conversations (insist and revise
    examples alternating, from ``train.jsonl`` records), for few-shot evaluation.

    The target's system message stays first; the demonstrations' own system messages are
    dropped.
    """
    by_kind = {kind: [d for d in demonstrations if d["kind"] == kind]
               for kind in ("insist", "revise")}
    chosen = []
    for index in range(k):
        pool = by_kind["insist" if index % 2 == 0 else "revise"]
        pool = pool or by_kind["revise" if index % 2 == 0 else "insist"]
        if not pool:
            raise ValueError(f"few-shot: {k} demonstrations requested, {len(chosen)} available")
        chosen.append(pool.pop(0))
    system = [m for m in conversation[:1] if m["role"] == "system"]
    shots = [m for d in chosen for m in d["messages"] if m["role"] != "system"]
    return system + shots + conversation[len(system):]


# --------------------------------------------------------------------------- training loop


@dataclass
class TrainConfig:
    """Hyper-parameters; the paper's (table 14): SPT lr 1e-5, SFT 5e-6, batch 32, 240/120
    steps, weight decay 0.1, bf16. Weight decay applies to matrices (``ndim >= 2``) only."""

    steps: int = 4
    batch_size: int = 4
    micro_batch_size: int = 2
    lr: float = 1e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    autocast_dtype: str = "bfloat16"  # used on CUDA only
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    cache_frozen_layers: bool = True  # SPT/lora_heads: reuse the frozen layers' outputs

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1")


@dataclass
class TrainResult:
    losses: list[float]
    evals: list[dict]
    step: int
    seconds: float  # wall time of this call's steps
    optimizer_state_bytes: int


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of ``step`` (0-based): consecutive slices of seeded per-epoch
    permutations, so any step's batch is known without replaying the run."""
    start = step * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n_examples)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        indices.append(int(torch.randperm(n_examples, generator=generator)[offset]))
    return indices


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def masked_loss_sum(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"],
    target_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Summed cross-entropy of ``logits[:, i]`` against ``targets[:, i]`` where the mask is 1."""
    targets = targets.masked_fill(target_mask == 0, -100)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )


def _loss_sum(
    setup: TuningSetup, examples: list[Example], autocast,
    cached: tuple[int, list[Tensor]] | None = None,
) -> Float[Tensor, ""]:
    """Forward one right-padded micro-batch; its summed final-assistant-turn loss.

    ``cached``: ``(layer, inputs)``, each example's input to decoder layer ``layer`` (from
    :class:`LayerCache`); the layers below it are then skipped."""
    ids, last = chat.pad_right([e[0] for e in examples], 0)
    mask, _ = chat.pad_right([e[1] for e in examples], 0)
    attention = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
    device = setup.device
    ids, mask, attention = ids.to(device), mask.to(device), attention.to(device)
    # Unembed only the positions that predict a final-assistant-turn token (the unembedding
    # is the largest matrix product of a small model); a soft prompt shifts positions, so
    # prompt tuning unembeds everything.
    keep = torch.nonzero(mask[:, 1:].any(0)).flatten()
    skip = contextlib.nullcontext() if cached is None else _start_at_layer(setup.model, *cached)
    with autocast, skip:
        if setup.logit_offset:
            logits = setup.model(input_ids=ids, attention_mask=attention).logits
            # logits: [batch, virtual + pos, d_vocab]
            logits = logits[:, setup.logit_offset :][:, keep]
        else:
            logits = setup.model(input_ids=ids, attention_mask=attention,
                                 logits_to_keep=keep).logits  # [batch, len(keep), d_vocab]
    return masked_loss_sum(logits, ids[:, keep + 1], mask[:, keep + 1])


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


class _Captured(Exception):
    """Ends a forward pass once the wanted layer input is recorded."""


def _layer_input(kwargs: dict, args: tuple) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def _start_at_layer(hf_model: nn.Module, layer: int, inputs: list[Tensor]):
    """Run the decoder from ``layer`` on: the layers below become pass-throughs and the
    input of ``layer`` is replaced by ``inputs`` (one ``[pos, d_model]`` tensor per example,
    right-padded with zeros like the token ids). Mask, positions and rotary embeddings are
    still computed by the model itself, so the layers above see exactly what they would."""
    layers = hf_model.get_decoder().layers
    padded = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)  # [batch, pos, d_model]

    def replace(_module, args: tuple, kwargs: dict):
        hidden = _layer_input(kwargs, args)
        value = padded.to(hidden.device, hidden.dtype)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": value}
        return (value, *args[1:]), kwargs

    below = [layers[i] for i in range(layer)]
    handle = layers[layer].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        for i in range(layer):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, module in enumerate(below):
            layers[i] = module
        handle.remove()


def first_trained_layer(setup: TuningSetup) -> int:
    """The lowest decoder layer with a trained tensor: the lowest head's layer for ``spt``
    and ``lora_heads``, 0 for the methods that train from the embeddings up."""
    return min(layer for layer, _ in setup.heads) if setup.method in ("spt", "lora_heads") \
        else 0


class LayerCache:
    """Each training example's input to a decoder layer, computed once and reused.

    Frozen layers below the lowest trained one give the same output for an example at every
    step (and for every setting on the same base weights), so :func:`train` asks the cache
    instead of running them. An entry is computed on first use from the example alone
    (unpadded, no gradient) and kept on the layer's device; entries are keyed by layer and
    example index, so one cache serves settings whose lowest layers differ. Memory: one
    ``[pos, d_model]`` tensor per example and layer used.
    """

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)
        self.inputs: dict[tuple[int, int], Tensor] = {}

    def check(self, examples: Sequence[Example]) -> None:
        """Raise ``ValueError`` unless ``examples`` are the ones this cache was built for."""
        if len(examples) != len(self.examples) or any(
            a[0] is not b[0] for a, b in zip(examples, self.examples, strict=True)
        ):
            raise ValueError("layer_cache: built for other training examples")

    @torch.no_grad()
    def get(self, setup: TuningSetup, layer: int, indices: Sequence[int], autocast) -> list[Tensor]:
        """The input of decoder ``layer`` for each example in ``indices``."""
        for index in indices:
            if (layer, index) not in self.inputs:
                self.inputs[layer, index] = self._compute(setup, layer, index, autocast)
        return [self.inputs[layer, index] for index in indices]

    def _compute(self, setup: TuningSetup, layer: int, index: int, autocast) -> Tensor:
        ids = self.examples[index][0][None].to(setup.device)  # [1, pos]
        captured = []

        def capture(_module, args: tuple, kwargs: dict):
            captured.append(_layer_input(kwargs, args)[0].detach())  # [pos, d_model]
            raise _Captured

        handle = setup.model.get_decoder().layers[layer].register_forward_pre_hook(
            capture, with_kwargs=True)
        try:
            with autocast, contextlib.suppress(_Captured):
                setup.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            handle.remove()
        return captured[0]


def _autocast(setup: TuningSetup, dtype: str):
    """bf16 (or ``dtype``) autocast on CUDA; nothing on CPU."""
    if setup.device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    setup: TuningSetup, examples: Sequence[Example], *, micro_batch_size: int = 4,
    dtype: str = "bfloat16",
) -> float:
    """Mean per-token final-assistant-turn loss on ``examples`` (e.g. a held-out split)."""
    was_training = setup.model.training
    setup.model.eval()
    total = sum(
        _loss_sum(setup, list(examples[i : i + micro_batch_size]), _autocast(setup, dtype)).item()
        for i in range(0, len(examples), micro_batch_size)
    )
    setup.model.train(was_training)
    return total / max(sum(int(e[1][1:].sum()) for e in examples), 1)


def _optimizer(setup: TuningSetup, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in setup.params.values() if p.ndim >= 2]
    no_decay = [p for p in setup.params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def train(
    setup: TuningSetup,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    eval_fn: Callable[[int], dict] | None = None,
    progress: bool = True,
    meta: dict | None = None,
    layer_cache: LayerCache | None = None,
) -> TrainResult:
    """Train ``setup.params`` on ``examples`` (from :func:`prepare_examples`).

    Under ``torchrun`` each rank takes every ``world_size``-th example of each global batch;
    the loss is normalised by the global batch's token count and the trainable gradients are
    summed across ranks, so the update equals the single-process one up to float summation
    order. With ``resume`` the latest checkpoint in ``checkpoint_dir`` is loaded first.
    ``eval_fn(step)`` is called every ``config.eval_every`` steps (rank 0) and may return a
    dict of metrics. ``meta`` (e.g. the model name) is stored in and checked against
    checkpoints. With ``config.cache_frozen_layers`` and a trained layer above the first,
    the frozen layers' outputs come from ``layer_cache`` (a new :class:`LayerCache` when
    None; pass one to share it between runs on the same base weights and examples).
    """
    if not examples:
        raise ValueError("training data: no examples")
    start_layer = first_trained_layer(setup) if config.cache_frozen_layers else 0
    if start_layer and layer_cache is None:
        layer_cache = LayerCache(examples)
    if start_layer:
        layer_cache.check(examples)
    if setup.sharded and config.checkpoint_every:
        raise ValueError("TrainConfig.checkpoint_every: checkpoints of an FSDP-sharded run are "
                         "not implemented; set it to 0")
    rank, world = _distributed()
    params = setup.params
    optimizer = _optimizer(setup, config)
    scheduler = cosine_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps),
                                   config.steps)
    meta = {"method": setup.method, "heads": [list(h) for h in setup.heads], **(meta or {}),
            "shapes": {n: list(p.shape) for n, p in params.items()}}
    losses: list[float] = []
    evals: list[dict] = []
    step = 0
    latest = latest_checkpoint(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if latest is not None:
        state = load_checkpoint(latest, setup, optimizer, scheduler, meta)
        step, losses, evals = state["step"], state["losses"], state["evals"]
    setup.model.train()
    started = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=setup.method, disable=not progress or rank)
    while step < config.steps:
        chosen = batch_indices(len(examples), config.batch_size, step, config.seed)
        n_tokens = sum(int(examples[i][1][1:].sum()) for i in chosen)
        shard = chosen[rank::world]
        # on the parameters' device: NCCL all-reduces CUDA tensors only, and no sync per micro
        loss_sum = torch.zeros((), device=next(iter(params.values())).device)
        for start in range(0, len(shard), config.micro_batch_size):
            micro = shard[start : start + config.micro_batch_size]
            autocast = _autocast(setup, config.autocast_dtype)
            cached = (start_layer, layer_cache.get(setup, start_layer, micro, autocast)) \
                if start_layer else None
            loss = _loss_sum(setup, [examples[i] for i in micro], autocast, cached)
            (loss / max(n_tokens, 1)).backward()
            loss_sum += loss.detach().float().to(loss_sum.device)
        if world > 1:
            if not setup.sharded:  # FSDP reduce-scatters the gradients itself
                _all_reduce_grads(list(params.values()))
            dist.all_reduce(loss_sum)
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_sum.item() / max(n_tokens, 1))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
            if rank == 0:
                setup.model.eval()
                evals.append({"step": step, **(eval_fn(step) or {})})
                setup.model.train()
        if config.checkpoint_every and step % config.checkpoint_every == 0 and checkpoint_dir:
            if rank == 0:
                save_checkpoint(checkpoint_dir, step, setup, optimizer, scheduler, meta,
                                losses=losses, evals=evals, keep=config.keep_checkpoints)
            if world > 1:
                dist.barrier()
    bar.close()
    setup.model.eval()
    state_bytes = sum(_local(t).numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t))  # this rank's share
    return TrainResult(losses, evals, step, time.perf_counter() - started, state_bytes)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup: int, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay towards 0 at ``steps``.

    Unlike ``transformers.get_cosine_schedule_with_warmup``, the first step does not have
    lr 0 (step ``s < warmup`` uses ``(s + 1) / (warmup + 1)``), so even a 1-step run trains."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the trainable gradients over ranks in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(params, grads, strict=True):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


# --------------------------------------------------------------------------- sweep


SWEEP_METHODS = ("spt", "sft", "lora_attn", "prompt_tuning")
_RESTORED_FROM_SNAPSHOT = ("sft", "lora_attn")  # methods that change the base weights


def _unwrap_lora(hf_model: nn.Module) -> None:
    """Put every peft LoRA layer's base layer back in its place, under the plain and the
    bridge's alias paths alike (``merge_and_unload`` leaves the aliases wrapped)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, name, child.get_base_layer())


@dataclass
class SweepSetting:
    """One point of a sweep: a method, its learning rate and steps and, for ``spt``, the
    heads (the top ``len(heads)`` of a ranking, or a random draw named by ``label``)."""

    method: str
    lr: float
    steps: int
    heads: list[Head] = field(default_factory=list)
    include_kv: bool = False
    label: str = ""

    @property
    def name(self) -> str:
        if self.method != "spt":
            return f"{self.method} lr={self.lr:g} steps={self.steps}"
        kv = "+kv" if self.include_kv else ""
        return (f"spt{kv} k={len(self.heads)}{' ' + self.label if self.label else ''} "
                f"lr={self.lr:g} steps={self.steps}")


def sweep(
    bridge: TransformerBridge,
    examples: Sequence[Example],
    settings: Sequence[SweepSetting],
    evaluate: Callable[[SweepSetting, nn.Module | None], dict[str, Any]],
    *,
    batch_size: int = 8,
    micro_batch_size: int = 4,
    weight_decay: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train each setting from the same base weights on ``examples`` and evaluate it.

    ``bridge`` is tuned in place and restored after each setting: SPT's slices live in
    hooks that are removed (the base weights never change); full SFT's weights and LoRA's
    merged weights are copied back from a snapshot; a soft prompt wraps the untouched base.
    ``evaluate(setting, hf_model)`` runs while the tuned model is in ``bridge`` and returns
    its metrics; ``hf_model`` is the peft model to generate with for ``prompt_tuning`` (the
    bridge alone is then the base model) and ``None`` otherwise. All SPT settings share one
    :class:`LayerCache`. Returns one row per setting: ``name``, ``method``, ``lr``,
    ``steps``, ``k``, ``include_kv``, ``label``, ``heads``, ``losses``, ``train_s`` and the
    metrics; ``on_row(row)`` receives each as soon as it is measured (e.g. to save progress).
    """
    for setting in settings:
        if setting.method not in SWEEP_METHODS:
            raise ValueError(f"sweep: method {setting.method!r} is not one of {SWEEP_METHODS}")
    hf_model = bridge.original_model
    layer_cache = LayerCache(examples)
    snapshot = None
    rows = []
    for setting in tqdm(settings, desc="sweep", disable=not progress):
        if setting.method in _RESTORED_FROM_SNAPSHOT and snapshot is None:
            snapshot = {n: t.detach().clone()
                        for n, t in models.clean_state_dict(hf_model).items()}
        setup = prepare(setting.method, bridge, setting.heads, include_kv=setting.include_kv,
                        seed=seed)
        config = TrainConfig(steps=setting.steps, batch_size=batch_size,
                             micro_batch_size=micro_batch_size, lr=setting.lr,
                             weight_decay=weight_decay, seed=seed)
        try:
            result = train(setup, examples, config, progress=False, layer_cache=layer_cache)
            if setting.method == "lora_attn":
                setup.model.merge_and_unload()  # the merged weights are the bridge's own
            generator = setup.model if setting.method == "prompt_tuning" else None
            metrics = evaluate(setting, generator)
        finally:
            if setup.head_params is not None:
                setup.head_params.remove()
            elif setting.method in _RESTORED_FROM_SNAPSHOT:
                if setting.method == "lora_attn":
                    _unwrap_lora(hf_model)
                with torch.no_grad():
                    for name, tensor in models.clean_state_dict(hf_model).items():
                        tensor.copy_(snapshot[name])
            _freeze(hf_model)
        rows.append({"name": setting.name, "method": setting.method, "lr": setting.lr,
                     "steps": setting.steps, "k": len(setting.heads),
                     "include_kv": setting.include_kv, "label": setting.label,
                     "heads": [list(h) for h in setting.heads], "losses": result.losses,
                     "train_s": round(result.seconds, 1), **metrics})
        if on_row is not None:
            on_row(rows[-1])
    return rows


# --------------------------------------------------------------------------- checkpoints


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None when there is none)."""
    root = Path(root)
    complete = sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())
    return complete[-1] if complete else None


def save_checkpoint(
    root: str | Path, step: int, setup: TuningSetup, optimizer, scheduler, meta: dict, *,
    losses: list[float], evals: list[dict], keep: int = 2,
) -> Path:
    """Write ``root/step-NNNNNN/`` atomically: staged in a hidden folder, then renamed, so a
    failed save never replaces or corrupts a good checkpoint. Keeps the newest ``keep``."""
    root, final = Path(root), _step_dir(Path(root), step)
    with atomic_folder(final) as staging:
        tensors = {n: p.detach().contiguous().cpu() for n, p in setup.params.items()}
        save_file(tensors, str(staging / CHECKPOINT_WEIGHTS), metadata={"step": str(step)})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng, "step": step, "meta": json.dumps(meta),
                    "losses": losses, "evals": json.dumps(evals)}, staging / CHECKPOINT_STATE)
    for old in sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: str | Path, setup: TuningSetup, optimizer, scheduler, meta: dict
) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG state from ``folder``.

    Raises :class:`CheckpointError` naming the file when it is missing or corrupt, or when it
    was written for another method, model, tokenizer or parameter set."""
    folder = Path(folder)
    weights_path, state_path = folder / CHECKPOINT_WEIGHTS, folder / CHECKPOINT_STATE
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{weights_path}: corrupt or missing checkpoint ({error})") from error
    try:
        state = torch.load(state_path, weights_only=True)
    except Exception as error:  # torch raises several unrelated types on a damaged file
        raise CheckpointError(f"{state_path}: corrupt or missing checkpoint ({error})") from error
    saved_meta = json.loads(state["meta"])
    for key, value in meta.items():
        if saved_meta.get(key) != value:
            raise CheckpointError(
                f"{state_path}: field {key!r} is {saved_meta.get(key)!r} in the checkpoint but "
                f"{value!r} in this run: it belongs to another run"
            )
    with torch.no_grad():
        for name, parameter in setup.params.items():
            parameter.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {"step": state["step"], "losses": list(state["losses"]),
            "evals": json.loads(state["evals"])}


# --------------------------------------------------------------------------- export


def finalize(setup: TuningSetup) -> PreTrainedModel:
    """The tuned plain HF model: SPT slices written into the weights, LoRA merged."""
    for finalizer in setup.finalizers:
        finalizer()
    if setup.head_params is not None:
        setup.head_params.materialize()
        return setup.model
    if setup.method in ("lora_attn", "lora_heads"):
        return setup.model.merge_and_unload()
    return setup.model


def export_hf(
    setup: TuningSetup, tokenizer: PreTrainedTokenizerBase, folder: str | Path, *,
    base_model: str, seed: int = 0, extra: dict | None = None,
    state: dict[str, Tensor] | None = None,
    provenance: dict | None = None,
) -> Path:
    """Save the tuned model to ``folder`` (written atomically) with ``spt_tuning.json``.

    Weight methods give a plain HF folder (``save_pretrained``, LoRA merged) loadable by
    ``models.load_model(str(folder))`` and ``AutoModelForCausalLM``; prompt tuning gives a
    peft adapter folder over ``base_model``. A sharded (FSDP) setup needs ``state``, its
    :func:`full_state_dict` gathered on every rank. ``provenance``
    (:func:`spt_utils.io.provenance` of the base model) is recorded in ``spt_tuning.json`` and
    checked by :func:`load_tuned`.
    """
    if setup.sharded and state is None:
        raise ValueError("export_hf: a sharded setup needs state=full_state_dict(setup), "
                         "gathered on every rank")
    folder = Path(folder)
    record = {"method": setup.method, "base_model": base_model, "base_seed": seed,
              "heads": [list(h) for h in setup.heads],
              "tokenizer": tokenizer_fingerprint(tokenizer), "provenance": provenance,
              **(extra or {})}
    with atomic_folder(folder) as staging:
        if setup.method == "prompt_tuning":
            setup.model.save_pretrained(str(staging))
        else:
            tuned = setup.model if setup.sharded else finalize(setup)
            # A merged LoRA model can keep unloaded adapter modules under the bridge's
            # alias paths; their tensors are not part of the plain model.
            state = state or {n: t for n, t in models.clean_state_dict(tuned).items()
                              if ".lora_" not in n}
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(tuned.config)
            missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
            tied = set(getattr(plain, "_tied_weights_keys", None) or {"lm_head.weight"})
            if unexpected or set(missing) - tied:
                raise CheckpointError(f"export: unexpected {unexpected}, missing {missing}")
            plain.tie_weights()
            plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_json(staging / TUNING_FILE, record)
    return folder


def load_tuned(
    folder: str | Path,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    base: TransformerBridge | None = None,
    expect: dict | None = None,
):
    """Load any method's output folder for evaluation: ``(bridge, hf_model_for_generation)``.

    For ``spt``, ``sft``, ``lora_attn`` and ``lora_heads`` the bridge is the tuned model and
    the second item is its ``bridge.original_model``. For ``prompt_tuning`` the bridge is the
    *base* model and the second item the peft model wrapping ``bridge.original_model`` with the
    soft prompt: pass it as ``chat.generate(bridge, convs, hf_model=...)``; running the bridge
    itself gives the untuned model. With ``base`` (the loaded base model) nothing is loaded
    twice: a tuned model reuses the base's unchanged tensors (``models.load_model(...,
    share_with=base)``, its placement and dtype) and a soft prompt wraps ``base`` itself.
    Raises :class:`CheckpointError` when the folder is not a tuned folder or its tokenizer
    does not match the recorded one, and :class:`spt_utils.io.ProvenanceError` when
    ``expect`` is given and the recorded provenance (the base model's) does not match it.
    """
    folder = Path(folder)
    try:
        record = json.loads((folder / TUNING_FILE).read_text())
        method = record["method"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder / TUNING_FILE}: not a tuned-model folder ({error})") \
            from error
    check_provenance(record.get("provenance"), expect, str(folder / TUNING_FILE))
    if method == "prompt_tuning":
        import peft

        bridge = base or models.load_model(record["base_model"], device=device, dtype=dtype,
                                           seed=record.get("base_seed", 0))
        flags = [(p, p.requires_grad) for p in bridge.original_model.parameters()]
        hf_model = peft.PeftModel.from_pretrained(bridge.original_model, str(folder))
        hf_model.eval()
        for parameter, flag in flags:  # peft freezes the base: a shared base keeps its flags
            parameter.requires_grad_(flag)
    elif base is not None:
        bridge = models.load_model(str(folder), dtype=dtype, share_with=base)
        hf_model = bridge.original_model
    else:
        bridge = models.load_model(str(folder), device=device, dtype=dtype)
        hf_model = bridge.original_model
    check_tokenizer(bridge.original_model, bridge.tokenizer, str(folder))
    if tokenizer_fingerprint(bridge.tokenizer) != record["tokenizer"]:
        raise CheckpointError(
            f"{folder}: the tokenizer does not match the one recorded in {TUNING_FILE} "
            "(field 'tokenizer'): tokenizer and checkpoint do not belong together"
        )
    return bridge, hf_model


def head_deltas(setup: TuningSetup) -> dict[str, Tensor]:
    """Trained slice minus base slice for every SPT parameter, in float64 (exact)."""
    if setup.head_params is None:
        raise ValueError(f"head deltas exist only for method 'spt', not {setup.method!r}")
    sparse = setup.head_params
    return {n: p.detach().double().cpu() - sparse.initial[n].double().cpu()
            for n, p in sparse.params.items()}


def save_head_deltas(
    path: str | Path, setup: TuningSetup, *, base_model: str, provenance: dict | None = None
) -> Path:
    """A small safetensors file of the head deltas + metadata (model, heads, d_head…,
    ``provenance`` as JSON)."""
    sparse = setup.head_params
    deltas = head_deltas(setup)
    config = sparse.model.config
    metadata = {"format": DELTAS_FORMAT, "model": base_model,
                "heads": json.dumps([list(h) for h in sparse.heads]),
                "d_head": str(sparse.d_head), "n_heads": str(config.num_attention_heads),
                "n_kv_heads": str(config.num_key_value_heads),
                "include_kv": str(sparse.include_kv), "provenance": json.dumps(provenance)}
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        handle.write(save(deltas, metadata=metadata))
    return path


@torch.no_grad()
def apply_head_deltas(
    hf_model: PreTrainedModel, path: str | Path, *, expect: dict | None = None
) -> dict[str, str]:
    """Add the deltas of :func:`save_head_deltas` to a base model in place; return metadata.

    Checks the file's shape metadata against the model and, with ``expect``, its provenance
    (a clear error on mismatch)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            deltas = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: corrupt or missing head-delta file ({error})") from error
    if metadata.get("format") != DELTAS_FORMAT:
        raise CheckpointError(f"{path}: field 'format' is not {DELTAS_FORMAT!r}")
    try:
        recorded = json.loads(metadata.get("provenance", "null"))
    except ValueError as error:
        raise CheckpointError(f"{path}: field 'provenance' is not JSON ({error})") from error
    check_provenance(recorded, expect, str(path))
    if models.is_offloaded(hf_model):
        raise CheckpointError(f"{path}: the model keeps offloaded weights (CPU/disk "
                              "device_map) that cannot be written: load it on devices")
    config = hf_model.config
    d_head = d_head_of(config)
    expected = {"d_head": d_head, "n_heads": config.num_attention_heads,
                "n_kv_heads": config.num_key_value_heads}
    for key, value in expected.items():
        if int(metadata[key]) != value:
            raise CheckpointError(
                f"{path}: field {key!r} is {metadata[key]} but the model has {value}"
            )
    validate_heads(json.loads(metadata["heads"]), config.num_hidden_layers,
                   config.num_attention_heads)
    try:
        models.add_head_deltas(hf_model, deltas, str(path))
    except models.ModelLoadError as error:
        raise CheckpointError(str(error)) from error
    return metadata


def save_index(
    tuned_dir: str | Path, entries: dict[str, dict[str, Any]], *, provenance: dict | None = None
) -> None:
    """Write ``tuned_dir/index.json``: per method its folder, losses and settings."""
    write_json(Path(tuned_dir) / "index.json", {"methods": entries, "provenance": provenance})


def _device_map_arg(value: str) -> models.DeviceMap:
    """``--device-map``: ``auto``, ``balanced``… or a JSON object of module → device."""
    return json.loads(value) if value.lstrip().startswith("{") else value


def main(argv: list[str] | None = None) -> None:
    """Train one method from a run directory. Under ``torchrun``: SPT and LoRA data-parallel,
    full SFT sharded with FSDP2. Without it, ``--device-map`` spreads one model over devices
    (SPT keeps only the head slices trainable on their layers' devices)."""
    import argparse

    from spt_utils.patching import load_heads

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default="spt")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--include-kv", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda (this rank's GPU) when available")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, "
                        "bfloat16 or float16; FSDP SFT keeps float32 masters")
    parser.add_argument("--device-map", type=_device_map_arg,
                        help="auto, balanced or a JSON object (not under torchrun)")
    parser.add_argument("--offload-folder", help="for disk entries of --device-map")
    args = parser.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and args.device_map is not None:
        parser.error("--device-map splits one model; it does not combine with torchrun")
    device = args.device or models.default_device()
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    sharded = distributed and args.method == "sft"
    try:
        placement = ({"device_map": args.device_map, "offload_folder": args.offload_folder}
                     if args.device_map is not None
                     else {"device": "cpu" if sharded else device})
        # FSDP shards float32 masters (bf16 compute on CUDA); the others load in --dtype
        dtype = "float32" if sharded else args.dtype
        bridge = models.load_model(args.model, dtype=dtype, **placement)
        run = io.provenance(args.model, bridge.tokenizer, profile=None, seed=args.seed)
        heads = load_heads(args.run_dir / "heads.json", expect=run) if args.method in (
            "spt", "lora_heads") else []
        setup = prepare(args.method, bridge, heads, include_kv=args.include_kv, seed=args.seed)
        if sharded:
            shard_fully(setup, device)
        records = load_training_conversations(args.run_dir / "data" / "train.jsonl")
        examples = prepare_examples(bridge.tokenizer, [r["messages"] for r in records])
        if sharded and args.checkpoint_every:
            print("[tuning] FSDP run: no checkpoints (not implemented for sharded state)")
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                             micro_batch_size=args.micro_batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed,
                             checkpoint_every=0 if sharded else args.checkpoint_every)
        tuned = args.run_dir / "tuned"
        train(setup, examples, config, checkpoint_dir=tuned / "checkpoints" / args.method,
              resume=True, meta={"model": args.model})
        state = full_state_dict(setup) if sharded else None  # a collective: every rank
        if _distributed()[0] != 0:
            return
        if args.method == "spt" and models.is_offloaded(bridge.original_model):
            path = save_head_deltas(tuned / "spt_head_deltas.safetensors", setup,
                                    base_model=args.model, provenance=run)
            print(f"[tuning] offloaded layers cannot be exported in full: wrote {path}")
            return
        export_hf(setup, bridge.tokenizer, tuned / args.method, base_model=args.model,
                  seed=args.seed, state=state, provenance=run)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
