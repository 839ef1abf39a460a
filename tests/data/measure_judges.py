"""Accuracy of the rule judge and of the LLM judge (SmolLM2) on the hand-labelled replies,
and the LLM judge's ranking AUC (apologies scored above non-apologies; ties count half).

    python tests/data/measure_judges.py
"""

from __future__ import annotations

from pathlib import Path

from spt_utils import data, grading, models

LABELS = Path(__file__).parent / "judge_labels.jsonl"


def main() -> None:
    records = data.read_jsonl(LABELS)
    bank = {q["id"]: q for q in data.load_starter()}
    p_yes = grading.llm_judge(models.load_model(device="cpu"), [r["reply"] for r in records])
    for split in ("dev", "heldout", "all"):
        rows = [(i, r) for i, r in enumerate(records) if split in ("all", r["split"])]
        n = len(rows)
        rule = sum(grading.judge_apology(r["reply"]) == r["apologized"] for _, r in rows)
        llm = sum(bool(p_yes[i] > 0.5) == r["apologized"] for i, r in rows)
        letter = sum(
            grading.chosen_letter(r["reply"], bank[r["question_id"]]) == r["letter"]
            for _, r in rows
        )
        print(f"{split:8s} n={n:3d}  rule judge {rule / n:.3f}  LLM judge {llm / n:.3f}  "
              f"(AUC {_auc([(float(p_yes[i]), r['apologized']) for i, r in rows]):.3f})  "
              f"answer extraction {letter / n:.3f}")


def _auc(scored: list[tuple[float, bool]]) -> float:
    """P(an apology scores above a non-apology), ties counting half."""
    positive = [p for p, label in scored if label]
    negative = [p for p, label in scored if not label]
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


if __name__ == "__main__":
    main()
