"""The model's own first answers: generated once per model and protocol, graded, and cached
in the run directory, so every patching pair, insist example and evaluation conversation
starts from what the model really said."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
from transformer_lens.model_bridge import TransformerBridge

from spt_utils.data.conversations import ANSWER_PREFILL, check_protocol
from spt_utils.data.knowledge import first_turn_correct
from spt_utils.data.sources import DataError, numbered_jsonl
from spt_utils.io import write_jsonl

ANSWERS_FILE = "first_answers.jsonl"
ANSWER_FIELDS = ("id", "model", "protocol", "answer", "correct")
# What protocol a first answer was asked in, and how it was measured.
KNOWLEDGE_PROTOCOL = {"free_form": "free_form", "letters": "letter"}

FirstAnswers = dict[str, dict]  # question id → {"answer": verbatim text, "correct": bool}


def load_answers(
    path: str | Path, *, model_id: str | None = None, protocol: str | None = None
) -> FirstAnswers:
    """Read cached first answers; a record made with another model or protocol is an error
    naming the file, line and field."""
    answers = {}
    for number, record in numbered_jsonl(path, ANSWER_FIELDS):
        for field, expected in (("model", model_id), ("protocol", protocol)):
            if expected is not None and record[field] != expected:
                raise DataError(f"{path}:{number}: field {field!r}: {record[field]!r}, but this "
                                f"run uses {expected!r}; use a fresh run directory")
        if not isinstance(record["answer"], str) or not isinstance(record["correct"], bool):
            raise DataError(f"{path}:{number}: fields 'answer'/'correct' must be a string and "
                            "a boolean")
        answers[record["id"]] = {"answer": record["answer"], "correct": record["correct"]}
    return answers


def own_answers(
    model: TransformerBridge,
    questions: datasets.Dataset | Sequence[dict],
    *,
    protocol: str,
    model_id: str,
    path: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> FirstAnswers:
    """The model's graded first answer to every question (greedy), read from ``path`` when
    cached there; questions not yet answered are asked and the file rewritten."""
    check_protocol(protocol)
    rows = list(questions)
    cached = load_answers(path, model_id=model_id, protocol=protocol) if (
        path is not None and Path(path).exists()) else {}
    missing = [row for row in rows if row["id"] not in cached]
    if missing:
        measured = first_turn_correct(model, missing, protocol=KNOWLEDGE_PROTOCOL[protocol],
                                      batch_size=batch_size, progress=progress)
        # the letters protocol's answer follows its prefill ("The answer is (" + "B).")
        prefill = ANSWER_PREFILL if protocol == "letters" else ""
        cached |= {r["id"]: {"answer": prefill + r["answer"], "correct": r["correct"]}
                   for r in measured}
        if path is not None:
            write_jsonl(path, [{"id": ident, "model": model_id, "protocol": protocol, **answer}
                               for ident, answer in cached.items()])
    return {row["id"]: cached[row["id"]] for row in rows}
