"""Activation patching of head outputs: the counterfactual ``z`` of one head at a time in
the reference run, everything downstream live."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.patching.heads import HeadScores, _scatter, _scores
from spt_utils.patching.hooks import (
    _check_position,
    _patched_logit_diffs,
    _reference_and_counterfactual_cache,
    _set_head_all_hook,
    _set_head_last_hook,
    z_name,
)
from spt_utils.patching.metrics import gather_last


def _layers(model: TransformerBridge, layers: Sequence[int] | None) -> list[int]:
    """``layers`` checked against the model (default: all layers)."""
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for index, layer in enumerate(layers):
        if not 0 <= layer < n_layers:
            raise ValueError(f"layers[{index}] = {layer} is out of range for {n_layers} layers")
    return layers


def activation_patch_heads(
    model: TransformerBridge,
    pairs: PatchingPairs,
    *,
    position: str = "last",
    layers: Sequence[int] | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
) -> HeadScores:
    """Activation patching of head outputs (z) from the counterfactual into the reference run,
    one forward pass per head, everything downstream live. ``position="last"`` patches each
    row's last position (any pairs); ``"all"`` every position (needs equal-length pairs,
    e.g. ``build_patching_pairs(..., wording="matched")``). Layers not in ``layers`` are NaN."""
    _check_position(model, pairs, position, "activation_patch_heads")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(layer, head) for layer in _layers(model, layers) for head in range(n_heads)]
    _, counterfactual, calibration = _reference_and_counterfactual_cache(model, pairs, [])
    patches = []
    for layer, head in heads:
        z_cf = counterfactual[z_name(layer)]  # [batch, pos, head, d_head]
        if position == "last":
            setter = partial(
                _set_head_last_hook,
                head=head,
                value=gather_last(z_cf, pairs.counterfactual_last)[:, head],
                last=pairs.reference_last,
            )
        else:
            width = pairs.reference.shape[1]
            setter = partial(_set_head_all_hook, head=head, value=z_cf[:, :width, head])
        patches.append([(z_name(layer), setter)])
    values = _patched_logit_diffs(model, pairs, patches, metric, desc=f"activation ({position})")
    grid = _scatter(values, heads, n_layers, n_heads)
    return _scores(f"activation_{position}", grid, calibration)
