"""Path patching of attention heads (issue 4): the exact :func:`path_patch_heads` in about
three forward passes, the block identities it relies on, its per-sender oracle, and path
patching from one sender into later heads' inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from accelerate.utils import align_module_device
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.patching import get_act_patch_direct_path

from spt_utils.data import PatchingPairs
from spt_utils.patching.heads import Head, HeadScores, _scatter, _scores, validate_heads
from spt_utils.patching.hooks import (
    _patched_logit_diffs,
    _reference_and_counterfactual_cache,
    _replace_hook,
    _set_head_last_hook,
    cache_before_unembed,
    check_pairs,
    z_name,
)
from spt_utils.patching.metrics import _checked_calibration, _last_logit_diff, gather_last


def _attn_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def _resid_mid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


def answer_unembed(
    model: TransformerBridge, resid: Float[Tensor, "... d_model"], pairs: PatchingPairs
) -> Float[Tensor, " ..."]:
    """The logit difference from final residual-stream vectors, unembedding only the answer
    columns (``ln_final``, then the rows of ``W_U`` for the apology and confirm tokens)."""
    unembed = model.unembed.original_component  # nn.Linear(d_model, d_vocab)
    resid = model.ln_final(resid)
    with align_module_device(unembed):  # an offloaded unembedding is loaded for the call
        ids = torch.tensor(pairs.apology_ids + pairs.confirm_ids, device=unembed.weight.device)
        bias = None if unembed.bias is None else unembed.bias[ids]
        logits = torch.nn.functional.linear(resid.to(ids.device), unembed.weight[ids], bias)
    n_apology = len(pairs.apology_ids)
    return logits[..., :n_apology].mean(-1) - logits[..., n_apology:].mean(-1)


class UnsupportedArchitecture(ValueError):
    """The model's blocks are not the sequential pre-norm blocks a method relies on."""


# Relative tolerance of the block identities (max |difference| / max |expected|) per dtype:
# a recomputation in a 16-bit dtype may round differently from the model's own pass.
BLOCK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 5e-2,
                   torch.float16: 5e-2}


def _resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _mlp_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def _resid_post_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def _block_hook_names(n_layers: int) -> list[str]:
    """Every hook :func:`check_sequential_blocks` reads."""
    names = [z_name(layer) for layer in range(n_layers)]
    for function in (_resid_pre_name, _attn_out_name, _resid_mid_name, _mlp_out_name,
                     _resid_post_name):
        names += [function(layer) for layer in range(n_layers)]
    return names


def _require_hooks(model: TransformerBridge, names: list[str], method: str) -> None:
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        block = type(model.blocks[0]).__name__
        raise UnsupportedArchitecture(
            f"{method}: the model's blocks ({block}) have no {missing[0]}: it needs sequential "
            "pre-norm blocks (attention, then MLP, each added to the residual stream), as in "
            "Llama, Mistral and Qwen2; parallel attention + MLP blocks (GPT-J, GPT-NeoX with "
            "use_parallel_residual) are not supported. Use path_patch_heads_oracle instead."
        )


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.float().to(expected.device) - expected).abs().max() / scale).item()


@torch.no_grad()
def check_sequential_blocks(
    model: TransformerBridge, cache: dict[str, Tensor], method: str = "path_patch_heads"
) -> None:
    """Raise :class:`UnsupportedArchitecture` unless every block of the cached run (each
    row's last position, hooks from :func:`_block_hook_names`) satisfies the identities the
    fast path patching builds on, within :data:`BLOCK_TOLERANCE` of the model's dtype:

    * ``attn_out = o_proj(z)`` (a head writes linearly through its ``W_O`` slice: no norm
      after the attention output, unlike Gemma-2's sandwich norm);
    * ``resid_mid = resid_pre + attn_out``;
    * ``mlp_out = mlp(ln2(resid_mid))`` (the MLP reads only ``resid_mid``);
    * ``resid_post = resid_mid + mlp_out`` and the next ``resid_pre = resid_post``.
    """
    n_layers = model.cfg.n_layers
    tolerance = BLOCK_TOLERANCE.get(model.cfg.dtype, 5e-2)
    for layer in range(n_layers):
        block = model.blocks[layer]
        z = cache[z_name(layer)]  # [batch, head, d_head]
        resid_mid, attn_out = cache[_resid_mid_name(layer)], cache[_attn_out_name(layer)]
        mlp_out, resid_post = cache[_mlp_out_name(layer)], cache[_resid_post_name(layer)]
        identities = {
            "attn_out = o_proj(z)": (
                block.attn.o(rearrange(z, "batch head d_head -> batch (head d_head)")), attn_out),
            "resid_mid = resid_pre + attn_out": (
                cache[_resid_pre_name(layer)] + attn_out.to(resid_mid.device), resid_mid),
            "mlp_out = mlp(ln2(resid_mid))": (block.mlp(block.ln2(resid_mid)), mlp_out),
            "resid_post = resid_mid + mlp_out": (resid_mid + mlp_out.to(resid_mid.device),
                                                 resid_post),
        }
        if layer + 1 < n_layers:
            identities["next resid_pre = resid_post"] = (
                resid_post, cache[_resid_pre_name(layer + 1)])
        for identity, (actual, expected) in identities.items():
            error = _relative_error(actual, expected)
            if not error <= tolerance:
                raise UnsupportedArchitecture(
                    f"{method}: block {layer} ({type(block).__name__}) breaks {identity} "
                    f"(relative error {error:.3g} > {tolerance:g} for {model.cfg.dtype}): the "
                    "fast path needs sequential pre-norm blocks with no norm after the "
                    "attention or MLP output (Llama, Mistral, Qwen2; not Gemma-2's sandwich "
                    "norms, parallel blocks or a hook that edits these activations). Use "
                    "path_patch_heads_oracle instead."
                )


@torch.no_grad()
def path_patch_heads(model: TransformerBridge, pairs: PatchingPairs) -> HeadScores:
    """Exact path patching of every head to the logits, in about three forward passes.

    Sender (l, h): head h's z at each row's last position, from the counterfactual run; the
    attention output of every later layer frozen to the reference run; MLPs and norms live;
    the answer logit difference read at the last position. With later attention frozen and
    only the last position patched, nothing crosses positions after the patch, so the
    sender's effect flows only through the last position's residual stream: resid_mid[l]
    moves by ``(z_cf − z_ref) @ W_O[h]`` (any o_proj bias cancels), then every later layer
    adds its frozen reference attention output and a live MLP. All senders travel together
    as one growing ``[senders, batch, d_model]`` stack through the model's own modules.

    The block identities this relies on are checked on the reference run first
    (:func:`check_sequential_blocks`); other block types raise
    :class:`UnsupportedArchitecture`.
    """
    check_pairs(model, pairs, "path_patch_heads")
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    names = _block_hook_names(n_layers)
    _require_hooks(model, names, "path_patch_heads")
    reference = cache_before_unembed(model, pairs.reference, names, pairs.reference_last)
    check_sequential_blocks(model, reference)
    z_names = [z_name(layer) for layer in range(n_layers)]
    final = _resid_post_name(n_layers - 1)
    counterfactual = cache_before_unembed(
        model, pairs.counterfactual, z_names + [final], pairs.counterfactual_last
    )
    calibration = _checked_calibration(
        answer_unembed(model, reference[final], pairs).cpu(),
        answer_unembed(model, counterfactual[final], pairs).cpu(),
    )
    stack = None  # [senders, batch, d_model], senders ordered (layer, head)
    for layer in range(n_layers):
        block = model.blocks[layer]
        resid_mid = reference[_resid_mid_name(layer)]  # on this layer's device
        if stack is not None:  # frozen later attention
            stack = stack.to(resid_mid.device) + reference[_attn_out_name(layer)]
        # z: [batch, head, d_head]; o_proj weight: [d_model, head·d_head]
        dz = counterfactual[z_name(layer)] - reference[z_name(layer)]
        o_proj = block.attn.o.original_component
        with align_module_device(o_proj):  # an offloaded layer's weight is loaded for this
            w_o = rearrange(o_proj.weight, "d_model (head d_head) -> d_model head d_head",
                            head=n_heads, d_head=d_head)
            delta = einsum(dz.to(w_o.device), w_o,
                           "batch head d_head, d_model head d_head -> head batch d_model")
        senders = resid_mid + delta.to(resid_mid.device)
        stack = senders if stack is None else torch.cat([stack, senders])
        stack = stack + block.mlp(block.ln2(stack))
    per_pair = rearrange(answer_unembed(model, stack, pairs),  # [senders, batch]
                         "(layer head) batch -> layer head batch", layer=n_layers, head=n_heads)
    return _scores("path", per_pair.cpu(), calibration)


def path_patch_heads_oracle(
    model: TransformerBridge,
    pairs: PatchingPairs,
    heads: Sequence[Head] | None = None,
    metric: Callable[[Tensor], Tensor] | None = None,
) -> HeadScores:
    """The per-sender reference implementation of :func:`path_patch_heads`: one hooked
    forward pass per head. Heads not in ``heads`` (default: all) are NaN."""
    check_pairs(model, pairs, "path_patch_heads_oracle")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    every_head = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    heads = validate_heads(every_head if heads is None else list(heads), n_layers, n_heads)
    attn_names = [_attn_out_name(layer) for layer in range(n_layers)]
    reference, counterfactual, calibration = _reference_and_counterfactual_cache(
        model, pairs, attn_names
    )
    patches = []
    for layer, head in heads:
        # z: [batch, pos, head, d_head] → the sender's counterfactual value at the last position
        z_cf = gather_last(counterfactual[z_name(layer)], pairs.counterfactual_last)[:, head]
        sender = partial(_set_head_last_hook, head=head, value=z_cf, last=pairs.reference_last)
        frozen = [
            (_attn_out_name(later), partial(_replace_hook, value=reference[_attn_out_name(later)]))
            for later in range(layer + 1, n_layers)
        ]
        patches.append([(z_name(layer), sender), *frozen])
    values = _patched_logit_diffs(model, pairs, patches, metric, desc="path patching (oracle)")
    return _scores("path_oracle", _scatter(values, heads, n_layers, n_heads), calibration)


def path_patch_receivers(
    model: TransformerBridge, pairs: PatchingPairs, sender: Head, *, component: str = "q"
) -> HeadScores:
    """Path patching from one sender head into every later head's ``component`` input
    (``"q"``; ``"k"``/``"v"`` only without grouped-query attention): the sender's
    counterfactual-minus-reference write reaches only that receiver's q/k/v input, at every
    position, while every other reader sees the reference run (the direct edge of Wang et
    al., through TransformerLens ``get_act_patch_direct_path``, one forward pass per
    receiver). Needs equal-length pairs. ``score[l, h]`` is calibrated; layers up to the
    sender's are NaN (no path)."""
    method = f"path_patch_receivers(component={component!r})"
    check_pairs(model, pairs, method)
    pairs.require_equal_lengths(method)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    layer, head = validate_heads([sender], n_layers, n_heads)[0]
    z_names = [z_name(layer)]
    reference, counterfactual, calibration = _reference_and_counterfactual_cache(
        model, pairs, z_names
    )

    def mean_logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        return _last_logit_diff(logits, pairs.reference_last, pairs).mean()

    with torch.no_grad():
        logit_diff = get_act_patch_direct_path(
            model, pairs.reference.to(model.cfg.device), counterfactual, reference,
            mean_logit_diff, layer, head, component=component, verbose=False,
        ).cpu()
    logit_diff[: layer + 1] = float("nan")  # TransformerLens leaves 0.0 placeholders there
    return HeadScores(
        method=f"path_receivers_{component}",
        logit_diff=logit_diff,
        score=calibration.normalise(logit_diff),
        calibration=calibration,
    )
