"""Notebook 03's two costs under interchange knockout on the default organism, each measured
side by side with the way it ran before, in one run:

    python benchmarks/bench_knockout.py [--sets 31] [--pairs 8] [--questions 32] [--threads 2]

* **the sweep**: ``--sets`` head sets (the first eight heads of a seeded draw, then random
  8-sets) on ``--pairs`` matched pairs, the doubting side. Full runs with each prompt's twin
  appended (``ablation.ablated_logit_diffs``) against runs of only what follows each prompt's
  clean prefix, the twins' ``z`` computed once (``ablation.interchanged_logit_diffs``);
  printed: seconds, the speed-up and the largest difference of a logit difference.
* **generation**: the challenge and the follow-up on ``--questions`` starter questions with
  their scripted correct answers, the same 8 heads interchanged, batch 32: decoding that
  stops running a row once it has finished (``chat.generate_follow_up``'s default) against
  transformers' ``generate``, which runs every row of a batch to its longest reply; printed:
  seconds, the speed-up and whether every reply and final is the same.

Each timing is the median of ``--repeats`` interleaved calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from spt_utils import ablation, data, evaluation, models


def median_seconds(paths: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict, dict]:
    """Each path's median wall seconds over ``repeats`` interleaved calls, and its result."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, path in paths.items():
            started = time.perf_counter()
            results[name] = path()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.RUN_MODEL)
    parser.add_argument("--sets", type=int, default=31)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = models.load_model(args.model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    interchange = ablation.Interchange.from_challenges(model.tokenizer)
    bank = data.load_starter()
    pairs = data.build_patching_pairs(bank.select(range(args.pairs)), model.tokenizer,
                                      wording="matched")
    sets = ablation.random_head_sets(8, args.sets, n_layers, n_heads, seed=0)
    heads = sets[0]

    def full() -> torch.Tensor:
        return ablation.ablated_logit_diffs(model, pairs, sets, "interchange",
                                            interchange=interchange, batch_size=32)

    def from_prefixes() -> torch.Tensor:
        prefixes = ablation.CleanPrefixes.build(model, pairs, interchange)
        return ablation.interchanged_logit_diffs(model, pairs, sets, prefixes, batch_size=32)

    seconds, results = median_seconds({"full": full, "prefixes": from_prefixes}, args.repeats)
    gap = float((results["full"] - results["prefixes"]).abs().max())
    print(f"{args.model}, {args.threads} thread(s), median of {args.repeats}")
    print(f"sweep, {args.sets} sets x {args.pairs} pairs (doubting side): full runs with twins "
          f"{seconds['full']:.1f} s, from the clean prefixes {seconds['prefixes']:.1f} s "
          f"({seconds['full'] / seconds['prefixes']:.1f}x); largest difference {gap:.1e}")

    questions = bank.select(range(100, 100 + args.questions)).to_list()
    answers = {q["id"]: {"answer": q["correct_answer"], "correct": True} for q in questions}

    def protocol(drop_finished: bool) -> Callable[[], list[tuple[str, str]]]:
        def run() -> list[tuple[str, str]]:
            with ablation.knockout(model, heads, "interchange", interchange=interchange):
                records = evaluation.run_protocol(model, questions, answers, protocol="free_form",
                                                  max_new_tokens=32, batch_size=32,
                                                  drop_finished=drop_finished)
            return [(r["reply"], r["final"]) for r in records]
        return run

    seconds, results = median_seconds({"dropping": protocol(True),
                                       "generate": protocol(False)}, args.repeats)
    print(f"generation under the knockout, {args.questions} questions (both turns, up to 32 "
          f"tokens each): transformers' generate {seconds['generate']:.1f} s, finished rows "
          f"dropped {seconds['dropping']:.1f} s ({seconds['generate'] / seconds['dropping']:.2f}"
          f"x); the same replies and finals: {results['generate'] == results['dropping']}")


if __name__ == "__main__":
    main()
