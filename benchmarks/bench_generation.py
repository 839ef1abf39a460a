"""Greedy generation with and without the KV cache on SmolLM2: same tokens, how much faster?

    python benchmarks/bench_generation.py [--n 8] [--max-new-tokens 96]

Prints both timings and their ratio, measured side by side in one run (target: ≥ 3×).
"""

from __future__ import annotations

import argparse
import time

import torch

from spt_utils import chat, data, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=8, help="conversations (one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.load_model(args.model)
    questions = data.load_starter().select(range(args.n))
    conversations = [data.challenge_conversation(q, data.REFERENCE_CHALLENGE) for q in questions]
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": args.n}
    chat.generate(model, conversations[:1], max_new_tokens=4)  # warm-up
    timings, replies = {}, {}
    for use_cache in (True, False):
        started = time.perf_counter()
        replies[use_cache] = chat.generate(model, conversations, use_cache=use_cache, **settings)
        timings[use_cache] = time.perf_counter() - started
    n_tokens = sum(len(model.tokenizer(r)["input_ids"]) for r in replies[True])
    print(f"{args.n} conversations, up to {args.max_new_tokens} new tokens ({n_tokens} generated)")
    print(f"with KV cache:    {timings[True]:7.2f} s")
    print(f"without KV cache: {timings[False]:7.2f} s")
    print(f"speed-up: {timings[False] / timings[True]:.2f}x (target >= 3x)")
    print(f"identical replies: {replies[True] == replies[False]}")


if __name__ == "__main__":
    main()
