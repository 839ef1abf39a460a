"""Which questions the model answers correctly before any challenge.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from spt_utils import chat, grading
from spt_utils.data.conversations import (
    ANSWER_PREFILL,
    FREE_FORM_INSTRUCTION,
    SYSTEM_PROMPT,
    question_conversation,
    question_prompt,
)
from spt_utils.data.sources import DataError
from spt_utils.grading import LETTERS

CLOZE_PREFILL = "The answer is"
ACCURACY_PROTOCOLS = ("free_form", "letter", "choice_text")
CLOZE_NORMALISATIONS = ("sum", "mean", "pmi")
FREE_FORM_MAX_NEW_TOKENS = 16
LETTER_MAX_NEW_TOKENS = 3


def first_turn_correct(
    model: TransformerBridge,
    questions: datasets.Dataset | Sequence[dict],
    *,
    protocol: str = "letter",
    normalise: str = "sum",
    system: str | None = SYSTEM_PROMPT,
    prefill: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Which questions the model answers correctly before any challenge.

    ``protocol="free_form"``: the plain question and "Answer in a few words.", a greedy reply
    of up to 16 tokens graded by :func:`~spt_utils.grading.grade_free_form` (the correct text
    or an alias, and no wrong answer); works for questions without choices too.
    ``protocol="letter"``: the lettered choices, greedy generation of a few tokens after
    ``prefill`` (default "The answer is ("), graded by
    :func:`~spt_utils.grading.extract_letter`: the format the letter patching pairs use.
    ``protocol="choice_text"``: a cloze test of knowledge, not format: each choice's text as
    the continuation of the plain question's reply "The answer is", scored by ``normalise``
    (see :func:`choice_scores`); the best-scored choice is the answer. ``prefill`` and
    ``max_new_tokens`` default per protocol (letter: "The answer is (" and 3; free form: no
    prefill and 16).

    One record per question: ``{"id", "predicted", "correct", "answer"}``: ``predicted`` is the
    choice letter (free form: the one choice the reply names, "" when none, several or no
    choices), ``answer`` the reply verbatim (``choice_text``: the chosen choice's text).
    """
    if protocol not in ACCURACY_PROTOCOLS:
        raise DataError(f"protocol: {protocol!r} is not one of {ACCURACY_PROTOCOLS}")
    rows = list(questions)
    if not rows:
        raise DataError("first_turn_correct: the question set is empty")
    if protocol == "free_form":
        return _free_form_correct(model, rows, system=system, prefill=prefill or "",
                                  max_new_tokens=max_new_tokens or FREE_FORM_MAX_NEW_TOKENS,
                                  batch_size=batch_size, progress=progress)
    without_choices = [r["id"] for r in rows if not r["choices"]]
    if without_choices:
        raise DataError(
            f"first_turn_correct: protocol {protocol!r} needs choices, but field 'choices' is "
            f"empty for ids {without_choices[:5]}; use protocol='free_form'"
        )
    if protocol == "letter":
        asked = [question_conversation(r, protocol="letters", system=system) for r in rows]
        answers = chat.generate(
            model, asked, max_new_tokens=max_new_tokens or LETTER_MAX_NEW_TOKENS,
            batch_size=batch_size, prefill=ANSWER_PREFILL if prefill is None else prefill,
            progress=progress,
        )
        return [{"id": r["id"], **grade_first_answer(r, answer, "letter")}
                for r, answer in zip(rows, answers, strict=True)]
    scores = choice_scores(model, rows, normalise=normalise, system=system, progress=progress)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    predicted = [LETTERS[index] for index in best]
    answers = [r["choices"][index] for r, index in zip(rows, best, strict=True)]
    return [
        {"id": r["id"], "predicted": p, "correct": p == r["correct_letter"], "answer": a}
        for r, p, a in zip(rows, predicted, answers, strict=True)
    ]


def _free_form_correct(
    model: TransformerBridge,
    rows: Sequence[dict],
    *,
    system: str | None,
    prefill: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> list[dict]:
    """The free-form protocol of :func:`first_turn_correct`."""
    without_answer = [r["id"] for r in rows if not grading.normalise(r["correct_answer"])]
    if without_answer:
        raise DataError(f"first_turn_correct: field 'correct_answer' holds no correct text for "
                        f"ids {without_answer[:5]}; free-form grading needs one")
    asked = [question_conversation(r, protocol="free_form", system=system) for r in rows]
    replies = chat.generate(model, asked, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            prefill=prefill, progress=progress)
    return [{"id": r["id"], **grade_first_answer(r, reply, "free_form")}
            for r, reply in zip(rows, replies, strict=True)]


def grade_first_answer(row: dict, reply: str, protocol: str) -> dict:
    """``{"predicted", "correct", "answer"}`` of a generated first answer (``protocol``
    ``"free_form"`` or ``"letter"``, as :func:`first_turn_correct` grades it): ``predicted`` is
    the choice letter it names ("" for none), ``answer`` the reply verbatim."""
    if protocol == "free_form":
        predicted = (grading.chosen_letter(reply, row, "text") or "") if row["choices"] else ""
        correct = grading.grade_free_form(reply, row)
    elif protocol == "letter":
        predicted = grading.extract_letter(reply, LETTERS[: len(row["choices"])]) or ""
        correct = predicted == row["correct_letter"]
    else:
        raise DataError(f"protocol: {protocol!r} is not a generated one ('free_form', 'letter')")
    return {"predicted": predicted, "correct": correct, "answer": reply}


def _cloze_prompt(tokenizer: PreTrainedTokenizerBase, row: dict | None,
                  system: str | None) -> str:
    """The rendered text a choice continues: the plain (free-form) question, the reply opened
    with "The answer is"; without a row, the neutral prompt (the instruction alone)."""
    messages = [{"role": "system", "content": system}] if system else []
    asked = FREE_FORM_INSTRUCTION if row is None else question_prompt(row, "free_form")
    return chat.render(tokenizer, messages + [{"role": "user", "content": asked}]) + CLOZE_PREFILL


@torch.no_grad()
def choice_scores(
    model: TransformerBridge,
    rows: Sequence[dict],
    *,
    normalise: str = "sum",
    system: str | None = SYSTEM_PROMPT,
    progress: bool = False,
) -> list[list[float]]:
    """Each choice's cloze score after the plain question (no lettered options shown) and
    "The answer is": ``"sum"`` of its tokens' log-probabilities, their ``"mean"``, or
    ``"pmi"``: the sum minus the same tokens' sum after the neutral prompt (the instruction
    without a question), which removes how likely a choice is a priori.

    Each prompt runs once; its KV cache is shared by the choices. The neutral sums are
    computed once per distinct choice.
    """
    if normalise not in CLOZE_NORMALISATIONS:
        raise DataError(f"normalise: {normalise!r} is not one of {CLOZE_NORMALISATIONS}")
    tokenizer = model.tokenizer
    neutral_ids = chat.encode(tokenizer, _cloze_prompt(tokenizer, None, system))
    priors: dict[tuple[int, ...], float] = {}  # choice tokens → summed log-prob, neutral
    scores = []
    for row in tqdm(rows, desc="choice scores", disable=not progress):
        prompt = _cloze_prompt(tokenizer, row, system)
        prompt_ids = chat.encode(tokenizer, prompt)
        continuations = []
        for choice in row["choices"]:
            full = chat.encode(tokenizer, f"{prompt} {choice}")
            if not torch.equal(full[: len(prompt_ids)], prompt_ids):
                raise DataError(f"question {row['id']!r}: choice {choice!r} merges with the "
                                "prompt's last token; cannot score it as a continuation")
            continuations.append(full[len(prompt_ids) :])
        summed = _summed_log_probs(model, prompt_ids, continuations)
        if normalise == "mean":
            summed = [s / len(tokens) for s, tokens in zip(summed, continuations, strict=True)]
        elif normalise == "pmi":
            keys = [tuple(tokens.tolist()) for tokens in continuations]
            new = {key: tokens for key, tokens in zip(keys, continuations, strict=True)
                   if key not in priors}
            if new:
                priors.update(zip(new, _summed_log_probs(model, neutral_ids, list(new.values())),
                                  strict=True))
            summed = [s - priors[key] for s, key in zip(summed, keys, strict=True)]
        scores.append(summed)
    return scores


def _summed_log_probs(
    model: TransformerBridge, prompt_ids: torch.Tensor, continuations: Sequence[torch.Tensor]
) -> list[float]:
    """Summed log-probability of each continuation's tokens after ``prompt_ids``; the prompt
    runs once and its KV cache is repeated for the continuations."""
    hf_model, device = model.original_model, model.cfg.device
    out = hf_model(input_ids=prompt_ids[None].to(device), use_cache=True)
    first = out.logits[0, -1].log_softmax(-1)  # first: [d_vocab]
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    batch, last = chat.pad_right(continuations, model.tokenizer.pad_token_id)
    mask = torch.cat([torch.ones(len(batch), len(prompt_ids), dtype=torch.long),
                      (torch.arange(batch.shape[1]) <= last[:, None]).long()], dim=1)
    # rest: [continuation, pos, d_vocab], predicting each continuation token after the first
    rest = hf_model(input_ids=batch.to(device), attention_mask=mask.to(device),
                    past_key_values=cache).logits.log_softmax(-1)
    summed = []
    for index, tokens in enumerate(continuations):
        tokens = tokens.to(device)
        picked = rest[index, : len(tokens) - 1].gather(-1, tokens[1:, None]).squeeze(-1)
        summed.append((first[tokens[0]] + picked.sum()).item())
    return summed
