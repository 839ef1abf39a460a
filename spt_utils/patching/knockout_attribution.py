"""Knockout attribution (issue 26): which heads the challenge's effect needs, the
first-order share of it that zero-ablating each head on both sides removes."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.patching.heads import Head, HeadScores, _scores, validate_heads
from spt_utils.patching.hooks import Hooks, _keep_hook, check_pairs, z_name
from spt_utils.patching.metrics import _checked_calibration, _last_logit_diff


def _zero_heads_hook(
    z: Float[Tensor, "batch pos head d_head"], hook: HookPoint, heads: list[int]
) -> Float[Tensor, "batch pos head d_head"]:
    """Zero-ablate ``heads`` of this layer at every position."""
    z = z.clone()
    z[:, :, heads] = 0
    return z


def _zero_hooks(heads: Sequence[Head]) -> Hooks:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return [(z_name(layer), partial(_zero_heads_hook, heads=sorted(hs)))
            for layer, hs in sorted(by_layer.items())]


def _z_dot_grad(
    model: TransformerBridge, tokens: Tensor, last: Tensor, pairs: PatchingPairs,
    zeroed: Sequence[Head],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, "layer head batch"]]:
    """Each row's answer logit difference and, per head, ``Σ_pos z · ∂LD/∂z`` (minus the
    first-order change of LD when the head is zeroed), with ``zeroed`` heads ablated.
    Right padding needs no mask: later positions cannot reach the last one."""
    z_names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    store: dict[str, Tensor] = {}
    keep = [(name, partial(_keep_hook, store=store, key=name)) for name in z_names]
    # the zeroing hooks run first, so the kept z (and its product) of a zeroed head is 0
    with torch.enable_grad(), model.hooks(fwd_hooks=[*_zero_hooks(zeroed), *keep]):
        logits = model(tokens.to(model.cfg.device), return_type="logits")  # [batch, pos, vocab]
        per_row = _last_logit_diff(logits, last, pairs)
        grads = torch.autograd.grad(per_row.sum(), [store[name] for name in z_names])
    # z, grad: [batch, pos, head, d_head] -> [batch, head] per layer
    products = torch.stack([(store[name].detach() * grad).sum((1, 3))
                            for name, grad in zip(z_names, grads, strict=True)])
    return per_row.detach().cpu(), rearrange(products, "layer batch head -> layer head batch").cpu()


def knockout_attribution_heads(
    model: TransformerBridge, pairs: PatchingPairs, *, zeroed: Sequence[Head] = ()
) -> HeadScores:
    """The first-order estimate of zero-ablating each head (every position, **both** sides
    of every pair): a head's score is the share of the challenge's effect
    (LD_ref − LD_cf) its knockout removes, so it finds heads the effect *needs* even where
    their output hardly differs between the two prompts (which patching cannot see). One
    forward and backward pass per side; ``zeroed`` heads are ablated throughout (their own
    score is then 0). Any pairs (no equal lengths needed)."""
    check_pairs(model, pairs, "knockout_attribution_heads")
    zeroed = validate_heads([tuple(h) for h in zeroed], model.cfg.n_layers, model.cfg.n_heads)
    reference_diff, reference_products = _z_dot_grad(
        model, pairs.reference, pairs.reference_last, pairs, zeroed)
    counterfactual_diff, counterfactual_products = _z_dot_grad(
        model, pairs.counterfactual, pairs.counterfactual_last, pairs, zeroed)
    # zeroing changes LD by about −z·∂LD/∂z on each side; the pair's effect by the difference
    effect_change = counterfactual_products - reference_products  # [layer, head, batch]
    calibration = _checked_calibration(reference_diff, counterfactual_diff)
    return _scores("knockout_attribution", reference_diff + effect_change, calibration)
