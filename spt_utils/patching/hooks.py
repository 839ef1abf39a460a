"""Running the model with hooks: the heads' ``z`` hook, the checks of the pairs, pure hook
functions, one generic patching loop and the cached clean runs the methods start from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.chat import require_decoder_only
from spt_utils.data import PatchingPairs
from spt_utils.patching.metrics import (
    Calibration,
    _checked_calibration,
    _last_logit_diff,
    answer_logit_diff,
    gather_last,
)


def z_name(layer: int) -> str:
    """The hook of every head's output ``z``: [batch, pos, head, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


def check_pairs(model: TransformerBridge, pairs: PatchingPairs, method: str) -> None:
    """Raise a clear error for an encoder-decoder model, an empty pair set or answer ids
    outside the model's vocabulary."""
    require_decoder_only(model, f"patching.{method} (patching to logits through a decoder stack)")
    if len(pairs) == 0:
        raise ValueError(f"{method}: the pair set is empty")
    for name in ("apology_ids", "confirm_ids"):
        ids = getattr(pairs, name)
        if not ids:
            raise ValueError(f"{method}: pairs.{name} is empty")
        outside = [i for i in ids if not 0 <= int(i) < model.cfg.d_vocab]
        if outside:
            raise ValueError(
                f"{method}: pairs.{name} holds token ids {outside} outside the model's "
                f"vocabulary of {model.cfg.d_vocab} tokens (pairs built with another tokenizer?)"
            )


def _check_position(
    model: TransformerBridge, pairs: PatchingPairs, position: str, function: str
) -> None:
    """Validate ``position`` and the pairs for a patching method (errors name the method)."""
    if position not in ("last", "all"):
        raise ValueError(f"position: {position!r} is not 'last' or 'all'")
    method = f"{function}(position={position!r})"
    check_pairs(model, pairs, method)
    if position == "all":
        pairs.require_equal_lengths(method)


# --- pure hook functions (bound with functools.partial) ---------------------------------

def _store_hook(
    activation: Float[Tensor, "batch pos ..."],
    hook: HookPoint,
    store: dict,
    key: str,
    last: Tensor | None,
) -> None:
    """Keep the activation as ``store[key]``: each row's last real position when ``last`` is
    given, every position otherwise."""
    store[key] = (activation if last is None else gather_last(activation, last)).detach()


def _set_head_last_hook(
    z: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    head: int,
    value: Float[Tensor, "batch d_head"],
    last: Tensor,
) -> Float[Tensor, "batch pos head d_head"]:
    """Overwrite one head's z at each row's last position."""
    z = z.clone()
    z[torch.arange(len(last), device=z.device), last.to(z.device), head] = value
    return z


def _set_head_all_hook(
    z: Float[Tensor, "batch pos head d_head"],
    hook: HookPoint,
    head: int,
    value: Float[Tensor, "batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Overwrite one head's z at every position."""
    z = z.clone()
    z[:, :, head] = value
    return z


def _replace_hook(activation: Tensor, hook: HookPoint, value: Tensor) -> Tensor:
    """Replace a whole activation (e.g. freeze ``hook_attn_out`` to the reference run)."""
    return value


def _keep_hook(activation: Tensor, hook: HookPoint, store: dict, key: str) -> Tensor:
    """Keep the activation (with its autograd graph) for a backward pass; returning it makes
    it the tensor the rest of the forward pass uses. Under frozen weights (e.g. a tuned
    model) it has no graph, so it becomes a leaf that the backward pass reaches."""
    if not activation.requires_grad:
        activation = activation.detach().requires_grad_(True)
    store[key] = activation
    return activation


# --- one generic patching loop ------------------------------------------------------------

Hooks = list[tuple[str, Callable]]


def _patched_logit_diffs(
    model: TransformerBridge,
    pairs: PatchingPairs,
    patches: Sequence[Hooks],
    metric: Callable[[Tensor], Tensor] | None = None,
    *,
    desc: str = "patching",
) -> Float[Tensor, "n_patches batch"]:
    """Run the reference batch once per patch (a list of forward hooks); return the metric of
    each row's last-position logits (default: the answer logit difference)."""
    metric = metric or partial(
        answer_logit_diff, apology_ids=pairs.apology_ids, confirm_ids=pairs.confirm_ids
    )
    tokens = pairs.reference.to(model.cfg.device)
    values = []
    for fwd_hooks in tqdm(patches, desc=desc, leave=False):
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):  # removed even on error
            logits = model(tokens, return_type="logits")  # [batch, pos, d_vocab]
            values.append(metric(gather_last(logits, pairs.reference_last)).detach().cpu())
    return torch.stack(values)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def _stop_hook(activation: Tensor, hook: HookPoint) -> None:
    raise _StopForward


def cache_before_unembed(
    model: TransformerBridge, tokens: Tensor, names: list[str], last: Tensor | None = None
) -> dict[str, Tensor]:
    """One forward pass keeping the named hooks' values (only each row's last position when
    ``last`` is given); it stops at the final norm, so the full-vocabulary unembedding is
    never computed."""
    store: dict[str, Tensor] = {}
    last = None if last is None else last.to(model.cfg.device)
    hooks = [(name, partial(_store_hook, store=store, key=name, last=last)) for name in names]
    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, ("ln_final.hook_in", _stop_hook)]):
        try:
            model(tokens.to(model.cfg.device), return_type=None)
        except _StopForward:
            pass
    missing = sorted(set(names) - set(store))
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire before the final norm")
    return store


def _reference_and_counterfactual_cache(
    model: TransformerBridge, pairs: PatchingPairs, reference_names: list[str]
) -> tuple[dict, dict, Calibration]:
    """The clean runs' caches (reference: ``reference_names``; counterfactual: every z)."""
    z_names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        reference_logits, reference = model.run_with_cache(
            pairs.reference.to(model.cfg.device), names_filter=reference_names
        )
        counterfactual_logits, counterfactual = model.run_with_cache(
            pairs.counterfactual.to(model.cfg.device), names_filter=z_names
        )
    calibration = _checked_calibration(
        _last_logit_diff(reference_logits, pairs.reference_last, pairs),
        _last_logit_diff(counterfactual_logits, pairs.counterfactual_last, pairs),
    )
    return reference, counterfactual, calibration
