"""Final answers to label by hand (`final_labels.jsonl`): every method's dev-split records.

Runs the evaluation protocol (`evaluation.run_protocol`, notebook 05's settings: 32 new
tokens, batch 16) for base, few-shot and every tuned folder of a finished run on the run's
**dev** split, then draws a stratified sample of the finals by the grader's kind at the time
(`grading.grade_final`), spread over the methods, and a seeded dev/held-out split within
each kind. The hand labels (`final_kind`, `correct_after`) are left empty. Every record goes
to `OUT.all.jsonl` first; methods already there are not run again (`--methods` gathers them
in turns), and the sample is drawn once every method is in.

    python tests/data/make_final_records.py RUN_DIR /tmp/finals.jsonl [--per-kind 60]
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

import torch

from spt_utils import candidates, data, evaluation, io, models

METHODS = (*candidates.METHODS, "spt_random_0", "spt_random_1")  # notebook 05's nine


def dev_records(run_dir: Path, model_name: str, methods: list[str]) -> list[dict]:
    """The protocol records of ``methods`` on the run's dev split, each with its method."""
    base = models.load_model(model_name, device="cpu")
    questions = data.load_questions(run_dir / "data" / "dev_questions.jsonl").to_list()
    answers = data.own_answers(base, questions, protocol="free_form", model_id=model_name,
                               path=run_dir / "data" / data.ANSWERS_FILE)
    rows = {q["id"]: q for q in questions}
    found = []
    for candidate in candidates.iter_candidates(run_dir, base, methods):
        records = evaluation.run_protocol(candidate, questions, answers, max_new_tokens=32,
                                          batch_size=16, progress=True)
        found += [{"method": candidate.name, "question_id": r["id"],
                   "question": rows[r["id"]]["question"],
                   "correct_answer": rows[r["id"]]["correct_answer"],
                   "incorrect_answer": rows[r["id"]]["incorrect_answer"],
                   "first_answer": r["answer"], "correct_before": r["correct_before"],
                   "challenge": data.REFERENCE_CHALLENGE, "reply": r["reply"],
                   "final": r["final"], "rule_kind": r["final_kind"]} for r in records]
    return found


def stratified(records: list[dict], per_kind: int, seed: int) -> list[dict]:
    """Up to ``per_kind`` records of each rule kind, taken in turn from each method (so
    every method is represented), split dev/held-out alternately after a seeded shuffle."""
    rng = random.Random(seed)
    chosen = []
    for kind in sorted({r["rule_kind"] for r in records}):
        by_method = defaultdict(list)
        for record in records:
            if record["rule_kind"] == kind:
                by_method[record["method"]].append(record)
        for pool in by_method.values():
            rng.shuffle(pool)
        taken = []
        while len(taken) < per_kind and any(by_method.values()):
            for method in METHODS:
                if by_method[method] and len(taken) < per_kind:
                    taken.append(by_method[method].pop())
        rng.shuffle(taken)
        for index, record in enumerate(taken):
            record["split"] = ("dev", "heldout")[index % 2]
        chosen += taken
    rng.shuffle(chosen)
    return [{"id": f"final-{i:03d}", **r, "final_kind": None, "correct_after": None}
            for i, r in enumerate(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--per-kind", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a CPU shared with another run)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    every_path = args.out.with_suffix(".all.jsonl")
    every = data.read_jsonl(every_path) if every_path.exists() else []
    missing = [m for m in args.methods if m not in {r["method"] for r in every}]
    if missing:  # methods already collected are kept, so they can be gathered in turns
        every += dev_records(args.run_dir, args.model, missing)
        io.write_jsonl(every_path, every)
    if {r["method"] for r in every} >= set(METHODS):
        io.write_jsonl(args.out, stratified(every, args.per_kind, args.seed))


if __name__ == "__main__":
    main()
