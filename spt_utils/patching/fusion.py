"""Rank fusion (issue 26): the default head ranking, path patching and knockout attribution
combined by each head's better rank."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from spt_utils.patching.heads import HeadScores


def _descending_ranks(score: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
    """Each head's rank by ``score``, 1 the largest (ties to the lower layer and head)."""
    flat = score.flatten().nan_to_num(-torch.inf)
    ranks = torch.empty_like(flat)
    ranks[flat.argsort(descending=True, stable=True)] = torch.arange(
        1, len(flat) + 1, dtype=flat.dtype)
    return ranks.view_as(score)


def combined_head_scores(path: HeadScores, knockout: HeadScores) -> Float[Tensor, "layer head"]:
    """Rank fusion of two views of a head: carrying the challenge's effect straight to the
    answer logits (path patching) and being needed for it (knockout attribution). A head's
    combined score is ``n_heads_total + 1 − its combined rank``, the heads ordered by their
    better rank (ties: by the worse rank, then by the path rank), so a head that either view
    ranks high ranks high. Both scores must come from the same pairs."""
    if path.score.shape != knockout.score.shape:
        raise ValueError(f"combined_head_scores: score shapes {list(path.score.shape)} and "
                         f"{list(knockout.score.shape)} differ")
    if abs(path.calibration.reference - knockout.calibration.reference) > 1e-3 or abs(
            path.calibration.counterfactual - knockout.calibration.counterfactual) > 1e-3:
        raise ValueError("combined_head_scores: the two scores come from different pairs "
                         "(their clean logit differences differ)")
    path_rank, knockout_rank = _descending_ranks(path.score), _descending_ranks(knockout.score)
    better = torch.minimum(path_rank, knockout_rank)
    worse = torch.maximum(path_rank, knockout_rank)
    span = path.score.numel() + 1
    key = (better.long() * span + worse.long()) * span + path_rank.long()  # lexicographic
    return _descending_ranks(-key.double()).neg() + span
