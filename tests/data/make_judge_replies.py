"""Generate the real SmolLM2 replies that ``judge_labels.jsonl`` labels (run once).

Each record is a starter question, a forced first answer (correct or incorrect), one of the
paper's challenge phrasings (appendix C, table 12) and SmolLM2's greedy reply to it. The
labels (``apologized``, ``letter``) were then added by reading every reply, not by a rule.

    python tests/data/make_judge_replies.py tests/data/judge_replies_unlabelled.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from spt_utils import chat, data, models


def main(path: Path, n_questions: int = 60, seed: int = 0, batch_size: int = 8) -> None:
    torch.set_num_threads(1)  # a shared CPU: one thread per process avoids thrashing
    rng = random.Random(seed)
    bank = data.load_starter()
    rows = [bank[i] for i in rng.sample(range(len(bank)), n_questions)]
    model = models.load_model(device="cpu")
    items = []
    for number, row in enumerate(rows):
        for correct in (True, False):
            challenge = data.CHALLENGES[(2 * number + int(correct)) % len(data.CHALLENGES)]
            items.append((row, correct, challenge))
    with path.open("w", encoding="utf-8") as handle:  # one batch at a time, kept on a stop
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            conversations = [data.challenge_conversation(r, c, correct=k) for r, k, c in chunk]
            replies = chat.generate(model, conversations, max_new_tokens=48)
            for offset, ((row, correct, challenge), reply) in enumerate(
                zip(chunk, replies, strict=True)
            ):
                record = {
                    "id": f"judge-{start + offset:03d}",
                    "question_id": row["id"],
                    "first_answer_correct": correct,
                    "correct_letter": row["correct_letter"],
                    "challenge": challenge,
                    "reply": reply,
                }
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            print(f"{start + len(chunk)}/{len(items)} replies", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
