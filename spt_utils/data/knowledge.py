"""Which questions the model answers correctly before any challenge.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat, grading
from spt_utils.data.conversations import ANSWER_PREFILL, SYSTEM_PROMPT, question_conversation
from spt_utils.data.sources import DataError
from spt_utils.grading import LETTERS

CLOZE_PREFILL = "The answer is"
ACCURACY_PROTOCOLS = ("letter", "choice_text")


def first_turn_correct(
    model: TransformerBridge,
    questions: datasets.Dataset | Sequence[dict],
    *,
    protocol: str = "letter",
    system: str | None = SYSTEM_PROMPT,
    prefill: str = ANSWER_PREFILL,
    max_new_tokens: int = 3,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Which multiple-choice questions the model answers correctly before any challenge.

    ``protocol="letter"``: greedy generation of a few tokens after ``prefill`` (default
    "The answer is ("), graded with :func:`~spt_utils.grading.extract_letter`: the format
    the patching pairs and the evaluation use. ``protocol="choice_text"``: a cloze test, the
    choice whose text has the highest mean log-probability after "The answer is" (measures
    what the model knows without needing it to map letters to choices). One record per question:
    ``{"id", "predicted", "correct"}``.
    """
    if protocol not in ACCURACY_PROTOCOLS:
        raise DataError(f"protocol: {protocol!r} is not one of {ACCURACY_PROTOCOLS}")
    rows = list(questions)
    if not rows:
        raise DataError("first_turn_correct: the question set is empty")
    free_form = [r["id"] for r in rows if not r["choices"]]
    if free_form:
        raise DataError(f"first_turn_correct: field 'choices' is empty for ids {free_form[:5]}")
    asked = [question_conversation(r, system=system) for r in rows]
    if protocol == "letter":
        replies = chat.generate(
            model, asked, max_new_tokens=max_new_tokens, batch_size=batch_size,
            prefill=prefill, progress=progress,
        )
        predicted = [
            grading.extract_letter(reply, LETTERS[: len(r["choices"])]) or ""
            for reply, r in zip(replies, rows, strict=True)
        ]
    else:
        scores = _choice_scores(model, asked, rows, progress=progress)
        predicted = [LETTERS[max(range(len(s)), key=s.__getitem__)] for s in scores]
    return [
        {"id": r["id"], "predicted": p, "correct": p == r["correct_letter"]}
        for r, p in zip(rows, predicted, strict=True)
    ]


@torch.no_grad()
def _choice_scores(
    model: TransformerBridge,
    asked: Sequence[chat.Conversation],
    rows: Sequence[dict],
    *,
    progress: bool,
) -> list[list[float]]:
    """Mean log-probability of each choice's tokens after "The answer is" (cloze scoring).

    The shared prompt runs once per question; its KV cache is repeated for the choices.
    """
    tokenizer, hf_model = model.tokenizer, model.original_model
    device = model.cfg.device
    scores = []
    pairs = zip(asked, rows, strict=True)
    for conversation, row in tqdm(pairs, total=len(rows), desc="choice scores",
                                  disable=not progress):
        prompt = chat.render(tokenizer, conversation) + CLOZE_PREFILL
        prompt_ids = chat.encode(tokenizer, prompt)
        continuations = []
        for choice in row["choices"]:
            full = chat.encode(tokenizer, f"{prompt} {choice}")
            if not torch.equal(full[: len(prompt_ids)], prompt_ids):
                raise DataError(f"question {row['id']!r}: choice {choice!r} merges with the "
                                "prompt's last token; cannot score it as a continuation")
            continuations.append(full[len(prompt_ids) :])
        out = hf_model(input_ids=prompt_ids[None].to(device), use_cache=True)
        first = out.logits[0, -1].log_softmax(-1)  # first: [d_vocab]
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(continuations))
        batch, last = chat.pad_right(continuations, tokenizer.pad_token_id)
        mask = torch.cat([torch.ones(len(batch), len(prompt_ids), dtype=torch.long),
                          (torch.arange(batch.shape[1]) <= last[:, None]).long()], dim=1)
        # rest: [choice, pos, d_vocab], predicting each continuation token after the first
        rest = hf_model(input_ids=batch.to(device), attention_mask=mask.to(device),
                        past_key_values=cache).logits.log_softmax(-1)
        question_scores = []
        for index, tokens in enumerate(continuations):
            tokens = tokens.to(device)
            picked = rest[index, : len(tokens) - 1].gather(-1, tokens[1:, None]).squeeze(-1)
            question_scores.append((first[tokens[0]] + picked.sum()).item() / len(tokens))
        scores.append(question_scores)
    return scores
