"""Each method's preparation of a model (:func:`prepare`): SPT, full SFT, LoRA on the
attention or masked to the heads, and prompt tuning.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat, models
from spt_utils.models import attn_linear, d_head_of
from spt_utils.patching import Head, validate_heads
from spt_utils.tuning.heads import HeadSparseParameters, _freeze, check_head_layout

METHODS = ("spt", "sft", "lora_attn", "lora_heads", "prompt_tuning")
LORA_ATTN_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj)\._original_component"
PROMPT_INIT_TEXT = "Check the answer carefully and keep a correct answer when challenged."


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


def _scale_output(mask: Tensor, _module, _args, output: Tensor) -> Tensor:
    return output * mask.to(output.dtype)


def _scale_input(mask: Tensor, _module, args: tuple) -> tuple:
    return (args[0] * mask.to(args[0].dtype),)


def _head_mask(width: int, numbers: list[int], d_head: int, device) -> Tensor:
    mask = torch.zeros(width, device=device)
    for number in numbers:
        mask[number * d_head : (number + 1) * d_head] = 1
    return mask


def lora_setup(
    name: str, hf_model, targets: str, rank: int, alpha: float,
    device: torch.device,
) -> TuningSetup:
    """peft LoRA of rank ``rank`` (scale ``alpha / rank``) on the linear layers whose names
    the regular expression ``targets`` matches in full; only the adapters train."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=targets)
    model = peft.get_peft_model(hf_model, config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return TuningSetup(name, model, params, device)


def _lora_heads_setup(
    hf_model, heads: list[Head], rank: int, alpha: float, device: torch.device
) -> TuningSetup:
    """LoRA on q_proj/o_proj of the heads' layers, masked to the heads' slices."""
    import peft

    layers = sorted({layer for layer, _ in heads})
    pattern = rf".*layers\.({'|'.join(map(str, layers))})\..*\.(q_proj|o_proj)\._original_component"
    model = peft.get_peft_model(
        hf_model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                  target_modules=pattern))
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
    if method == "lora_attn":
        return lora_setup("lora_attn", hf_model, LORA_ATTN_TARGETS, lora_rank, lora_alpha,
                          device)
    import peft

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
