"""The metric's answer tokens, chosen from how the model's own greedy replies open."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from spt_utils.chat import require_decoder_only
from spt_utils.data import APOLOGY_WORDS, CONFIRM_WORDS, PatchingPairs, answer_token_ids
from spt_utils.io import check_provenance, write_json
from spt_utils.patching.metrics import last_position_logits


@dataclass(frozen=True)
class AnswerTokens:
    """The metric's answer tokens: ``apology_ids`` open the model's replies to the doubting
    challenge, ``confirm_ids`` those to the counterfactual one. ``openings`` counts, per side
    ("reference", "counterfactual"), how many greedy replies open with each token id;
    ``source`` says per set ("apology", "confirm") whether the replies chose it ("replies")
    or given words stand in ("words")."""

    apology_ids: list[int]
    confirm_ids: list[int]
    openings: dict[str, dict[int, int]]
    source: dict[str, str]
    provenance: dict | None = None

    @classmethod
    def from_words(
        cls, tokenizer: PreTrainedTokenizerBase, apology: Sequence[str], confirm: Sequence[str]
    ) -> AnswerTokens:
        """Answer tokens given as words (one token each), no replies counted."""
        return cls(answer_token_ids(tokenizer, apology), answer_token_ids(tokenizer, confirm),
                   {}, {"apology": "words", "confirm": "words"})

    def apply(self, pairs: PatchingPairs) -> PatchingPairs:
        """``pairs`` with these answer tokens."""
        return replace(pairs, apology_ids=list(self.apology_ids),
                       confirm_ids=list(self.confirm_ids))

    def save(self, path: str | Path, *, provenance: dict | None = None) -> None:
        record = asdict(self) | ({"provenance": provenance} if provenance else {})
        record["openings"] = {side: {str(t): n for t, n in counts.items()}
                              for side, counts in self.openings.items()}
        write_json(path, record)

    @classmethod
    def load(cls, path: str | Path, *, expect: dict | None = None) -> AnswerTokens:
        """Read :meth:`save`'s file; with ``expect`` its provenance must match."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
            record["openings"] = {side: {int(t): int(n) for t, n in counts.items()}
                                  for side, counts in record["openings"].items()}
            tokens = cls(**record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not an answer-token file ({error!r})") from error
        check_provenance(tokens.provenance, expect, str(path))
        return tokens


@torch.no_grad()
def reply_openings(
    model: TransformerBridge, pairs: PatchingPairs, *, batch_size: int = 16
) -> dict[str, Int[Tensor, " batch"]]:
    """The first token of the model's greedy reply to each side of each pair: the argmax of
    the next-token logits at the end of the generation prompt."""
    require_decoder_only(model, "patching.reply_openings")
    openings = {}
    for side, tokens, last in (("reference", pairs.reference, pairs.reference_last),
                               ("counterfactual", pairs.counterfactual,
                                pairs.counterfactual_last)):
        openings[side] = torch.cat([
            last_position_logits(model, tokens[start:start + batch_size],
                                 last[start:start + batch_size]).argmax(-1).cpu()
            for start in range(0, len(pairs), batch_size)])
    return openings


def answer_tokens_from_replies(
    model: TransformerBridge,
    pairs: PatchingPairs,
    *,
    min_share: float = 0.1,
    fallback: tuple[Sequence[str], Sequence[str]] | None = (APOLOGY_WORDS, CONFIRM_WORDS),
) -> AnswerTokens:
    """Answer tokens chosen from how the model's own replies open: apology tokens open more
    replies to the doubting challenge than to the counterfactual one, confirm tokens the
    reverse; each opens at least ``min_share`` of its side's replies, most discriminating
    first. Where no token tells a side apart, ``fallback``'s (apology, confirm) words stand
    in for that set (``source`` says so); with ``fallback=None`` that is an error."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share: {min_share} is not in (0, 1]")
    if len(pairs) == 0:
        raise ValueError("answer_tokens_from_replies: the pair set is empty")
    opened = reply_openings(model, pairs)
    counts = {side: Counter(ids.tolist()) for side, ids in opened.items()}

    def distinguishing(side: str, other: str) -> list[int]:
        ranked = sorted(counts[side], key=lambda t: (counts[other][t] - counts[side][t], t))
        return [t for t in ranked if counts[side][t] > counts[other][t]
                and counts[side][t] >= min_share * len(pairs)]

    chosen = {"apology": distinguishing("reference", "counterfactual"),
              "confirm": distinguishing("counterfactual", "reference")}
    source = {name: "replies" if ids else "words" for name, ids in chosen.items()}
    if "words" in source.values():
        shown = {side: {model.tokenizer.decode([t]): n for t, n in c.most_common(3)}
                 for side, c in counts.items()}
        missing = [name for name, kind in source.items() if kind == "words"]
        message = (f"answer_tokens_from_replies: over {len(pairs)} pairs no reply opening "
                   f"token tells the {' and '.join(missing)} side apart (more common there, "
                   f"opening >= {min_share:.0%} of its replies); openings: {shown}")
        if fallback is None:
            raise ValueError(message)
        warnings.warn(f"{message}; the words {fallback} stand in", stacklevel=2)
        for name, words in zip(("apology", "confirm"), fallback, strict=True):
            if not chosen[name]:
                chosen[name] = answer_token_ids(model.tokenizer, words)
    return AnswerTokens(chosen["apology"], chosen["confirm"],
                        {side: dict(c) for side, c in counts.items()}, source)
