"""The sequence-level metric (issue 36): the teacher-forced log-probability of the model's own
caving reply against its own keeping reply, read on both sides of each matched pair.

The first-token metric reads one token (``I``/``You`` − ``Yes``), but a reply can open with
the confirm token and cave after it ("Yes, I'm sorry, I made a mistake…"). Here each pair
gets the model's own greedy replies, ``n_tokens`` tokens each (up to EOS): the **caving** one
to the doubting (reference) prompt and the **keeping** one to the counterfactual prompt. A
side's value is ``log p(caving | side) − log p(keeping | side)``, summed over each reply's
tokens; it is calibrated like the first-token metric (reference 0, counterfactual 1).

Rows are left-padded with an attention mask and mask-derived positions, as
:func:`spt_utils.chat.generate` runs, so every knockout of :mod:`spt_utils.ablation` (means
and donors aligned from the end, interchange twins) applies to them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat
from spt_utils.data import PatchingPairs
from spt_utils.patching.hooks import check_pairs
from spt_utils.patching.metrics import Calibration, _checked_calibration, answer_logit_diff

SIDES = ("reference", "counterfactual")


@dataclass(frozen=True)
class ReplyPairs:
    """Both sides of each matched pair, each followed by both of the model's replies: rows
    ``2i`` (the caving reply) and ``2i + 1`` (the keeping one) belong to pair ``i``. The two
    sides' rows are aligned token for token (one attention mask, one set of positions).
    ``scored`` marks the reply tokens the metric reads."""

    reference: Int[Tensor, "row pos"]
    counterfactual: Int[Tensor, "row pos"]
    attention: Int[Tensor, "row pos"]
    scored: Bool[Tensor, "row pos"]
    caving: list[str]
    keeping: list[str]
    question_ids: list[str]

    def __len__(self) -> int:
        return len(self.question_ids)

    @property
    def logits_to_keep(self) -> int:
        """How many final positions' logits predict every scored token (and the one after)."""
        first = self.scored.float().argmax(-1)  # each row's first scored position
        return int(self.scored.shape[1] - first.min()) + 1


def reply_pairs(
    model: TransformerBridge, pairs: PatchingPairs, *, n_tokens: int = 16,
    batch_size: int = 16,
) -> ReplyPairs:
    """The model's own greedy replies to both sides of equal-length ``pairs`` (the matched
    wording), ``n_tokens`` tokens each at most, appended to both sides
    (:func:`with_replies`)."""
    check_pairs(model, pairs, "reply_pairs")
    pairs.require_equal_lengths("reply_pairs")
    if n_tokens < 1:
        raise ValueError(f"reply_pairs: n_tokens must be >= 1, got {n_tokens}")
    caving, keeping = (chat.greedy_continuations(model, _prompts(pairs, side),
                                                 max_new_tokens=n_tokens,
                                                 batch_size=batch_size) for side in SIDES)
    return with_replies(model.tokenizer, pairs, caving, keeping)


def _prompts(pairs: PatchingPairs, side: str) -> list[Int[Tensor, " pos"]]:
    return [row[: int(last) + 1] for row, last in zip(
        getattr(pairs, side), getattr(pairs, f"{side}_last"), strict=True)]


def with_replies(
    tokenizer, pairs: PatchingPairs, caving: Sequence[Tensor], keeping: Sequence[Tensor]
) -> ReplyPairs:
    """Equal-length ``pairs`` with each pair's caving and keeping reply tokens appended to
    both of its sides."""
    pairs.require_equal_lengths("with_replies")
    if not len(caving) == len(keeping) == len(pairs):
        raise ValueError(f"with_replies: {len(caving)} caving and {len(keeping)} keeping "
                         f"replies for {len(pairs)} pairs")
    empty = [index for index, reply in enumerate([*caving, *keeping]) if not len(reply)]
    if empty:
        raise ValueError(f"with_replies: reply {empty[0] % len(pairs)} of pair "
                         f"{pairs.question_ids[empty[0] % len(pairs)]!r} is empty")
    prompts = {side: _prompts(pairs, side) for side in SIDES}
    rows: dict[str, list[Tensor]] = {side: [] for side in SIDES}
    scored = []
    for index in range(len(pairs)):
        for reply in (caving[index], keeping[index]):
            for side in SIDES:
                rows[side].append(torch.cat([prompts[side][index], reply]))
            scored.append(torch.cat([torch.zeros(len(prompts["reference"][index]),
                                                 dtype=torch.long),
                                     torch.ones(len(reply), dtype=torch.long)]))
    reference, attention = chat.pad_left(rows["reference"], tokenizer.pad_token_id)
    counterfactual, _ = chat.pad_left(rows["counterfactual"], tokenizer.pad_token_id)
    scored_mask, _ = chat.pad_left(scored, 0)
    return ReplyPairs(reference, counterfactual, attention, scored_mask.bool(),
                      [tokenizer.decode(r) for r in caving],
                      [tokenizer.decode(r) for r in keeping], list(pairs.question_ids))


def reply_log_odds(
    logits: Float[Tensor, "row kept d_vocab"], tokens: Int[Tensor, "row pos"],
    scored: Bool[Tensor, "row pos"],
) -> Float[Tensor, " pair"]:
    """Per pair, ``log p(caving reply) − log p(keeping reply)`` from the logits of the last
    ``kept`` positions (each predicting the token after it)."""
    kept = logits.shape[1]  # >= 2: the last position predicts past the row's end
    targets, mask = tokens[:, 1 - kept:], scored[:, 1 - kept:]  # [row, kept - 1]
    log_probs = logits[:, :-1].float().log_softmax(-1)
    picked = log_probs.gather(-1, targets[..., None].to(logits.device))[..., 0].cpu()
    per_row = (picked * mask).sum(-1)  # [row]: the reply's log-probability
    return per_row[0::2] - per_row[1::2]


@dataclass(frozen=True)
class MetricRuns:
    """The rows a metric reads on both sides of the pairs, aligned token for token (one
    attention mask), left-padded: ``rows_per_pair`` consecutive rows per pair, the logits of
    the last ``logits_to_keep`` positions read by ``read(logits, rows)`` into one value per
    pair (``rows``: the slice of rows those logits belong to)."""

    name: str
    reference: Int[Tensor, "row pos"]
    counterfactual: Int[Tensor, "row pos"]
    attention: Int[Tensor, "row pos"]
    rows_per_pair: int
    logits_to_keep: int
    read: Callable[[Tensor, slice], Float[Tensor, " pair"]]

    @property
    def n_pairs(self) -> int:
        return len(self.reference) // self.rows_per_pair

    @property
    def positions(self) -> Int[Tensor, "row pos"]:
        return (self.attention.cumsum(-1) - 1).clamp(min=0)

    def tokens(self, side: str) -> Int[Tensor, "row pos"]:
        if side not in SIDES:
            raise ValueError(f"side: {side!r} is not one of {SIDES}")
        return getattr(self, side)

    def select(self, rows: slice) -> MetricRuns:
        """These runs restricted to ``rows`` (a slice of whole pairs, as :meth:`chunks`)."""
        return replace(self, reference=self.reference[rows],
                       counterfactual=self.counterfactual[rows], attention=self.attention[rows],
                       read=lambda logits, chunk: self.read(logits, _compose(rows, chunk)))

    def chunks(self, batch_size: int) -> list[slice]:
        """Row slices of whole pairs, ``batch_size`` pairs each."""
        width = batch_size * self.rows_per_pair
        return [slice(start, start + width) for start in range(0, len(self.reference), width)]


def _compose(outer: slice, inner: slice) -> slice:
    """The rows ``inner`` of the rows ``outer`` (slices of :meth:`MetricRuns.chunks`)."""
    return slice(outer.start + inner.start, min(outer.start + inner.stop, outer.stop))


def sequence_runs(replies: ReplyPairs) -> MetricRuns:
    """The sequence-level metric's rows: :func:`reply_log_odds` of each pair's two rows."""
    def read(logits: Tensor, rows: slice) -> Tensor:
        return reply_log_odds(logits, replies.reference[rows], replies.scored[rows])

    return MetricRuns("sequence", replies.reference, replies.counterfactual, replies.attention,
                      2, replies.logits_to_keep, read)


def first_token_runs(pairs: PatchingPairs) -> MetricRuns:
    """The first-token metric's rows: the answer logit difference at the end of each
    equal-length pair's prompts."""
    pairs.require_equal_lengths("first_token_runs")
    pad = 0
    reference, attention = chat.pad_left(_prompts(pairs, "reference"), pad)
    counterfactual, _ = chat.pad_left(_prompts(pairs, "counterfactual"), pad)

    def read(logits: Tensor, rows: slice) -> Tensor:
        return answer_logit_diff(logits[:, -1].float(), pairs.apology_ids,
                                 pairs.confirm_ids).cpu()

    return MetricRuns("first_token", reference, counterfactual, attention, 1, 1, read)


def run_side(
    model: TransformerBridge, runs: MetricRuns, side: str, *, batch_size: int = 16,
    embeddings: Callable[[slice], Tensor] | None = None,
) -> Float[Tensor, " pair"]:
    """The metric of one side, per pair, run through the bridge's Hugging Face model (so
    every hook or knockout active on the bridge acts). With gradients enabled the result
    keeps its graph. ``embeddings(rows)``: those rows' input embeddings, given instead of
    the side's tokens (integrated gradients)."""
    tokens = runs.tokens(side)
    hf_model = chat.forward_model(model)
    device = model.cfg.device
    values = []
    for rows in runs.chunks(batch_size):
        inputs = {"input_ids": tokens[rows].to(device)} if embeddings is None else \
            {"inputs_embeds": embeddings(rows)}
        logits = hf_model(**inputs, attention_mask=runs.attention[rows].to(device),
                          position_ids=runs.positions[rows].to(device),
                          logits_to_keep=runs.logits_to_keep).logits  # [row, kept, d_vocab]
        values.append(runs.read(logits, rows))
    return torch.cat(values)


@torch.no_grad()
def calibrate_runs(model: TransformerBridge, runs: MetricRuns) -> Calibration:
    """The clean runs' metric per side, checked (reference 0, counterfactual 1)."""
    return _checked_calibration(*(run_side(model, runs, side) for side in SIDES))
