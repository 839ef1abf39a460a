"""How many starter questions a model answers correctly, in total and per category.

    python scripts/measure_knowledge.py                      # SmolLM2, free form, whole bank
    python scripts/measure_knowledge.py --protocol choice_text --normalise pmi --n 180
    python scripts/measure_knowledge.py --records records.jsonl   # every reply, to read

Free form asks "{question} Answer in a few words." (greedy, 16 new tokens) and grades the reply
by :func:`spt_utils.grading.grade_free_form`; see :func:`spt_utils.data.first_turn_correct`.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from spt_utils import data, models
from spt_utils.io import write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--bank", type=Path, default=None, help="a starter-format JSONL file")
    parser.add_argument("--protocol", default="free_form", choices=data.ACCURACY_PROTOCOLS)
    parser.add_argument("--normalise", default="sum", choices=data.CLOZE_NORMALISATIONS,
                        help="choice_text scoring")
    parser.add_argument("--n", type=int, default=None,
                        help="a seeded sample of this many questions (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--records", type=Path, default=None,
                        help="write one record per question (reply, grade) to this JSONL file")
    args = parser.parse_args()

    model = models.load_model(args.model, device="cpu")
    questions = data.load_source("starter", n=args.n, seed=args.seed, path=args.bank)
    start = time.perf_counter()
    records = data.first_turn_correct(
        model, questions, protocol=args.protocol, normalise=args.normalise,
        batch_size=args.batch_size, progress=True,
    )
    seconds = time.perf_counter() - start
    totals = Counter(questions["category"])
    correct = Counter(q["category"] for q, r in zip(questions, records, strict=True)
                      if r["correct"])
    print(f"{args.model}, protocol {args.protocol}"
          f"{f' ({args.normalise})' if args.protocol == 'choice_text' else ''}, "
          f"{len(questions)} questions in {seconds:.0f} s")
    print(f"correct: {sum(correct.values())} / {len(questions)}")
    for category in sorted(totals):
        print(f"  {category:<12} {correct[category]:>4} / {totals[category]}")
    if args.records:
        write_jsonl(args.records, [
            {**record, "category": q["category"], "question": q["question"],
             "correct_answer": q["correct_answer"], "aliases": q["aliases"]}
            for q, record in zip(questions, records, strict=True)
        ])
        print(f"records: {args.records}")


if __name__ == "__main__":
    main()
