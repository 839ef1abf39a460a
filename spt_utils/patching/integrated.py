"""Integrated-gradients attribution of the heads (EAP-IG style, Hanna et al. 2024) and a
set-level greedy search under interchange built on it.

Attribution patching reads the gradient at the reference run only; where the metric bends
between the two runs (a saturated softmax, an AND of heads) that one point misleads. Here the
input embeddings move in ``steps`` from the reference prompt to its matched counterfactual
(the same positions: one word differs), and each head's estimate is
``(z_cf − z_ref) · mean_α ∂metric/∂z(α)`` summed over positions: the effect of interchanging
that head, every position, read along the whole path. Both metrics of
:mod:`~spt_utils.patching.sequence` work (a :class:`MetricRuns`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat
from spt_utils.patching.greedy import GreedyKnockout
from spt_utils.patching.heads import Head, HeadScores, _scores
from spt_utils.patching.hooks import z_name
from spt_utils.patching.metrics import _checked_calibration
from spt_utils.patching.sequence import MetricRuns, run_side


def _interchange_keep_hook(
    z: Float[Tensor, "row pos head d_head"], hook: HookPoint, *, store: dict, key: str,
    source: Float[Tensor, "row pos head d_head"] | None, mask: Bool[Tensor, " head"],
) -> Float[Tensor, "row pos head d_head"]:
    """The masked heads' ``z`` from ``source`` (fixed), then kept with its graph in
    ``store[key]`` for the backward pass."""
    if source is not None and mask.any():
        z = torch.where(mask.to(z.device)[None, None, :, None], source.to(z), z)
    if not z.requires_grad:
        z = z.detach().requires_grad_(True)
    store[key] = z
    return z


def _z_of_side(
    model: TransformerBridge, runs: MetricRuns, side: str, patch: dict[str, Tensor],
    mask: Bool[Tensor, "layer head"],
) -> tuple[dict[str, Tensor], Float[Tensor, " pair"]]:
    """Every layer's ``z`` on one side of ``runs`` (the masked heads from ``patch``) and its
    metric per pair, in one pass."""
    store: dict[str, Tensor] = {}
    names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    hooks = [(name, partial(_interchange_keep_hook, store=store, key=name,
                            source=patch.get(name), mask=mask[layer]))
             for layer, name in enumerate(names)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        value = run_side(model, runs, side, batch_size=runs.n_pairs)
    return {name: z.detach() for name, z in store.items()}, value


def _head_mask(model: TransformerBridge, heads: Sequence[Head]) -> Bool[Tensor, "layer head"]:
    mask = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def interchanged_effect(
    model: TransformerBridge, runs: MetricRuns, heads: Sequence[Head], *, batch_size: int = 8
) -> float:
    """The challenge's effect (mean reference − counterfactual metric) with ``heads``
    interchanged in the reference run, exactly."""
    mask, effects = _head_mask(model, heads), []
    for rows in runs.chunks(batch_size):
        chunk = runs.select(rows)
        z_cf, counterfactual = _z_of_side(model, chunk, "counterfactual", {}, mask)
        _, reference = _z_of_side(model, chunk, "reference", z_cf, mask)
        effects.append(reference - counterfactual)
    return torch.cat(effects).mean().item()


def integrated_gradients_heads(
    model: TransformerBridge, runs: MetricRuns, *, steps: int = 8,
    interchanged: Sequence[Head] = (), batch_size: int = 8, progress: bool = False,
) -> HeadScores:
    """Each head's integrated-gradients estimate of interchanging it (its ``z`` from the
    counterfactual run at every position) in the reference run, calibrated like
    :func:`~spt_utils.patching.activation_patch_heads` (1: the whole effect). Heads in
    ``interchanged`` take their counterfactual ``z`` in every run first (their own estimate
    is then 0): the other heads' effect with those already gone. ``progress``: a bar over
    the forward and backward passes."""
    if steps < 1:
        raise ValueError(f"integrated_gradients_heads: steps must be >= 1, got {steps}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    mask, names = _head_mask(model, interchanged), [z_name(layer) for layer in range(n_layers)]
    embed = chat.forward_model(model).get_input_embeddings()
    estimates, references, counterfactuals = [], [], []
    chunks = runs.chunks(batch_size)
    bar = tqdm(total=len(chunks) * steps, desc=f"integrated gradients ({runs.name})",
               disable=not progress, leave=False)
    for rows in chunks:
        chunk = runs.select(rows)
        z_cf, counterfactual = _z_of_side(model, chunk, "counterfactual", {}, mask)
        z_ref, reference = _z_of_side(model, chunk, "reference", z_cf, mask)
        with torch.no_grad():  # embedded: [row, pos, d_model] per side
            embedded = {side: embed(chunk.tokens(side).to(model.cfg.device))
                        for side in ("reference", "counterfactual")}
        total = torch.zeros(len(chunk.reference), n_layers, n_heads)
        for step in range(steps):
            alpha = (step + 0.5) / steps  # the midpoint rule
            inputs = embedded["reference"] + alpha * (embedded["counterfactual"]
                                                      - embedded["reference"])
            store: dict[str, Tensor] = {}
            hooks = [(name, partial(_interchange_keep_hook, store=store, key=name,
                                    source=z_cf[name], mask=mask[layer]))
                     for layer, name in enumerate(names)]
            with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
                value = run_side(model, chunk, "reference", batch_size=chunk.n_pairs,
                                 embeddings=lambda _, inputs=inputs: inputs)
                grads = torch.autograd.grad(value.sum(), [store[name] for name in names])
            for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
                # z, grad: [row, pos, head, d_head] → [row, head]
                total[:, layer] += ((z_cf[name] - z_ref[name]) * grad).sum((1, 3)).cpu()
            bar.update()
        estimates.append(total.view(-1, runs.rows_per_pair, n_layers, n_heads).sum(1) / steps)
        references.append(reference)
        counterfactuals.append(counterfactual)
    bar.close()
    reference = torch.cat(references)
    calibration = _checked_calibration(reference, torch.cat(counterfactuals))
    estimate = torch.cat(estimates).permute(1, 2, 0)  # [layer, head, pair]
    return _scores(f"integrated_gradients_{runs.name}", reference + estimate, calibration)


def greedy_interchange_heads(
    model: TransformerBridge, runs: MetricRuns, k: int, *, steps: int = 4,
    progress: bool = False,
) -> GreedyKnockout:
    """A set-level search under interchange: ``k`` times, add the head whose interchange
    (with the heads already chosen interchanged) removes the most of the effect by
    :func:`integrated_gradients_heads`; ``remaining[i]``: the exact share of the effect left
    with the first i + 1 interchanged (an interchange leaves the counterfactual side as it
    is: its heads' ``z`` come from itself)."""
    n_all = model.cfg.n_layers * model.cfg.n_heads
    if not 1 <= k < n_all:
        raise ValueError(f"greedy_interchange_heads: k = {k} is not between 1 and {n_all - 1}")
    chosen: list[Head] = []
    effects = []
    for _ in tqdm(range(k), desc="greedy interchange", disable=not progress, leave=False):
        scores = integrated_gradients_heads(model, runs, steps=steps, interchanged=chosen,
                                            progress=progress)
        effects.append(scores.calibration.reference - scores.calibration.counterfactual)
        score = scores.score.clone()
        for head in chosen:
            score[head] = -torch.inf
        chosen.append(divmod(int(score.flatten().argmax()), model.cfg.n_heads))
    effects.append(interchanged_effect(model, runs, chosen))
    return GreedyKnockout(chosen, [effect / effects[0] for effect in effects[1:]])
