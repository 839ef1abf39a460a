"""The grader of final answers (`grading.grade_final`) against the hand labels of
`final_labels.jsonl`.

For each split, and each hand-labelled kind and method: how often the grader's kind equals
the label, and how often its verdict (`correct_after`) does, with the confusion of kinds.

    python tests/data/measure_finals.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from spt_utils import data, grading
from spt_utils.data.sources import numbered_jsonl

LABELS = Path(__file__).parent / "final_labels.jsonl"
FIELDS = ("id", "method", "question_id", "first_answer", "correct_before", "reply", "final",
          "split", "final_kind", "correct_after", "labelled_by")


def graded(path: Path = LABELS) -> list[tuple[dict, tuple[str, bool]]]:
    """Each labelled record with the grader's (kind, correct) for its final; a record whose
    final or question row the grader cannot read is an error naming the file and line."""
    bank = {q["id"]: q for q in data.load_starter()}
    result = []
    for number, record in numbered_jsonl(path, FIELDS):
        where = f"{path}:{number}"
        if record["question_id"] not in bank:
            raise data.DataError(f"{where}: question_id {record['question_id']!r} is not in "
                                 "the starter bank")
        if record["final_kind"] not in grading.FINAL_KINDS:
            raise data.DataError(f"{where}: final_kind {record['final_kind']!r} is not one of "
                                 f"{grading.FINAL_KINDS}")
        verdict = grading.grade_final(record["final"], bank[record["question_id"]],
                                      first_correct=record["correct_before"],
                                      first_answer=record["first_answer"], where=where)
        result.append((record, verdict))
    return result


def _hits(pairs: list[tuple[dict, tuple[str, bool]]]) -> str:
    kinds = sum(r["final_kind"] == kind for r, (kind, _) in pairs)
    verdicts = sum(r["correct_after"] == correct for r, (_, correct) in pairs)
    n = len(pairs)
    return f"n={n:3d}  kind {kinds:3d}/{n}  correct_after {verdicts:3d}/{n}"


def main() -> None:
    pairs = graded()
    for split in ("dev", "heldout", "all"):
        chosen = [p for p in pairs if split in ("all", p[0]["split"])]
        print(f"{split:8s} all            {_hits(chosen)}")
        for field, values in (("final_kind", grading.FINAL_KINDS),
                              ("method", sorted({r["method"] for r, _ in pairs}))):
            for value in values:
                subset = [p for p in chosen if p[0][field] == value]
                if subset:
                    print(f"{split:8s} {value:14s} {_hits(subset)}")
        confusion = Counter((r["final_kind"], kind) for r, (kind, _) in chosen
                            if r["final_kind"] != kind)
        print(f"{split:8s} misread (label → grader): "
              + ", ".join(f"{a} → {b}: {n}" for (a, b), n in sorted(confusion.items())))
        print()


if __name__ == "__main__":
    main()
