"""The registry of head-finding methods (:data:`FINDERS`) that notebook 02,
``benchmarks/bench_recovery.py`` and the tests share.

Every method's :meth:`Finder.score` is a ``[layer, head]`` score, higher for a head that
carries more of the challenge's effect (the ranking of :func:`~spt_utils.organism.recovery`
and the head selector); its own result (:meth:`Finder.result`: a :class:`HeadScores`, a
:class:`GreedyKnockout` or the combined score) is kept in a :data:`Found` dict, so a method
that builds on others (``uses``) reads their results instead of running them again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data import PatchingPairs
from spt_utils.patching.activation import activation_patch_heads
from spt_utils.patching.attribution import attribution_patch_heads
from spt_utils.patching.fusion import combined_head_scores
from spt_utils.patching.greedy import GreedyKnockout, greedy_knockout_heads
from spt_utils.patching.heads import HeadScores
from spt_utils.patching.integrated import greedy_interchange_heads, integrated_gradients_heads
from spt_utils.patching.knockout_attribution import knockout_attribution_heads
from spt_utils.patching.path import path_patch_heads
from spt_utils.patching.sequence import (
    MetricRuns,
    first_token_runs,
    reply_pairs,
    sequence_runs,
)

Found = dict[str, Any]
"""The head-finding results on one set of pairs, by method name (see :meth:`Finder.result`)."""


def _score_of(result: HeadScores, found: Found) -> Float[Tensor, "layer head"]:
    return result.score


@dataclass(frozen=True)
class Finder:
    """A head-finding method. ``run(model, pairs, found, **options)`` computes its own result,
    after the methods it ``uses``; ``rank(result, found)`` reads its score off it (by default
    a :class:`HeadScores`' calibrated score). ``label`` names it in tables; ``default`` marks
    the ranking notebook 02 selects heads by unless told otherwise."""

    name: str
    label: str
    description: str
    run: Callable[..., Any]
    rank: Callable[[Any, Found], Float[Tensor, "layer head"]] = _score_of
    uses: tuple[str, ...] = ()
    default: bool = False

    def result(
        self, model: TransformerBridge, pairs: PatchingPairs, found: Found | None = None,
        **options: Any,
    ) -> Any:
        """The method's own result on ``pairs``: ``found[name]`` when there, else computed
        and kept in ``found``, like those of the methods it uses (with their defaults). One
        ``found`` holds one set of pairs and options: pass another (or none) for others."""
        found = {} if found is None else found
        for name in self.uses:
            FINDERS[name].result(model, pairs, found)
        if self.name not in found:
            found[self.name] = self.run(model, pairs, found, **options)
        return found[self.name]

    def score(
        self, model: TransformerBridge, pairs: PatchingPairs, found: Found | None = None,
        **options: Any,
    ) -> Float[Tensor, "layer head"]:
        """Every head's score, higher for a head that carries more of the challenge's effect
        (NaN: not scored); ``found`` and ``options`` as in :meth:`result`."""
        found = {} if found is None else found
        return self.rank(self.result(model, pairs, found, **options), found)


def _alone(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method(model, pairs, **options)`` as a :attr:`Finder.run` that reads no other result."""

    def run(model: TransformerBridge, pairs: PatchingPairs, found: Found, **options: Any) -> Any:
        return method(model, pairs, **options)

    return run


def _combined(
    model: TransformerBridge, pairs: PatchingPairs, found: Found
) -> Float[Tensor, "layer head"]:
    return combined_head_scores(found["path"], found["knockout_attribution"])


def _itself(score: Float[Tensor, "layer head"], found: Found) -> Float[Tensor, "layer head"]:
    return score


METRICS = ("sequence", "first_token")
"""The metrics a matched-pairs method reads (:mod:`~spt_utils.patching.sequence`)."""


def metric_runs(
    model: TransformerBridge, pairs: PatchingPairs, found: Found, metric: str
) -> MetricRuns:
    """The rows ``metric`` reads on equal-length ``pairs``; the sequence metric's replies
    (the model's own, generated once) are kept in ``found["replies"]``."""
    if metric == "first_token":
        return first_token_runs(pairs)
    if metric != "sequence":
        raise ValueError(f"metric: {metric!r} is not one of {METRICS}")
    if "replies" not in found:
        found["replies"] = reply_pairs(model, pairs)
    return sequence_runs(found["replies"])


def _integrated(
    model: TransformerBridge, pairs: PatchingPairs, found: Found, *, metric: str = "sequence",
    **options: Any,
) -> HeadScores:
    return integrated_gradients_heads(model, metric_runs(model, pairs, found, metric),
                                      **options)


def _greedy_interchange(
    model: TransformerBridge, pairs: PatchingPairs, found: Found, *, k: int,
    metric: str = "sequence", **options: Any,
) -> GreedyKnockout:
    return greedy_interchange_heads(model, metric_runs(model, pairs, found, metric), k,
                                    **options)


def _greedy_interchange_ranking(
    greedy: GreedyKnockout, found: Found
) -> Float[Tensor, "layer head"]:
    """The greedy set first, in its order, then the other heads by integrated gradients."""
    return greedy.ranking(found["integrated_gradients"].score)


def _denoising(
    model: TransformerBridge, pairs: PatchingPairs, found: Found, **options: Any
) -> HeadScores:
    """Activation patching from the doubting run into the counterfactual one: each head's
    score is the share of the effect it restores alone (sufficiency)."""
    position = options.pop("position", "all" if pairs.same_lengths else "last")
    return activation_patch_heads(model, pairs.swapped(), position=position, **options)


def _noising(
    model: TransformerBridge, pairs: PatchingPairs, found: Found, **options: Any
) -> HeadScores:
    """Activation patching of each head's z from the counterfactual run into the doubting one
    at every position: the interchange knockout of that head alone, everything downstream
    live; its score is the share of the effect it removes (necessity; matched pairs)."""
    return activation_patch_heads(model, pairs, position="all", **options)


def _greedy_ranking(greedy: GreedyKnockout, found: Found) -> Float[Tensor, "layer head"]:
    """The greedy set first, in its order, then the other heads by knockout attribution."""
    return greedy.ranking(found["knockout_attribution"].score)


FINDERS: dict[str, Finder] = {finder.name: finder for finder in (
    Finder("path", "path patching",
           "Exact path patching of each head's last-position output to the logits, later "
           "attention frozen (the paper's ranking).", _alone(path_patch_heads)),
    Finder("attribution", "attribution patching",
           "The first-order estimate of activation patching, from one backward pass "
           "(options: position).", _alone(attribution_patch_heads)),
    Finder("activation", "activation patching",
           "Activation patching of each head's output, everything downstream live (options: "
           "position, layers, metric).", _alone(activation_patch_heads)),
    Finder("knockout_attribution", "knockout attribution",
           "The first-order share of the challenge's effect that zero-ablating each head on "
           "both sides removes (options: zeroed).", _alone(knockout_attribution_heads)),
    Finder("combined", "combined",
           "Path patching and knockout attribution rank-fused: each head ranked by the better "
           "of its two ranks.", _combined, _itself, uses=("path", "knockout_attribution"),
           default=True),
    Finder("greedy", "greedy knockout (set)",
           "A greedy search for k heads whose joint knockout removes the most of the effect, "
           "ranked first, then the rest by knockout attribution (option k: required).",
           _alone(greedy_knockout_heads), _greedy_ranking, uses=("knockout_attribution",)),
    Finder("denoising", "denoising",
           "Activation patching the other way: each head's z from the doubting run into the "
           "counterfactual one (every position on matched pairs), the share of the effect it "
           "restores alone (options: position, layers).", _denoising),
    Finder("noising", "noising (interchange)",
           "Activation patching of each head's z from the counterfactual run into the "
           "doubting one at every position (matched pairs): the exact interchange of that "
           "head alone, the share of the effect it removes (options: layers).", _noising),
    Finder("integrated_gradients", "integrated gradients",
           "EAP-IG style: interchanging each head (every position, matched pairs) estimated "
           "by gradients integrated along the path from the doubting to the counterfactual "
           "input (options: metric 'sequence' or 'first_token', steps).", _integrated),
    Finder("greedy_interchange", "greedy interchange (set)",
           "A greedy search for k heads whose joint interchange removes the most of the "
           "effect, by integrated gradients with the heads chosen so far interchanged, then "
           "the rest by integrated gradients (options: k required, metric, steps).",
           _greedy_interchange, _greedy_interchange_ranking, uses=("integrated_gradients",)),
)}
