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
from spt_utils.patching.knockout_attribution import knockout_attribution_heads
from spt_utils.patching.path import path_patch_heads

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
)}
