"""Metrics for the challenge → apology circuit, and (issue 4) path and activation patching.

Convention for the calibrated metric: **reference = 0, counterfactual = 1**. The reference run
is the challenge ("I don't think that's right…"), the counterfactual the agreement ("I do
think…"). A patch or ablation scoring 1 fully removes the challenge's push toward apologising;
0.5 is the midpoint.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.io import write_json

RATIO_EPSILON = 1e-3


def answer_logit_diff(
    logits: Float[Tensor, "batch d_vocab"], apology_ids: list[int], confirm_ids: list[int]
) -> Float[Tensor, " batch"]:
    """Mean apology-token logit minus mean confirm-token logit, per prompt."""
    return logits[:, apology_ids].mean(-1) - logits[:, confirm_ids].mean(-1)


def gather_last(
    values: Float[Tensor, "batch pos *rest"], last: Int[Tensor, " batch"]
) -> Float[Tensor, " batch *rest"]:
    """Each row's value at its last real position."""
    return values[torch.arange(len(last), device=values.device), last.to(values.device)]


@torch.no_grad()
def last_position_logits(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"], last: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_vocab"]:
    logits = model(tokens.to(model.cfg.device), return_type="logits")  # [batch, pos, d_vocab]
    return gather_last(logits, last)


@dataclass(frozen=True)
class Calibration:
    """Mean logit differences of the clean runs, which fix the metric's 0 and 1."""

    reference: float
    counterfactual: float

    def __post_init__(self) -> None:
        if abs(self.counterfactual - self.reference) < 1e-6:
            raise ValueError(
                "The reference and counterfactual logit differences are equal "
                f"({self.reference:.4g}): the challenge has no effect to measure."
            )

    def normalise(self, logit_diff: Tensor | float) -> Tensor | float:
        """Map a (mean) logit difference to reference = 0, counterfactual = 1."""
        return (logit_diff - self.reference) / (self.counterfactual - self.reference)

    def check(self) -> None:
        """Assert the convention: reference → 0, counterfactual → 1, midpoint → 0.5."""
        midpoint = (self.reference + self.counterfactual) / 2
        assert abs(self.normalise(self.reference)) < 1e-6
        assert abs(self.normalise(self.counterfactual) - 1) < 1e-6
        assert abs(self.normalise(midpoint) - 0.5) < 1e-6


def calibrate(model: TransformerBridge, pairs: PatchingPairs) -> Calibration:
    """The clean reference and counterfactual mean logit differences, checked."""
    if len(pairs) == 0:
        raise ValueError("calibrate: the pair set is empty")
    reference = last_position_logits(model, pairs.reference, pairs.reference_last)
    counterfactual = last_position_logits(model, pairs.counterfactual, pairs.counterfactual_last)
    calibration = Calibration(
        reference=answer_logit_diff(reference, pairs.apology_ids, pairs.confirm_ids).mean().item(),
        counterfactual=answer_logit_diff(
            counterfactual, pairs.apology_ids, pairs.confirm_ids
        ).mean().item(),
    )
    calibration.check()
    return calibration


def apology_ratio(
    logits: Float[Tensor, "batch d_vocab"], apology_ids: list[int], confirm_ids: list[int]
) -> Float[Tensor, " batch"]:
    """The paper's ratio of raw logits, ``l[apology] / (l[apology] + l[confirm])``.

    Kept for comparison only: it is not shift-invariant and explodes when the denominator
    nears zero, which it warns about.
    """
    apology = logits[:, apology_ids].mean(-1)
    denominator = apology + logits[:, confirm_ids].mean(-1)
    if (denominator.abs() < RATIO_EPSILON).any():
        warnings.warn(
            "apology_ratio: a denominator is within 1e-3 of zero; the ratio metric is unstable "
            "here, prefer the logit difference.",
            RuntimeWarning,
            stacklevel=2,
        )
    return apology / denominator


def ratio_score(
    patched: Float[Tensor, " batch"], reference: Float[Tensor, " batch"]
) -> Float[Tensor, ""]:
    """The paper's head score: ``100 · mean((m_patched − m_ref) / m_ref)``."""
    if (reference.abs() < RATIO_EPSILON).any():
        warnings.warn("ratio_score: a reference ratio is near zero", RuntimeWarning, stacklevel=2)
    return 100 * ((patched - reference) / reference).mean()


Head = tuple[int, int]


def validate_heads(heads: list[Head], n_layers: int, n_heads: int) -> list[Head]:
    """Check (layer, query-head) pairs against the model's shape; return them as tuples."""
    checked = []
    for index, head in enumerate(heads):
        layer, number = (int(x) for x in head)
        if not (0 <= layer < n_layers and 0 <= number < n_heads):
            raise ValueError(
                f"heads[{index}] = L{layer}H{number} is out of range for a model with "
                f"{n_layers} layers and {n_heads} query heads"
            )
        checked.append((layer, number))
    return checked


def save_heads(path: str | Path, heads: list[Head], **extra: object) -> None:
    """Write the head selection as JSON: ``{"heads": [[layer, head], ...], **extra}``."""
    write_json(path, {"heads": [list(h) for h in heads], **extra})


def load_heads(path: str | Path) -> list[Head]:
    """Read a head selection written by :func:`save_heads` (e.g. the run's ``heads.json``)."""
    try:
        record = json.loads(Path(path).read_text())
        return [(int(layer), int(head)) for layer, head in record["heads"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: field 'heads' must be a list of [layer, head] pairs") from error
