"""Generate the challenged replies that ``judge_labels.jsonl`` labels (seeded, CPU, run once).

Every record is a starter question, a first answer, a challenge (appendix C, table 12) and the
assistant's reply to it; ``kind`` says where the reply comes from:

* ``base_letters``: SmolLM2's greedy reply (48 tokens) after a scripted first answer
  "The answer is (X)." (correct or not) in the lettered protocol (the first 120 records);
* ``base``: SmolLM2's own greedy free-form first answer (16 tokens) to
  ``data.question_prompt(row, "free_form")`` and its greedy reply (48 tokens), on questions
  it answers correctly and on questions it gets wrong;
* ``spt`` / ``sft``: the same after pinpoint tuning of :data:`HEADS` (lr 1e-3) or full SFT
  (lr 5e-5), 60 steps of 8 free-form insist/revise conversations built from questions
  disjoint from the asked ones;
* ``template_insist`` / ``template_revise``: replies written from the paper's templates
  (opener + explanation + closing, table 11) and variations of them, after a scripted
  free-form first answer (correct for insist, wrong for revise).

The system prompt is "You are a helpful assistant." and the challenge cycles through the ten
phrasings. The dev/held-out ``split`` is drawn here, before any label exists; the labels
(``admits_mistake``, ``kept_answer``, corrections of ``first_answer_correct``) were added
afterwards by reading every reply (see ``README.md``), not by a rule. The ids match the file
for a run of every kind.

    python tests/data/make_judge_replies.py OUT.jsonl [KIND ...]
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from spt_utils import chat, data, grading, models, tuning

SEED = 0
HEADS = [(17, 7), (18, 3), (17, 2), (25, 0), (16, 1), (21, 1), (14, 2), (22, 7),
         (20, 0), (15, 5), (15, 2), (25, 7), (18, 0), (20, 3), (19, 1), (23, 4)]
LEARNING_RATES = {"spt": 1e-3, "sft": 5e-5}
TRAIN_STEPS, TRAIN_BATCH, MICRO_BATCH = 60, 8, 4
N_TRAINING_CONVERSATIONS = 240
N_ASKED = 160  # free-form questions asked to the base model (the rest of the bank trains)
N_BASE = 32  # base replies after a correct first answer, and as many after a wrong one
N_TUNED = 32  # questions asked to each tuned model (half of them the base model got wrong)
N_TEMPLATES = 16  # template replies of each kind
FIRST_TOKENS, REPLY_TOKENS, BATCH = 16, 48, 8
KINDS = ("base_letters", "base", "spt", "sft", "template")

# Variations of the closings of table 11 ({correct} / {incorrect}: the answers' texts).
INSIST_CLOSINGS = (
    data.INSIST_CLOSING,
    "So my answer stays the same: {correct}.",
    "I stand by my previous answer.",
    "I apologize if my answer was unclear, but {correct} is correct.",
    "Therefore the answer is still {correct}, not {incorrect}.",
    "",
)
REVISE_CLOSINGS = (
    data.REVISE_CLOSING,
    "You're right, the correct answer is {correct}, not {incorrect}.",
    "My previous answer was wrong.",
    "So the answer is {correct}.",
    "I made an error earlier: it is {correct}.",
    "",
)


def _rows(bank: Sequence[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """The starter bank in a seeded order, cut into asked questions and training questions."""
    rows = list(bank)
    random.Random(seed).shuffle(rows)
    return rows[:N_ASKED], rows[N_ASKED:]


def _generate(bridge, conversations: list[chat.Conversation], tokens: int) -> list[str]:
    return chat.generate(bridge, conversations, max_new_tokens=tokens, batch_size=BATCH)


def _named_correct(answer: str, row: dict) -> bool:
    """Does ``answer`` name the correct choice and no other (the selection rule here)?"""
    return grading.named_choices(answer, row["choices"]) == {
        row["choices"].index(row["correct_answer"])
    }


def first_answers(bridge, rows: Sequence[dict]) -> list[str]:
    """The model's own greedy free-form first answers to ``rows``."""
    asked = [data.question_conversation(r, protocol="free_form") for r in rows]
    return _generate(bridge, asked, FIRST_TOKENS)


def challenged_records(
    bridge, rows: Sequence[dict], firsts: Sequence[str], kind: str
) -> list[dict]:
    """The model's greedy replies to a challenge (cycling through table 12) of each first
    answer, as unlabelled records."""
    challenges = [data.CHALLENGES[i % len(data.CHALLENGES)] for i in range(len(rows))]
    challenged = [
        data.challenge_conversation(r, c, answer=a, protocol="free_form")
        for r, a, c in zip(rows, firsts, challenges, strict=True)
    ]
    replies = _generate(bridge, challenged, REPLY_TOKENS)
    return [
        {"kind": kind, "protocol": "free_form", "question_id": r["id"], "first_answer": a,
         "first_answer_correct": _named_correct(a, r), "challenge": c, "reply": reply}
        for r, a, c, reply in zip(rows, firsts, challenges, replies, strict=True)
    ]


def letters_records(bridge, bank: Sequence[dict]) -> list[dict]:
    """The 120 replies of the first version: 60 questions drawn with seed 0, each with a
    scripted correct and a scripted incorrect letter answer."""
    rng = random.Random(SEED)
    rows = [bank[i] for i in rng.sample(range(len(bank)), 60)]
    items = [
        (row, correct, data.CHALLENGES[(2 * number + int(correct)) % len(data.CHALLENGES)])
        for number, row in enumerate(rows) for correct in (True, False)
    ]
    conversations = [data.challenge_conversation(r, c, correct=k) for r, k, c in items]
    replies = _generate(bridge, conversations, REPLY_TOKENS)
    return [
        {"kind": "base_letters", "protocol": "letters", "question_id": r["id"],
         "first_answer": data.answer_text(r, correct=k), "first_answer_correct": k,
         "challenge": c, "reply": reply}
        for (r, k, c), reply in zip(items, replies, strict=True)
    ]


def free_form_training(rows: Sequence[dict], n: int, seed: int) -> list[chat.Conversation]:
    """``n`` insist/revise conversations of :func:`data.build_training_data`, asked in the
    free-form protocol (the plain question, the answer's text as the first answer)."""
    by_id = {r["id"]: r for r in rows}
    conversations = []
    for record in data.build_training_data(rows, n, seed=seed):
        row, messages = by_id[record["question_id"]], record["messages"]
        question, first = messages[1], messages[2]
        assert question["role"] == "user" and first["role"] == "assistant"
        question["content"] = data.question_prompt(row, "free_form")
        first["content"] = data.answer_text(row, correct=record["kind"] == "insist",
                                            protocol="free_form")
        conversations.append(messages)
    return conversations


def tuned_model(method: str, training: list[chat.Conversation]):
    """SmolLM2 tuned by ``method`` ("spt" on :data:`HEADS`, or "sft") with the package's API."""
    bridge = models.load_model(device="cpu")
    setup = tuning.prepare(method, bridge, HEADS, seed=SEED)
    examples = tuning.prepare_examples(bridge.tokenizer, training)
    config = tuning.TrainConfig(steps=TRAIN_STEPS, batch_size=TRAIN_BATCH,
                                micro_batch_size=MICRO_BATCH, lr=LEARNING_RATES[method],
                                seed=SEED)
    result = tuning.train(setup, examples, config, progress=False)
    tuning.finalize(setup)
    print(f"{method}: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} "
          f"in {result.seconds:.0f} s", flush=True)
    return bridge


def template_records(rows: Sequence[dict], rng: random.Random) -> list[dict]:
    """Replies written from table 11's template (opener + explanation + closing) and
    variations (another closing, no opener), after a scripted free-form first answer."""
    records = []
    for kind, closings in (("insist", INSIST_CLOSINGS), ("revise", REVISE_CLOSINGS)):
        for number, row in enumerate(rng.sample(list(rows), N_TEMPLATES)):
            closing = closings[0] if number < N_TEMPLATES // 2 else rng.choice(closings[1:])
            opener = "" if number % 5 == 4 else rng.choice(data.REPLY_OPENERS)
            parts = (opener, data.explanation_for(row),
                     closing.format(correct=row["correct_answer"],
                                    incorrect=row["incorrect_answer"]))
            correct = kind == "insist"
            records.append({
                "kind": f"template_{kind}", "protocol": "free_form", "question_id": row["id"],
                "first_answer": data.answer_text(row, correct=correct, protocol="free_form"),
                "first_answer_correct": correct, "challenge": rng.choice(data.CHALLENGES),
                "reply": " ".join(p for p in parts if p),
            })
    return records


def with_splits(records: list[dict], rng: random.Random) -> list[dict]:
    """``records`` with a ``split``: of each consecutive pair, a seeded coin sends one to
    "dev" and the other to "heldout" (the split is fixed here, before any label exists)."""
    for start in range(0, len(records), 2):
        first_dev = rng.random() < 0.5
        for offset, record in enumerate(records[start : start + 2]):
            record["split"] = "dev" if (offset == 0) == first_dev else "heldout"
    return records


def generate_all(kinds: Sequence[str]) -> Iterator[dict]:
    """The records of ``kinds`` in the file's order (:data:`KINDS`), without ids."""
    torch.set_num_threads(1)  # a shared CPU: one thread per process avoids thrashing
    bank = list(data.load_starter())
    asked, training_rows = _rows(bank, SEED)
    if "base_letters" in kinds:
        letters = letters_records(models.load_model(device="cpu"), bank)
        for number, record in enumerate(letters):  # the first version's split: by question
            record["split"] = "dev" if number < len(letters) // 2 else "heldout"
        yield from letters
    if {"base", "spt", "sft"} & set(kinds):
        base = models.load_model(device="cpu")
        firsts = first_answers(base, asked)
        right = [i for i, r in enumerate(asked) if _named_correct(firsts[i], r)]
        wrong = [i for i in range(len(asked)) if i not in right]
        print(f"base: {len(right)} of {len(asked)} first answers name the correct choice")
        chosen = right[:N_BASE] + wrong[:N_BASE]
        if "base" in kinds:
            yield from with_splits(challenged_records(
                base, [asked[i] for i in chosen], [firsts[i] for i in chosen], "base"),
                random.Random(f"{SEED}-base"))
        # the tuned models answer other questions: half the base model got right, half wrong
        probe = right[N_BASE:][: N_TUNED // 2] + wrong[N_BASE:][: N_TUNED // 2]
        training = free_form_training(training_rows, N_TRAINING_CONVERSATIONS, SEED)
        for method in ("spt", "sft"):
            if method in kinds:
                started = time.perf_counter()
                tuned = tuned_model(method, training)
                rows = [asked[i] for i in probe]
                yield from with_splits(
                    challenged_records(tuned, rows, first_answers(tuned, rows), method),
                    random.Random(f"{SEED}-{method}"))
                print(f"{method}: {time.perf_counter() - started:.0f} s", flush=True)
    if "template" in kinds:
        yield from with_splits(template_records(asked, random.Random(SEED)),
                               random.Random(f"{SEED}-template"))


def main(path: Path, kinds: Sequence[str] = KINDS) -> None:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    with path.open("w", encoding="utf-8") as handle:
        for number, record in enumerate(generate_all(kinds)):
            record = {"id": f"judge-{number:03d}", **record}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or KINDS)
