"""Pinpoint steering: the field's training-free mitigation, at a layer or at the found heads.

Two steerings, each a vector per hooked component read off the patching pairs, and
subtracted ``alpha`` times at **every position** while the model runs:

* **residual** (contrastive activation addition, Rimsky et al., 2024): at layer ``L`` the
  vector is the mean over pairs of the reference − counterfactual residual stream
  (``blocks.{L}.hook_resid_post``) at the last position;
* **heads** (inference-time intervention at the found heads, after Li et al., 2023): each
  head's mean reference − counterfactual output ``z`` (``blocks.{l}.attn.hook_z``, the input
  to the output projection) at the last position, subtracted at that head.

:func:`steer` is a context manager like :func:`spt_utils.ablation.knockout`: every forward
pass of the bridge or its Hugging Face model inside the block (so also generation, through
:func:`spt_utils.chat.generate`) is steered, and the hooks go on exit, also after an error.
``alpha = 0`` registers no hook at all (the identity, bit for bit). The controls
(:func:`random_control`) keep each vector's norm and draw its direction at random, at the
same layer or at as many random heads; :func:`cost_matched` then sets the control's ``alpha``
so that it costs what the chosen steering costs: the same KL drift from base on the dev
split's question prompts (within ``KL_TOLERANCE``), so a control that does less is no
weaker intervention in disguise, and one that does as much is a real null.

Steering computes and draws nothing; :func:`candidate` wraps a steering as an
:class:`~spt_utils.evaluation.Candidate` whose every forward pass is steered, and
:func:`choose` picks the setting on the dev split by the tuning sweep's rule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import ablation, chat, evaluation, stats
from spt_utils.data import PatchingPairs
from spt_utils.evaluation import Candidate
from spt_utils.patching import Head, cache_before_unembed, validate_heads, z_name

KINDS = ("heads", "residual")
KL_TOLERANCE = 0.1  # a cost-matched control's dev KL is within 10% of its steering's


def resid_name(layer: int) -> str:
    """The hook residual steering acts at: layer ``layer``'s output residual stream."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class Steering:
    """What is steered: ``kind`` ``"residual"`` (one vector at ``layer``) or ``"heads"``
    (one per head of ``heads``); ``vectors`` [component, width] (d_model or d_head);
    ``n_pairs`` the pairs they were read off (0 for a random control); ``label`` names a
    control and ``match`` records how a control's ``alpha`` was matched on cost
    (:func:`cost_matched`)."""

    kind: str
    vectors: Float[Tensor, "component width"]
    layer: int | None = None
    heads: tuple[Head, ...] = ()
    n_pairs: int = 0
    label: str = ""
    match: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        where = f"L{self.layer}" if self.kind == "residual" else f"{len(self.heads)} heads"
        return f"steer {self.kind} {where}{' ' + self.label if self.label else ''}"

    def norms(self) -> Float[Tensor, " component"]:
        return self.vectors.norm(dim=-1)


@torch.no_grad()
def _mean_difference(
    model: TransformerBridge, pairs: PatchingPairs, names: list[str], batch_size: int
) -> dict[str, Tensor]:
    """Per hook: the mean over pairs of reference − counterfactual at each side's last
    position (float64 sums)."""
    chat.require_decoder_only(model, "steering (a decoder's residual stream and heads)")
    if len(pairs) == 0:
        raise ValueError("steering: no patching pairs to read a direction off")
    sums: dict[str, Tensor] = {}
    for start in range(0, len(pairs), batch_size):
        rows = slice(start, start + batch_size)
        sides = []
        for tokens, last in ((pairs.reference, pairs.reference_last),
                             (pairs.counterfactual, pairs.counterfactual_last)):
            width = int(last[rows].max()) + 1  # right-padded: drop the pad-only tail
            sides.append(cache_before_unembed(model, tokens[rows, :width], names,
                                              last=last[rows]))
        for name in names:
            difference = (sides[0][name] - sides[1][name]).double().sum(0).cpu()
            sums[name] = sums.get(name, 0) + difference
    return {name: total / len(pairs) for name, total in sums.items()}


def _check_layer(model: TransformerBridge, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"residual_steering: layer {layer} is not in 0..{model.cfg.n_layers - 1}")


def _residual_from(
    model: TransformerBridge, means: Mapping[str, Tensor], layer: int, n_pairs: int
) -> Steering:
    # resid_post at the last position, averaged: [d_model]
    return Steering("residual", means[resid_name(layer)][None].to(model.cfg.dtype), layer=layer,
                    n_pairs=n_pairs)


def _heads_from(
    model: TransformerBridge, means: Mapping[str, Tensor], heads: Sequence[Head], n_pairs: int
) -> Steering:
    # z at the last position, averaged, per layer: [head, d_head]
    vectors = torch.stack([means[z_name(layer)][head] for layer, head in heads])
    return Steering("heads", vectors.to(model.cfg.dtype), heads=tuple(heads), n_pairs=n_pairs)


def _checked_heads(model: TransformerBridge, heads: Sequence[Head]) -> list[Head]:
    heads = validate_heads([tuple(h) for h in heads], model.cfg.n_layers, model.cfg.n_heads)
    if not heads:
        raise ValueError("head_steering: no heads to steer")
    return heads


def _head_names(heads: Sequence[Head]) -> list[str]:
    return [z_name(layer) for layer in sorted({layer for layer, _ in heads})]


def residual_steering(
    model: TransformerBridge, pairs: PatchingPairs, layer: int, *, batch_size: int = 8
) -> Steering:
    """The residual steering vector at ``layer``: mean reference − counterfactual
    ``hook_resid_post`` at the last position."""
    _check_layer(model, layer)
    means = _mean_difference(model, pairs, [resid_name(layer)], batch_size)
    return _residual_from(model, means, layer, len(pairs))


def head_steering(
    model: TransformerBridge, pairs: PatchingPairs, heads: Sequence[Head], *,
    batch_size: int = 8,
) -> Steering:
    """One vector per head of ``heads``: its mean reference − counterfactual ``z`` at the
    last position."""
    heads = _checked_heads(model, heads)
    means = _mean_difference(model, pairs, _head_names(heads), batch_size)
    return _heads_from(model, means, heads, len(pairs))


def random_control(
    steering: Steering, *, seed: int = 0, heads: Sequence[Head] | None = None
) -> Steering:
    """The control: each vector's norm kept, its direction drawn uniformly (seeded); a head
    steering moves to ``heads`` (as many, e.g. ``ablation.random_head_sets``)."""
    if steering.kind == "heads" and (heads is None or len(heads) != len(steering.heads)):
        raise ValueError(f"random_control: a head steering needs {len(steering.heads)} "
                         "random heads")
    if steering.kind == "residual" and heads is not None:
        raise ValueError("random_control: a residual steering takes no heads")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(steering.vectors.shape, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=-1, keepdim=True)
    vectors = (directions * steering.norms().double()[:, None]).to(steering.vectors.dtype)
    return replace(steering, vectors=vectors, heads=tuple(map(tuple, heads or ())),
                   n_pairs=0, label=f"random {seed}")


def _subtract_resid(
    resid: Float[Tensor, "batch pos d_model"], hook: HookPoint, *, shift: Float[Tensor, " d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    return resid - shift.to(resid)


def _subtract_heads(
    z: Float[Tensor, "batch pos head d_head"], hook: HookPoint, *,
    shift: Float[Tensor, "head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    return z - shift.to(z)  # zero rows for the heads not steered


def _hooks(model: TransformerBridge, steering: Steering, alpha: float) -> list:
    if steering.kind == "residual":
        return [(resid_name(steering.layer),
                 partial(_subtract_resid, shift=alpha * steering.vectors[0]))]
    if steering.kind != "heads":
        raise ValueError(f"steer: kind {steering.kind!r} is not one of {KINDS}")
    width = (model.cfg.n_heads, model.cfg.d_head)
    expected = (len(steering.heads), model.cfg.d_head)
    if tuple(steering.vectors.shape) != expected:
        raise ValueError(f"steer: {len(steering.heads)} heads need vectors of shape "
                         f"{expected}, not {tuple(steering.vectors.shape)}")
    shifts: dict[int, Tensor] = {}
    for (layer, head), vector in zip(steering.heads, steering.vectors, strict=True):
        shifts.setdefault(layer, torch.zeros(width, dtype=vector.dtype))[head] = alpha * vector
    return [(z_name(layer), partial(_subtract_heads, shift=shift))
            for layer, shift in sorted(shifts.items())]


@contextlib.contextmanager
def steer(model: TransformerBridge, steering: Steering, alpha: float) -> Iterator[None]:
    """Steer every forward pass inside the ``with`` block: ``alpha`` × each vector subtracted
    at its component, at every position. ``alpha = 0`` registers no hook."""
    if alpha == 0:
        yield
        return
    with model.hooks(fwd_hooks=_hooks(model, steering, float(alpha))):
        yield


def candidate(
    name: str, model: TransformerBridge, steering: Steering, alpha: float
) -> Candidate:
    """The base ``model`` steered, as an evaluation candidate: the steering is on during
    its every forward pass (generation and KL drift), and off for the base's."""
    return Candidate(name, model, hooks=partial(steer, model, steering, alpha))


def control_heads(
    steering: Steering, n_layers: int, n_heads: int, *, seed: int = 0
) -> list[Head]:
    """As many random heads as ``steering`` steers, none of them its own
    (:func:`spt_utils.ablation.random_head_sets`)."""
    return ablation.random_head_sets(len(steering.heads), 1, n_layers, n_heads, seed=seed,
                                     exclude=steering.heads)[0]


def _check_alphas(kind: str, alphas: Sequence[float]) -> None:
    if not alphas or any(alpha <= 0 for alpha in alphas):
        raise ValueError(f"steering.settings: {kind} alphas {list(alphas)} must be given and "
                         "positive (alpha = 0 is the base model)")


def settings(
    model: TransformerBridge, pairs: PatchingPairs, *, heads: Sequence[Head] = (),
    layers: Sequence[int] = (), head_alphas: Sequence[float] = (),
    residual_alphas: Sequence[float] = (), batch_size: int = 8,
) -> list[tuple[Steering, float]]:
    """The grid to choose from: head steering at ``heads`` (when given) with every one of
    ``head_alphas``, and residual steering at each of ``layers`` with every one of
    ``residual_alphas`` (each kind its own grid: a head's ``z`` and the residual stream
    differ in scale); every vector is read off in one pass over the pairs."""
    if heads:
        _check_alphas("head", head_alphas)
    if layers:
        _check_alphas("residual", residual_alphas)
    heads = _checked_heads(model, heads) if heads else []
    for layer in layers:
        _check_layer(model, layer)
    # every vector off the same forward passes over the pairs
    names = _head_names(heads) + [resid_name(layer) for layer in layers]
    means = _mean_difference(model, pairs, names, batch_size) if names else {}
    steerings = [_heads_from(model, means, heads, len(pairs))] if heads else []
    steerings += [_residual_from(model, means, layer, len(pairs)) for layer in layers]
    alphas = {"heads": head_alphas, "residual": residual_alphas}
    return [(steering, float(alpha)) for steering in steerings
            for alpha in alphas[steering.kind]]


def measure(
    model: TransformerBridge, grid: Sequence[tuple[Steering, float]], *,
    questions: Sequence[dict], answers: Mapping[str, dict], progress: bool = False,
    **evaluate: Any,
) -> list[dict[str, Any]]:
    """Each setting of ``grid`` on ``questions`` (the dev split's), base's own first
    ``answers`` given: :func:`spt_utils.evaluation.evaluate_candidate`'s row without KL, with
    ``kind``, ``layer``, ``heads`` and ``alpha``, and ``paired["general_accuracy"]``: exact
    McNemar of its first answers against base's in ``answers``."""
    base = Candidate("base", model)
    base_general = [answers[q["id"]]["correct"] for q in questions]
    rows = []
    for steering, alpha in tqdm(grid, desc="steering on dev", disable=not progress):
        records, row = evaluation.evaluate_candidate(
            candidate(steering.name, model, steering, alpha), base, questions=questions,
            answers=answers, **evaluate)
        general = [record["general_correct"] for record in records]
        rows.append({"name": f"{steering.name} alpha={alpha:g}", "kind": steering.kind,
                     "layer": steering.layer, "heads": [list(h) for h in steering.heads],
                     "alpha": alpha, **row,
                     "paired": {"general_accuracy": stats.mcnemar(base_general, general)}})
    return rows


def keeps_general(
    row: Mapping[str, Any], alpha: float = 0.05, key: str = "general_accuracy"
) -> bool:
    """Is the row's general ability (its own first answers) not significantly below base's
    (exact McNemar at ``alpha``; ``row["paired"][key]``)? The tuning sweep's rule too
    (``benchmarks/sweep_tuning.py``, whose rows say ``"general"``)."""
    test = row["paired"][key]
    return not (test["difference"] < 0 and test["p"] < alpha)


def choose(rows: Sequence[Mapping[str, Any]], target: str = "admitted") -> Mapping[str, Any]:
    """The setting chosen on the dev split by the tuning sweep's rule: among the rows whose
    general ability is not significantly below base's (all of them when none is), the lowest
    ``target`` rate; ties go to the smaller ``alpha`` (the lighter intervention)."""
    if not rows:
        raise ValueError("steering.choose: no settings measured")
    kept = [row for row in rows if keeps_general(row)] or list(rows)
    return min(kept, key=lambda row: (row[target]["value"], abs(row["alpha"])))


def dev_kl(
    model: TransformerBridge, steering: Steering, alpha: float, kl_base: evaluation.KLBase
) -> float:
    """The mean per-token KL(base ‖ steered) on ``kl_base``'s documents (the dev split's)."""
    return evaluation.kl_drift(kl_base, candidate("dev", model, steering, alpha),
                               kl_base.documents, max_tokens=kl_base.max_tokens,
                               batch_size=kl_base.batch_size)


def cost_matched(
    model: TransformerBridge, control: Steering, target_kl: float,
    kl_base: evaluation.KLBase, *, start: float, tolerance: float = KL_TOLERANCE,
    max_steps: int = 40, max_doublings: int = 10,
) -> tuple[Steering, float]:
    """``control`` and the ``alpha`` at which its dev KL (:func:`dev_kl`) is within
    ``tolerance`` (relative) of ``target_kl``: from ``start``, doubled (at most
    ``max_doublings`` times) until the KL passes the target, then bisected between the last
    ``alpha`` below it (0 at first: KL 0) and the first above (KL is continuous in ``alpha``,
    so a crossing lies between). The returned control's ``match`` holds the target, its own
    KL, the steps and whether it matched; one that did not (the steps or the doublings ran
    out) comes with the closest ``alpha`` measured."""
    if not target_kl > 0 or start <= 0:
        raise ValueError(f"cost_matched: the target KL ({target_kl}) and the start alpha "
                         f"({start}) must be positive")
    alpha, below, above = float(start), 0.0, math.inf
    measured: list[tuple[float, float]] = []  # (alpha, its KL)
    for _step in range(max_steps):
        kl = dev_kl(model, control, alpha, kl_base)
        measured.append((alpha, kl))
        if abs(kl - target_kl) <= tolerance * target_kl:
            break
        below, above = (alpha, above) if kl < target_kl else (below, alpha)
        if math.isinf(above) and alpha >= start * 2 ** max_doublings:
            break  # the control does not reach the target's cost
        alpha = 2 * alpha if math.isinf(above) else (below + above) / 2
    alpha, kl = min(measured, key=lambda pair: abs(pair[1] - target_kl))
    match = {"on": "dev KL", "target_kl": target_kl, "kl": kl, "tolerance": tolerance,
             "matched": abs(kl - target_kl) <= tolerance * target_kl, "steps": len(measured)}
    return replace(control, match=match), alpha


def chosen_with_controls(
    model: TransformerBridge, grid: Sequence[tuple[Steering, float]],
    rows: Sequence[Mapping[str, Any]], *, kl_base: evaluation.KLBase,
    target: str = "admitted", seed: int = 0, tolerance: float = KL_TOLERANCE,
) -> dict[str, tuple[Steering, float]]:
    """Per kind measured (``rows``: :func:`measure` of ``grid``), the dev choice
    (:func:`choose`) as ``steer_<kind>`` and its control as ``steer_<kind>_random``: random
    directions of the same norms, at the same layer or at as many random heads, at the
    ``alpha`` that costs what the choice costs (:func:`cost_matched`: the same KL drift on
    ``kl_base``'s dev documents within ``tolerance``)."""
    if len(rows) != len(grid):
        raise ValueError(f"steering: {len(rows)} measured rows for a grid of {len(grid)}")
    result = {}
    for kind in KINDS:
        measured = [row for row in rows if row["kind"] == kind]
        if not measured:
            continue
        chosen = choose(measured, target)
        steering, alpha = grid[next(i for i, row in enumerate(rows) if row is chosen)]
        heads = (control_heads(steering, model.cfg.n_layers, model.cfg.n_heads, seed=seed)
                 if kind == "heads" else None)
        result[f"steer_{kind}"] = (steering, alpha)
        result[f"steer_{kind}_random"] = cost_matched(
            model, random_control(steering, seed=seed, heads=heads),
            dev_kl(model, steering, alpha, kl_base), kl_base, start=alpha, tolerance=tolerance)
    return result


class SteeringProbe(ablation.KnockoutProbe):
    """The head lab's probe (:class:`spt_utils.viz.HeadLab`) with a steering mode: beside
    the knockout methods, ``"steer"`` subtracts ``alpha`` × each clicked head's steering
    vector at that head (:func:`steer`; ``alpha`` is the lab's slider). The vectors are read
    off ``steer_pairs`` (notebook 01's patching pairs, not the lab's held-out questions),
    every head's in one pass at the first steered update. The other
    arguments are :class:`~spt_utils.ablation.KnockoutProbe`'s."""

    scaled_methods = ("steer",)
    # the same vector at every position
    split_invariant_methods = (*ablation.KnockoutProbe.split_invariant_methods, "steer")

    def __init__(self, model: TransformerBridge, questions: Sequence[dict],
                 answers: Mapping[str, dict], *, steer_pairs: PatchingPairs,
                 **knockout: Any) -> None:
        super().__init__(model, questions, answers, **knockout)
        self.steer_pairs = steer_pairs
        self._means: dict[str, Tensor] | None = None  # z name → [head, d_head], once

    @property
    def methods(self) -> tuple[str, ...]:
        return (*super().methods, *self.scaled_methods)

    def steering(self, heads: Sequence[Head]) -> Steering:
        """The head steering at ``heads``, from the vectors read off ``steer_pairs``."""
        heads = _checked_heads(self.model, heads)
        if self._means is None:  # every head's vector, so any later click costs no pass
            names = [z_name(layer) for layer in range(self.model.cfg.n_layers)]
            self._means = _mean_difference(self.model, self.steer_pairs, names,
                                           self.batch_size)
        return _heads_from(self.model, self._means, heads, len(self.steer_pairs))

    def intervention(
        self, heads: Sequence[Head], method: str, alpha: float | None = None
    ) -> contextlib.AbstractContextManager:
        """:func:`steer` at ``heads`` for ``"steer"`` (no heads: the identity), else the
        knockout."""
        if method not in self.scaled_methods:
            return super().intervention(heads, method, alpha)
        self._check_alpha(method, alpha)
        return steer(self.model, self.steering(heads), alpha) if heads else contextlib.nullcontext()

    def pair_metrics(
        self, heads: Sequence[Head], method: str, alpha: float | None = None
    ) -> dict:
        """Both sides of every pair, clean and steered
        (:func:`spt_utils.ablation.summarize_pairs`)."""
        if method not in self.scaled_methods:
            return super().pair_metrics(heads, method, alpha)
        steered = self.clean()  # no heads: nothing steered
        if heads:
            with self.intervention(heads, method, alpha):
                steered = ablation.clean_logit_diffs(self.model, self.pairs,
                                                     batch_size=self.batch_size)
        return ablation.summarize_pairs(self.pairs, self.clean(), steered, heads=heads,
                                        method=method, n_boot=self.n_boot, seed=self.seed)
