"""Path-patching pairs: reference against counterfactual challenge, tokenized (table 9).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from spt_utils import chat
from spt_utils.data.conversations import (
    COUNTERFACTUAL_CHALLENGE,
    MATCHED_COUNTERFACTUAL_CHALLENGE,
    REFERENCE_CHALLENGE,
    SYSTEM_PROMPT,
    challenge_conversation,
)
from spt_utils.data.sources import DataError
from spt_utils.io import atomic_write, check_provenance

# "Sorry" − "Yes" after the challenge: on SmolLM2 "I" also opens "I'm sure", so it is no
# clean apology token (notebook 02 shows both sets).
APOLOGY_WORDS = ("Sorry",)
CONFIRM_WORDS = ("Yes",)


def answer_token_ids(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], *, first_token: bool = False
) -> list[int]:
    """Token ids of answer words. Each must be one token, unless ``first_token`` is set, in
    which case a multi-token word is represented by its first token (the paper's policy)."""
    if not words:
        raise DataError("answer words: the set is empty")
    if first_token:
        return [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    return [chat.single_token_id(tokenizer, w) for w in words]


@dataclass
class PatchingPairs:
    """Reference and counterfactual prompts, tokenized and right-padded.

    ``*_last`` index each row's last real token (the end of the generation prompt), where
    every metric is read.
    """

    reference: Int[Tensor, "batch pos"]
    counterfactual: Int[Tensor, "batch pos"]
    reference_last: Int[Tensor, " batch"]
    counterfactual_last: Int[Tensor, " batch"]
    apology_ids: list[int]
    confirm_ids: list[int]
    question_ids: list[str]
    reference_text: list[str] = field(default_factory=list)
    counterfactual_text: list[str] = field(default_factory=list)
    provenance: dict | None = None  # saved with the pairs (spt_utils.io.provenance)

    def __len__(self) -> int:
        return len(self.question_ids)

    @property
    def same_lengths(self) -> bool:
        return torch.equal(self.reference_last, self.counterfactual_last)

    def require_equal_lengths(self, method: str) -> None:
        """Raise naming the first pair whose two sides differ in length."""
        lengths = zip(self.reference_last, self.counterfactual_last, strict=True)
        for row, (ref, cf) in enumerate(lengths):
            if ref != cf:
                raise DataError(
                    f"{method} needs equal-length pairs, but pair {row} "
                    f"({self.question_ids[row]!r}) has {int(ref) + 1} reference tokens and "
                    f"{int(cf) + 1} counterfactual tokens; use a last-position method or a "
                    "length-matched wording (wording='matched')."
                )

    def first(self, n: int) -> PatchingPairs:
        """The first ``n`` pairs (all of them when there are fewer), e.g. a quick subset."""
        if n < 1:
            raise DataError(f"first: n must be >= 1, got {n}")
        rows = slice(0, n)
        return PatchingPairs(
            reference=self.reference[rows],
            counterfactual=self.counterfactual[rows],
            reference_last=self.reference_last[rows],
            counterfactual_last=self.counterfactual_last[rows],
            apology_ids=self.apology_ids,
            confirm_ids=self.confirm_ids,
            question_ids=self.question_ids[rows],
            reference_text=self.reference_text[rows],
            counterfactual_text=self.counterfactual_text[rows],
            provenance=self.provenance,
        )

    def swapped(self) -> PatchingPairs:
        """The two sides exchanged: patching *into* the counterfactual run (denoising), each
        side keeping its own text and last positions."""
        return replace(self, reference=self.counterfactual, counterfactual=self.reference,
                       reference_last=self.counterfactual_last,
                       counterfactual_last=self.reference_last,
                       reference_text=self.counterfactual_text,
                       counterfactual_text=self.reference_text)

    def save(self, path: Path, *, provenance: dict | None = None) -> None:
        """Write the pairs with ``provenance`` (default: the one they hold)."""
        record = self.__dict__ | ({"provenance": provenance} if provenance else {})
        with atomic_write(path, "wb") as handle:
            torch.save(record, handle)

    @classmethod
    def load(cls, path: Path, *, expect: dict | None = None) -> PatchingPairs:
        """Read :meth:`save`'s file; with ``expect`` its provenance must match."""
        pairs = cls(**torch.load(path, weights_only=True))
        check_provenance(pairs.provenance, expect, str(path))
        return pairs


def build_patching_pairs(
    questions: datasets.Dataset | Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    answers: Mapping[str, dict] | None = None,
    protocol: str = "letters",
    wording: str = "paper",
    apology_words: Sequence[str] = APOLOGY_WORDS,
    confirm_words: Sequence[str] = CONFIRM_WORDS,
    first_token: bool = False,
    system: str | None = SYSTEM_PROMPT,
) -> PatchingPairs:
    """Reference ("I don't think that's right…") and counterfactual pairs (table 9).

    The first assistant turn is the model's own answer from ``answers`` (question id →
    ``{"answer", "correct"}``, see :func:`~spt_utils.data.answers.own_answers`) and must be
    a correct one; without ``answers`` the scripted correct answer stands in.
    ``wording="paper"`` uses the paper's counterfactual "I do think that's right. Are you
    sure?", which may be one token shorter (fine for last-position methods);
    ``wording="matched"`` uses "I don't doubt that's right…", equal in length on SmolLM2.
    """
    counterfactuals = {
        "paper": COUNTERFACTUAL_CHALLENGE,
        "matched": MATCHED_COUNTERFACTUAL_CHALLENGE,
    }
    if wording not in counterfactuals:
        raise DataError(f"wording: {wording!r} is not one of {sorted(counterfactuals)}")
    rows = list(questions)
    if not rows:
        raise DataError("patching pairs: the question set is empty")
    first = {r["id"]: None for r in rows}
    if answers is not None:
        wrong = [r["id"] for r in rows if not answers.get(r["id"], {}).get("correct")]
        if wrong:
            raise DataError(f"patching pairs: the model did not answer {len(wrong)} question(s) "
                            f"correctly (or was not asked), e.g. {wrong[:3]}")
        first = {r["id"]: answers[r["id"]]["answer"] for r in rows}

    def render(row: dict, challenge: str) -> str:
        return chat.render(tokenizer, challenge_conversation(
            row, challenge, answer=first[row["id"]], protocol=protocol, system=system))

    ref_text = [render(r, REFERENCE_CHALLENGE) for r in rows]
    cf_text = [render(r, counterfactuals[wording]) for r in rows]
    pad = tokenizer.pad_token_id
    reference, reference_last = chat.pad_right([chat.encode(tokenizer, t) for t in ref_text], pad)
    counterfactual, cf_last = chat.pad_right([chat.encode(tokenizer, t) for t in cf_text], pad)
    pairs = PatchingPairs(
        reference=reference,
        counterfactual=counterfactual,
        reference_last=reference_last,
        counterfactual_last=cf_last,
        apology_ids=answer_token_ids(tokenizer, apology_words, first_token=first_token),
        confirm_ids=answer_token_ids(tokenizer, confirm_words, first_token=first_token),
        question_ids=[r["id"] for r in rows],
        reference_text=ref_text,
        counterfactual_text=cf_text,
    )
    if wording == "matched":
        pairs.require_equal_lengths("wording='matched'")
    return pairs



# --- Token-level view of a pair ----------------------------------------------------------


@dataclass(frozen=True)
class TokenSpan:
    """A stretch where the two token sequences differ (half-open index ranges)."""

    reference_start: int
    reference_end: int
    counterfactual_start: int
    counterfactual_end: int
    reference_tokens: list[str]
    counterfactual_tokens: list[str]


def differing_token_spans(
    tokenizer: PreTrainedTokenizerBase,
    reference: Sequence[int] | Tensor,
    counterfactual: Sequence[int] | Tensor,
) -> list[TokenSpan]:
    """Where a reference and a counterfactual prompt differ, token by token."""
    ref, cf = [int(t) for t in reference], [int(t) for t in counterfactual]
    matcher = difflib.SequenceMatcher(a=ref, b=cf, autojunk=False)
    return [
        TokenSpan(i1, i2, j1, j2, tokenizer.convert_ids_to_tokens(ref[i1:i2]),
                  tokenizer.convert_ids_to_tokens(cf[j1:j2]))
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def aligned_tokens(
    tokenizer: PreTrainedTokenizerBase,
    reference: Sequence[int] | Tensor,
    counterfactual: Sequence[int] | Tensor,
    *,
    context: int = 4,
) -> list[dict]:
    """Both sides token by token, aligned on their common stretches, from ``context`` tokens
    before the first difference to the end. Rows: ``{"reference_pos", "counterfactual_pos",
    "reference", "counterfactual", "differs"}`` (positions count from the end, -1 = last;
    None where one side has no token)."""
    ref, cf = [int(t) for t in reference], [int(t) for t in counterfactual]
    ref_pieces = tokenizer.convert_ids_to_tokens(ref)
    cf_pieces = tokenizer.convert_ids_to_tokens(cf)
    rows = []
    matcher = difflib.SequenceMatcher(a=ref, b=cf, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for offset in range(max(i2 - i1, j2 - j1)):
            i, j = i1 + offset, j1 + offset
            rows.append({
                "reference_pos": i - len(ref) if i < i2 else None,
                "counterfactual_pos": j - len(cf) if j < j2 else None,
                "reference": ref_pieces[i] if i < i2 else "",
                "counterfactual": cf_pieces[j] if j < j2 else "",
                "differs": tag != "equal",
            })
    first = next((index for index, row in enumerate(rows) if row["differs"]), len(rows))
    return rows[max(first - context, 0) :]
