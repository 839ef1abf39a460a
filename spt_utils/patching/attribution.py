"""Attribution patching: the first-order estimate of activation patching from one backward
pass."""

from __future__ import annotations

from functools import partial

import torch
from einops import rearrange
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.patching.heads import HeadScores, _scores
from spt_utils.patching.hooks import _check_position, _keep_hook, z_name
from spt_utils.patching.metrics import _checked_calibration, _last_logit_diff, gather_last


def attribution_patch_heads(
    model: TransformerBridge, pairs: PatchingPairs, *, position: str = "last"
) -> HeadScores:
    """Attribution patching: the first-order estimate of :func:`activation_patch_heads`,
    ``(z_cf − z_ref) · ∂LD/∂z_ref``, from a reference forward + backward and a counterfactual
    forward. ``position="all"`` sums over positions (equal-length pairs only)."""
    _check_position(model, pairs, position, "attribution_patch_heads")
    n_layers = model.cfg.n_layers
    z_names = [z_name(layer) for layer in range(n_layers)]
    device = model.cfg.device
    with torch.no_grad():
        counterfactual_logits, counterfactual = model.run_with_cache(
            pairs.counterfactual.to(device), names_filter=z_names
        )
    store: dict[str, Tensor] = {}
    hooks = [(name, partial(_keep_hook, store=store, key=name)) for name in z_names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(pairs.reference.to(device), return_type="logits")  # [batch, pos, vocab]
        per_row = _last_logit_diff(logits, pairs.reference_last, pairs)
        grads = torch.autograd.grad(per_row.sum(), [store[name] for name in z_names])
    reference_diff = per_row.detach().cpu()
    rows = []
    for name, grad in zip(z_names, grads, strict=True):
        z_ref = store[name].detach()  # [batch, pos, head, d_head]
        if position == "last":
            dz = gather_last(counterfactual[name], pairs.counterfactual_last) - gather_last(
                z_ref, pairs.reference_last
            )
            rows.append((dz * gather_last(grad, pairs.reference_last)).sum(-1))  # [batch, head]
        else:
            width = z_ref.shape[1]
            rows.append(((counterfactual[name][:, :width] - z_ref) * grad).sum((1, 3)))
    estimate = rearrange(rows, "layer batch head -> layer head batch").cpu()
    calibration = _checked_calibration(
        reference_diff, _last_logit_diff(counterfactual_logits, pairs.counterfactual_last, pairs)
    )
    return _scores(f"attribution_{position}", reference_diff + estimate, calibration)
