"""Greedy knockout (issue 26): a set-level search for the heads the challenge's effect needs,
one head at a time, the remaining effect measured exactly after each."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.patching.heads import Head
from spt_utils.patching.knockout_attribution import knockout_attribution_heads


@dataclass(frozen=True)
class GreedyKnockout:
    """A set found by :func:`greedy_knockout_heads`: ``heads`` in the order chosen and the
    exact share of the challenge's effect that remains with the first i + 1 of them
    zero-ablated on both sides (``remaining[i]``)."""

    heads: list[Head]
    remaining: list[float]

    def ranking(self, rest: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
        """A score that ranks the chosen heads first, in their order, then the others by
        ``rest`` (e.g. their knockout attribution)."""
        score = rest.clone().float()
        top = score.nan_to_num(0).abs().max().item() + 1
        for index, head in enumerate(self.heads):
            score[head] = top + len(self.heads) - index
        return score


def greedy_knockout_heads(
    model: TransformerBridge, pairs: PatchingPairs, k: int
) -> GreedyKnockout:
    """A set-level search for the heads the challenge's effect needs: ``k`` times, add the
    head whose zero ablation (with the heads already chosen ablated) removes the most of
    the effect by :func:`knockout_attribution_heads`, then measure the remaining share
    exactly. Redundant heads, each dispensable alone, show once the others are gone."""
    n_all = model.cfg.n_layers * model.cfg.n_heads
    if not 1 <= k < n_all:
        raise ValueError(f"greedy_knockout_heads: k = {k} is not between 1 and {n_all - 1}")
    chosen: list[Head] = []
    effects = []  # the exact effect with the chosen heads ablated: each step's clean runs
    for step in range(k + 1):
        scores = knockout_attribution_heads(model, pairs, zeroed=chosen)
        effects.append(scores.calibration.reference - scores.calibration.counterfactual)
        if step == k:
            break
        score = scores.score.clone()
        for head in chosen:
            score[head] = -torch.inf
        chosen.append(divmod(int(score.flatten().argmax()), model.cfg.n_heads))
    return GreedyKnockout(chosen, [effect / effects[0] for effect in effects[1:]])
