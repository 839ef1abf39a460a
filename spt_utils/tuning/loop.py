"""The one training loop for every method (:func:`train`), its losses, optimizer and
learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from spt_utils import chat
from spt_utils.tuning.cache import LayerCache, _start_at_layer, first_trained_layer
from spt_utils.tuning.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from spt_utils.tuning.distributed import _all_reduce_grads, _distributed, _local
from spt_utils.tuning.examples import Example
from spt_utils.tuning.methods import TuningSetup


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


# A micro-batch's summed loss: (setup, examples, autocast, cached layer inputs or None).
Objective = Callable[[TuningSetup, list[Example], contextlib.AbstractContextManager,
                      tuple[int, list[Tensor]] | None], Float[Tensor, ""]]


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


def masked_loss_sum(
    logits: Float[Tensor, "batch pos d_vocab"], targets: Int[Tensor, "batch pos"],
    target_mask: Int[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Summed cross-entropy of ``logits[:, i]`` against ``targets[:, i]`` where the mask is 1."""
    targets = targets.masked_fill(target_mask == 0, -100)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )


def final_turn_loss_sum(
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
        final_turn_loss_sum(setup, list(examples[i : i + micro_batch_size]),
                            _autocast(setup, dtype)).item()
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
    # fused: one kernel over every tensor, the same update up to rounding (SFT's 135M
    # parameters: 0.08 s a step against 0.43 for the default loop, one CPU thread); FSDP's
    # sharded tensors keep the default
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=not setup.sharded)


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
    objective: Objective | None = None,
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
    ``objective``: a micro-batch's summed loss (default :func:`final_turn_loss_sum`; another
    one, e.g. the organism's interchange training, runs every layer: no layer cache).
    """
    if not examples:
        raise ValueError("training data: no examples")
    use_cache = config.cache_frozen_layers and objective is None
    objective = final_turn_loss_sum if objective is None else objective
    start_layer = first_trained_layer(setup) if use_cache else 0
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
            loss = objective(setup, [examples[i] for i in micro], autocast, cached)
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
