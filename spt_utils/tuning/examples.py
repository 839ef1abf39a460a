"""Training data: the conversations of ``train.jsonl``, their token ids and loss masks,
and few-shot prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from spt_utils import chat, data

Example = tuple[Int[Tensor, " pos"], Int[Tensor, " pos"]]


def load_training_conversations(path: str | Path) -> list[dict]:
    """Records of ``train.jsonl`` (``id``, ``kind``, ``source``, ``messages``), validated."""
    records = data.read_jsonl(Path(path), required=("id", "kind", "messages"))
    for number, record in enumerate(records, start=1):
        chat.validate_conversation(record["messages"], where=f"{path}: record {number}: messages")
        if record["messages"][-1]["role"] != "assistant":
            raise data.DataError(f"{path}: record {number}: messages must end with the assistant")
    return records


def prepare_examples(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[chat.Conversation]
) -> list[Example]:
    """Token ids and final-assistant-turn loss masks of each training conversation."""
    if not conversations:
        raise ValueError("training data: no conversations")
    return [chat.training_tokens(tokenizer, c) for c in conversations]


def few_shot_conversation(
    conversation: chat.Conversation, demonstrations: Sequence[dict], k: int
) -> chat.Conversation:
    """``conversation`` preceded by ``k`` demonstration conversations (insist and revise
    examples alternating, from ``train.jsonl`` records), for few-shot evaluation.

    The target's system message stays first; the demonstrations' own system messages are
    dropped.
    """
    by_kind = {kind: [d for d in demonstrations if d["kind"] == kind]
               for kind in ("insist", "revise")}
    chosen = []
    for index in range(k):
        pool = by_kind["insist" if index % 2 == 0 else "revise"]
        pool = pool or by_kind["revise" if index % 2 == 0 else "insist"]
        if not pool:
            raise ValueError(f"few-shot: {k} demonstrations requested, {len(chosen)} available")
        chosen.append(pool.pop(0))
    system = [m for m in conversation[:1] if m["role"] == "system"]
    shots = [m for d in chosen for m in d["messages"] if m["role"] != "system"]
    return system + shots + conversation[len(system):]
