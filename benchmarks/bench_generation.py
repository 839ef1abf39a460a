"""Greedy generation on SmolLM2: the workbench's default path against plain transformers, the
bridge and no KV cache, measured side by side in one run.

    python benchmarks/bench_generation.py [--n 32] [--max-new-tokens 32] [--batch-size 16]

Rows (each the median of ``--repeats`` interleaved timings; no KV cache is timed once):

* **workbench**: ``chat.generate`` with no hook registered, which runs the Hugging Face model
  without the bridge's wrapping (``chat.plain_hf_model``), runs the prompts' shared prefix
  (the system turn) once per batch and stops running a row once it has finished;
* **workbench, prefix not shared**: the same with ``share_prefix=False``;
* **workbench, finished rows run on**: the prefix not shared and
  ``drop_finished=False`` (transformers' ``generate``), the computation plain transformers
  does (what the target compares);
* **plain transformers (eager)**: the same weights loaded by ``AutoModelForCausalLM`` alone,
  with the eager attention the workbench loads (TransformerLens needs the attention
  probabilities), through transformers' ``generate``: the same computation without the
  workbench, what the target compares with;
* **plain transformers (sdpa)**: the same with transformers' default attention kernel (shown,
  not the target: its logits are not bit-identical to eager's);
* **through the bridge**: the bridge's wrapped model (what generation runs under a hook);
* **no KV cache**: the workbench path with ``use_cache=False``;
* **few-shot, shared / not shared**: the conversations after two worked demonstrations (as
  notebook 05's few-shot candidate), the prefix run once per batch or with every prompt.

Targets: the workbench's throughput (prefix not shared, finished rows run on) ≥ 0.95× plain
(eager) transformers', the KV cache ≥ 3× faster than none, and identical tokens on every row
(the few-shot rows against each other). Printed besides: what sharing the prefix and dropping
finished rows gain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from spt_utils import chat, data, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="conversations")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.load_model(models.DEFAULT_MODEL, device="cpu")
    plain = {attention: AutoModelForCausalLM.from_pretrained(
        models.smollm2_folder(), dtype=torch.float32, attn_implementation=attention).eval()
        for attention in ("eager", "sdpa")}
    questions = data.load_starter().select(range(args.n))
    conversations = [data.challenge_conversation(q, data.REFERENCE_CHALLENGE, answer="Paris.")
                     for q in questions]
    demonstrations = [
        turn for q in data.load_starter().select(range(args.n, args.n + 2))
        for turn in [*data.challenge_conversation(q, data.REFERENCE_CHALLENGE,
                                                  answer=q["correct_answer"])[1:],
                     {"role": "assistant", "content": "Yes, I am sure."}]]
    few_shot = [[c[0], *demonstrations, *c[1:]] for c in conversations]
    settings = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    paths: dict[str, Callable[[], list[str]]] = {
        "workbench (no hook: unwrapped)": lambda: chat.generate(model, conversations,
                                                                **settings),
        "workbench, prefix not shared": lambda: chat.generate(
            model, conversations, share_prefix=False, **settings),
        "workbench, finished rows run on": lambda: chat.generate(
            model, conversations, share_prefix=False, drop_finished=False, **settings),
        "plain transformers (eager)": lambda: chat.generate(
            model, conversations, hf_model=plain["eager"], drop_finished=False, **settings),
        "plain transformers (sdpa)": lambda: chat.generate(
            model, conversations, hf_model=plain["sdpa"], drop_finished=False, **settings),
        "through the bridge": lambda: chat.generate(model, conversations,
                                                    hf_model=model.original_model, **settings),
        "no KV cache": lambda: chat.generate(model, conversations, use_cache=False,
                                             **settings),
        "few-shot, shared prefix": lambda: chat.generate(model, few_shot, **settings),
        "few-shot, prefix not shared": lambda: chat.generate(model, few_shot,
                                                             share_prefix=False, **settings),
    }
    chat.generate(model, conversations[:1], max_new_tokens=4)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in paths}
    replies: dict[str, list[str]] = {}
    for repeat in range(args.repeats):  # interleaved, so load changes hit every row alike
        for name, run in paths.items():
            if name == "no KV cache" and repeat:  # ~10x slower: timed once
                continue
            started = time.perf_counter()
            replies[name] = run()
            timings[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in timings.items()}
    reference = replies["plain transformers (eager)"]
    n_tokens = sum(len(model.tokenizer(r)["input_ids"]) for r in reference)
    print(f"{args.n} conversations, up to {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {args.threads} thread(s), median of {args.repeats} "
          f"({n_tokens} tokens generated)")
    print(f"{'path':32} {'seconds':>8} {'throughput vs plain eager':>26} {'same tokens':>12}")
    for name in paths:
        ratio = median["plain transformers (eager)"] / median[name]
        same = replies[name] == (replies["few-shot, prefix not shared"] if "few-shot" in name
                                 else reference)
        print(f"{name:32} {median[name]:8.2f} {ratio:25.2f}x {str(same):>12}")
    workbench = median["workbench, finished rows run on"]
    print(f"workbench throughput (prefix not shared, finished rows run on): "
          f"{median['plain transformers (eager)'] / workbench:.2f}x plain eager's (target >= "
          f"0.95x); {median['plain transformers (sdpa)'] / workbench:.2f}x plain sdpa's")
    print(f"KV cache speed-up: {median['no KV cache'] / workbench:.2f}x (target >= 3x)")
    for kind, (shared, full) in {
            "chat": ("workbench (no hook: unwrapped)", "workbench, prefix not shared"),
            "few-shot": ("few-shot, shared prefix", "few-shot, prefix not shared")}.items():
        print(f"shared prefix speed-up, {kind}: {median[full] / median[shared]:.2f}x")
    dropping = median["workbench, prefix not shared"]
    print(f"dropping finished rows speed-up (prefix not shared): {workbench / dropping:.2f}x")


if __name__ == "__main__":
    main()
