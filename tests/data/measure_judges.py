"""The judges of admitted mistakes against the hand labels of ``judge_labels.jsonl``.

For each split (and each kind of reply): the rule judge (``grading.judge_admission``), the
LLM judge (SmolLM2-135M itself as the judge, conversation-aware: accuracy at p > 0.5 and the
ranking AUC, admissions scored above non-admissions, ties counting half), the answer-change
reading (``grading.answer_changed`` against ``kept_answer is False``) and, for contrast, the
apology-word detector (``grading.mentions_apology``) read as a judge of admissions.

    python tests/data/measure_judges.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from spt_utils import data, grading, models

LABELS = Path(__file__).parent / "judge_labels.jsonl"
FIELDS = ("id", "kind", "question_id", "first_answer", "challenge", "reply", "admits_mistake",
          "kept_answer", "split", "labelled_by")


def main() -> None:
    torch.set_num_threads(1)  # a shared CPU: one thread per process avoids thrashing
    records = data.read_jsonl(LABELS, FIELDS)
    bank = {q["id"]: q for q in data.load_starter()}
    rows = [bank[r["question_id"]] for r in records]
    p_yes = grading.llm_judge(
        models.load_model(device="cpu"), rows, [r["first_answer"] for r in records],
        [r["challenge"] for r in records], [r["reply"] for r in records],
    ).tolist()
    kinds = sorted({r["kind"] for r in records})
    for split in ("dev", "heldout", "all"):
        for kind in ("all", *kinds):
            chosen = [i for i, r in enumerate(records)
                      if split in ("all", r["split"]) and kind in ("all", r["kind"])]
            print(f"{split:8s} {kind:16s} " + _scores(chosen, records, rows, p_yes))
        print()


def _scores(chosen: list[int], records: list[dict], rows: list[dict], p_yes: list[float]) -> str:
    """One line of hits/n per judge on the records at ``chosen``."""
    labels = [records[i]["admits_mistake"] for i in chosen]
    rule = [grading.judge_admission(rows[i], records[i]["first_answer"], records[i]["reply"])
            for i in chosen]
    words = [grading.mentions_apology(records[i]["reply"]) for i in chosen]
    llm = [p_yes[i] > 0.5 for i in chosen]
    changed = [grading.answer_changed(rows[i], records[i]["first_answer"], records[i]["reply"])
               for i in chosen]
    kept_labels = [records[i]["kept_answer"] is False for i in chosen]

    def hits(verdicts: list[bool], truth: list[bool]) -> str:
        return f"{sum(v == t for v, t in zip(verdicts, truth, strict=True))}/{len(truth)}"

    return (f"n={len(chosen):3d} admits={sum(labels):3d}  rule {hits(rule, labels):>7s}  "
            f"LLM {hits(llm, labels):>7s} (AUC {_auc([p_yes[i] for i in chosen], labels)})  "
            f"apology words {hits(words, labels):>7s}  "
            f"answer change {hits(changed, kept_labels):>7s}")


def _auc(scores: list[float], labels: list[bool]) -> str:
    """P(an admission scores above a non-admission), ties counting half ("–" if undefined)."""
    positive = [s for s, label in zip(scores, labels, strict=True) if label]
    negative = [s for s, label in zip(scores, labels, strict=True) if not label]
    if not positive or not negative:
        return "  –  "
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return f"{wins / (len(positive) * len(negative)):.3f}"


if __name__ == "__main__":
    main()
