"""The metric of the challenge → apology circuit: the answer logit difference, its
calibration and the paper's ratio metric.

Convention for the calibrated metric: **reference = 0, counterfactual = 1**. The reference run
is the challenge ("I don't think that's right…"), the counterfactual the agreement ("I do
think…"). A patch or ablation scoring 1 fully removes the challenge's push toward apologising;
0.5 is the midpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.chat import forward_model, require_decoder_only
from spt_utils.data import PatchingPairs

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
    """Each right-padded row's logits at its last real position. Only those positions are
    unembedded, by the Hugging Face model (through the bridge while a hook is on it:
    :func:`spt_utils.chat.forward_model`)."""
    kept, row_last = torch.unique(last, return_inverse=True)  # kept: the rows' last positions
    hf_model = forward_model(model)
    logits = hf_model(input_ids=tokens.to(model.cfg.device),
                      logits_to_keep=kept.to(model.cfg.device)).logits  # [batch, kept, d_vocab]
    return gather_last(logits, row_last)


@dataclass(frozen=True)
class Calibration:
    """Mean logit differences of the clean runs, which fix the metric's 0 and 1, and each
    pair's own (for per-pair effects)."""

    reference: float
    counterfactual: float
    reference_pairs: tuple[float, ...] = ()
    counterfactual_pairs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if abs(self.counterfactual - self.reference) < 1e-6:
            raise ValueError(
                "The reference and counterfactual logit differences are equal "
                f"({self.reference:.4g}): the challenge has no effect to measure."
            )

    def normalise(self, logit_diff: Tensor | float) -> Tensor | float:
        """Map a (mean) logit difference to reference = 0, counterfactual = 1."""
        return (logit_diff - self.reference) / (self.counterfactual - self.reference)

    @property
    def same_sign_share(self) -> float:
        """Share of pairs whose challenge effect (reference − counterfactual) has the sign
        of the mean effect."""
        effects = torch.tensor(self.reference_pairs) - torch.tensor(self.counterfactual_pairs)
        return (torch.sign(effects) == torch.sign(effects.mean())).float().mean().item()

    def check(self) -> None:
        """Assert the convention: reference → 0, counterfactual → 1, midpoint → 0.5."""
        midpoint = (self.reference + self.counterfactual) / 2
        assert abs(self.normalise(self.reference)) < 1e-6
        assert abs(self.normalise(self.counterfactual) - 1) < 1e-6
        assert abs(self.normalise(midpoint) - 0.5) < 1e-6


def calibrate(model: TransformerBridge, pairs: PatchingPairs) -> Calibration:
    """The clean reference and counterfactual mean logit differences, checked."""
    return calibrate_token_sets(model, pairs, {"": (pairs.apology_ids, pairs.confirm_ids)})[""]


def calibrate_token_sets(
    model: TransformerBridge, pairs: PatchingPairs,
    token_sets: dict[str, tuple[Sequence[int], Sequence[int]]],
) -> dict[str, Calibration]:
    """:func:`calibrate` for each named ``(apology_ids, confirm_ids)`` token set, from one
    pass over both sides of the pairs."""
    require_decoder_only(model, "patching.calibrate")
    if len(pairs) == 0:
        raise ValueError("calibrate: the pair set is empty")
    # logits: per side, [batch, d_vocab] at each row's last position
    logits = [last_position_logits(model, tokens, last) for tokens, last in (
        (pairs.reference, pairs.reference_last),
        (pairs.counterfactual, pairs.counterfactual_last))]
    return {name: _checked_calibration(*(answer_logit_diff(side, list(apology), list(confirm))
                                         for side in logits))
            for name, (apology, confirm) in token_sets.items()}


def _checked_calibration(
    reference_diff: Float[Tensor, " batch"], counterfactual_diff: Float[Tensor, " batch"]
) -> Calibration:
    """The calibration of the clean runs' per-row logit differences, its convention asserted."""
    calibration = Calibration(reference_diff.mean().item(), counterfactual_diff.mean().item(),
                              tuple(reference_diff.tolist()), tuple(counterfactual_diff.tolist()))
    calibration.check()
    return calibration


def _last_logit_diff(
    logits: Float[Tensor, "batch pos d_vocab"], last: Tensor, pairs: PatchingPairs
) -> Float[Tensor, " batch"]:
    """The answer logit difference at each row's last real position."""
    return answer_logit_diff(gather_last(logits, last), pairs.apology_ids, pairs.confirm_ids)


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
