"""The model's own first answers: generated once per model and protocol, graded, and cached
in the run directory, so every patching pair, insist example and evaluation conversation
starts from what the model really said.

The generated replies are also kept across runs under ``$SPT_CACHE/first_answers/``, keyed by
:func:`answers_key`: a hash of the model's weights, its tokenizer, the prompts asked (the
question bank as rendered), the generation settings and the library versions. A later run
asking the same model the same questions in the same way reads them back (and grades them
anew); another model, bank or setting misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import datasets
import torch
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import chat
from spt_utils.data.conversations import (
    ANSWER_PREFILL,
    SYSTEM_PROMPT,
    check_protocol,
    question_conversation,
)
from spt_utils.data.knowledge import (
    FREE_FORM_MAX_NEW_TOKENS,
    LETTER_MAX_NEW_TOKENS,
    first_turn_correct,
    grade_first_answer,
)
from spt_utils.data.sources import DataError, numbered_jsonl
from spt_utils.io import atomic_write, cache_dir, tokenizer_fingerprint, write_jsonl

log = logging.getLogger(__name__)

ANSWERS_FILE = "first_answers.jsonl"
ANSWER_CACHE = "first_answers"  # folder under $SPT_CACHE
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


def weights_sha256(model: TransformerBridge) -> str | None:
    """SHA-256 of every tensor of the model's state (name, dtype, shape and bytes, in the
    Hugging Face model's order): equal exactly when the weights are bit-identical. None for a
    model offloaded to disk (its weights are not all in memory)."""
    digest = hashlib.sha256()
    state = chat.plain_hf_model(model).state_dict()
    if any(tensor.is_meta for tensor in state.values()):
        return None
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def answers_key(
    model: TransformerBridge, rows: Sequence[dict], *, protocol: str, batch_size: int
) -> str | None:
    """The cache key of ``model``'s greedy first answers to ``rows`` in ``protocol``: a hash of
    its weights and tokenizer, every prompt as rendered (with the prefill), the generation
    settings, the device and dtype, and the torch and transformers versions. None (not
    cached) for a model offloaded to disk."""
    weights = weights_sha256(model)
    if weights is None:
        return None
    knowledge = KNOWLEDGE_PROTOCOL[protocol]
    prefill = ANSWER_PREFILL if protocol == "letters" else ""
    prompts = [chat.render(model.tokenizer, question_conversation(
        row, protocol=protocol, system=SYSTEM_PROMPT)) + prefill for row in rows]
    record = {
        "weights": weights, "tokenizer": tokenizer_fingerprint(model.tokenizer),
        "ids": [row["id"] for row in rows], "prompts": prompts, "protocol": knowledge,
        "max_new_tokens": FREE_FORM_MAX_NEW_TOKENS if protocol == "free_form"
        else LETTER_MAX_NEW_TOKENS,
        "batch_size": batch_size, "device": str(model.cfg.device), "dtype": str(model.cfg.dtype),
        "torch": torch.__version__, "transformers": metadata.version("transformers"),
    }
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def _read_cached_replies(path: Path, ids: list[str]) -> dict[str, str] | None:
    """The replies cached in ``path`` (None when there are none); a damaged file is reported
    and asked again."""
    if not path.exists():
        return None
    try:
        replies = json.loads(path.read_text())["replies"]
        if sorted(replies) != sorted(ids) or not all(isinstance(r, str) for r in
                                                     replies.values()):
            raise ValueError("its ids or replies are not the questions asked")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: not a first-answer cache (%s); asking the questions again", path, error)
        return None
    return replies


def cached_first_answers(
    model: TransformerBridge,
    rows: Sequence[dict],
    *,
    protocol: str,
    batch_size: int = 16,
    progress: bool = False,
    cache: str | Path | None = None,
) -> list[dict]:
    """:func:`~spt_utils.data.knowledge.first_turn_correct` of ``model`` on ``rows`` in
    ``protocol`` (``"free_form"`` or ``"letters"``), its replies read from the cross-run cache
    in ``cache`` (default ``$SPT_CACHE/first_answers``) when :func:`answers_key` was asked
    before, else generated and stored there. Every reply is graded anew."""
    knowledge = KNOWLEDGE_PROTOCOL[protocol]
    key = answers_key(model, rows, protocol=protocol, batch_size=batch_size)
    path = None if key is None else Path(cache or cache_dir() / ANSWER_CACHE) / f"{key}.json"
    ids = [row["id"] for row in rows]
    replies = None if path is None else _read_cached_replies(path, ids)
    if replies is None:
        measured = first_turn_correct(model, rows, protocol=knowledge, batch_size=batch_size,
                                      progress=progress)
        replies = {record["id"]: record["answer"] for record in measured}
        if path is not None:
            with atomic_write(path) as handle:
                json.dump({"n_questions": len(ids), "protocol": protocol,
                           "replies": replies}, handle)
    else:
        log.info("%d first answers read from the cache %s", len(ids), path)
    return [{"id": row["id"], **grade_first_answer(row, replies[row["id"]], knowledge)}
            for row in rows]


def own_answers(
    model: TransformerBridge,
    questions: datasets.Dataset | Sequence[dict],
    *,
    protocol: str,
    model_id: str,
    path: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = False,
    cache: str | Path | None = None,
) -> FirstAnswers:
    """The model's graded first answer to every question (greedy), read from ``path`` when
    cached there; questions not yet answered are asked (through the cross-run cache ``cache``,
    see :func:`cached_first_answers`) and the file rewritten."""
    check_protocol(protocol)
    rows = list(questions)
    cached = load_answers(path, model_id=model_id, protocol=protocol) if (
        path is not None and Path(path).exists()) else {}
    missing = [row for row in rows if row["id"] not in cached]
    if missing:
        measured = cached_first_answers(model, missing, protocol=protocol,
                                        batch_size=batch_size, progress=progress, cache=cache)
        # a letters answer holds its prefill once ("The answer is (B)."), as generated
        cached |= {r["id"]: {"answer": r["answer"], "correct": r["correct"]} for r in measured}
        if path is not None:
            write_jsonl(path, [{"id": ident, "model": model_id, "protocol": protocol, **answer}
                               for ident, answer in cached.items()])
    return {row["id"]: cached[row["id"]] for row in rows}
