"""Benchmark path patching on SmolLM2 (32 pairs): fast exact vs the per-sender oracle,
attribution patching and one ``run_with_cache``, measured side by side in one run.

    python benchmarks/bench_patching.py [--pairs 32] [--oracle-heads 6] [--repeats 3]

Each timing is the median of ``--repeats`` calls after a warm-up (a first call also pays for
allocating its memory). The oracle runs one forward pass per head; it is timed once on a
subset of heads and extrapolated to all heads (the output says so). Targets: fast ≥ 100×
faster than the oracle and ≤ 3× one ``run_with_cache``.
"""

from __future__ import annotations

import argparse
import time

import torch

from spt_utils import data, models, patching

CPU_SECONDS: dict[str, float] = {}


def timed(function, *args, repeats: int = 1, **kwargs) -> tuple[float, object]:
    """Median wall time over ``repeats`` calls, and the last result; the median call's
    process CPU time goes to ``CPU_SECONDS`` (a steadier figure on a shared machine)."""
    runs = []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = function(*args, **kwargs)
        runs.append((time.perf_counter() - started, time.process_time() - cpu_started))
    wall, cpu = sorted(runs)[len(runs) // 2]
    CPU_SECONDS[getattr(function, "__name__", str(function))] = cpu
    return wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--oracle-heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many calls")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = models.load_model(args.model, device=args.device)
    questions = data.load_starter().select(range(args.pairs))
    pairs = data.build_patching_pairs(questions, model.tokenizer)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    print(f"{args.model}: {len(pairs)} pairs, {pairs.reference.shape[1]} positions, "
          f"{n_layers}×{n_heads} heads, {torch.get_num_threads()} threads")

    patching.path_patch_heads(model, pairs)  # warm-up
    repeats = args.repeats
    with torch.no_grad():  # as the patching functions run their clean passes
        cache_s, _ = timed(
            model.run_with_cache, pairs.reference.to(model.cfg.device), names_filter=names,
            repeats=repeats,
        )
    fast_s, fast = timed(patching.path_patch_heads, model, pairs, repeats=repeats)
    attribution_s, attribution = timed(
        patching.attribution_patch_heads, model, pairs, repeats=repeats
    )
    step = max(1, n_layers * n_heads // args.oracle_heads)
    subset = [divmod(i, n_heads) for i in range(0, n_layers * n_heads, step)][: args.oracle_heads]
    subset_s, oracle = timed(patching.path_patch_heads_oracle, model, pairs, heads=subset)
    # the oracle's two clean runs (≈ 2 run_with_cache) are paid once; only the per-head
    # forward passes scale with the number of heads
    per_head_s = max(subset_s - 2 * cache_s, 0.0) / len(subset)
    oracle_s = 2 * cache_s + per_head_s * n_layers * n_heads
    error = max(abs(fast.per_pair[h] - oracle.per_pair[h]).max().item() for h in subset)
    correlation = torch.corrcoef(torch.stack([fast.score.flatten(),
                                              attribution.score.flatten()]))[0, 1].item()

    print(f"median of {repeats} calls each (oracle: one call)")
    print(f"one run_with_cache (z names)      {cache_s:8.2f} s   1.00×")
    print(f"fast exact path patching          {fast_s:8.2f} s   {fast_s / cache_s:5.2f}× cache")
    print(f"attribution patching (last pos.)  {attribution_s:8.2f} s   "
          f"{attribution_s / cache_s:5.2f}× cache")
    print(f"per-sender oracle, EXTRAPOLATED   {oracle_s:8.2f} s   {oracle_s / cache_s:5.2f}× "
          f"cache (timed {len(subset)} heads: {subset_s:.2f} s = 2 clean runs + "
          f"{per_head_s:.2f} s/head, scaled to {n_layers * n_heads} heads)")
    print(f"speed-up fast vs oracle           {oracle_s / fast_s:8.1f}×   (target ≥ 100×)")
    print(f"fast vs cache                     {fast_s / cache_s:8.2f}×   (target ≤ 3×)")
    print("process CPU seconds (all threads):",
          ", ".join(f"{name} {seconds:.1f}" for name, seconds in CPU_SECONDS.items()))
    print(f"max |fast − oracle| on the subset {error:.2e}")
    print(f"corr(path score, attribution)     {correlation:.3f}")
    print("top heads (path, calibrated):",
          ", ".join(f"L{a}H{b} {fast.score[a, b]:+.3f}" for a, b in fast.top_heads(8, "both")))


if __name__ == "__main__":
    main()
