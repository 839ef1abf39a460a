"""SPT against full SFT on SmolLM2, side by side in one run: step time, optimizer state, peak
memory. Targets: SPT's optimizer state <= 5% of SFT's, its step time <= 0.3x SFT's.

SPT runs twice: with the frozen-layer cache (the layers below the lowest tuned head run once
per example, in the untimed warm-up step, then are read from ``tuning.LayerCache``) and
without it (``cache_frozen_layers=False``, every layer runs every step).

Each method runs in its own child process so that peak memory (CPU: ``ru_maxrss``; CUDA:
``torch.cuda.max_memory_allocated``) is its own. Usage: ``python benchmarks/bench_tuning.py``
(``--steps``, ``--micro-batch``, ``--model``). The fixed head set below starts at layer 10;
``--heads-from RUN`` times the heads a pipeline run tuned instead (``RUN/tuned/index.json``),
whose lowest layer sets how much of the model SPT runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Eight heads in the upper two thirds of SmolLM2 (the paper tunes 32 heads of a 7B model);
# the backward pass stops at the lowest trained layer, so this choice sets SPT's cost.
HEADS = [(10, 2), (14, 5), (17, 1), (19, 4), (21, 0), (23, 7), (25, 3), (27, 6)]


RUNS = {"spt": ("spt", True), "spt_uncached": ("spt", False), "sft": ("sft", True)}


def run_heads(run_dir: Path) -> list[tuple[int, int]]:
    """The heads notebook 04 tuned with SPT in ``run_dir``."""
    index = run_dir / "tuned" / "index.json"
    try:
        heads = json.loads(index.read_text())["methods"]["spt"]["heads"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"--heads-from: {index} holds no SPT heads ({error!r})") from error
    return [(int(layer), int(head)) for layer, head in heads]


def measure(
    run: str, model_name: str, steps: int, micro_batch: int, heads: list[tuple[int, int]]
) -> dict:
    sys.path.insert(0, str(REPO))
    from spt_utils import data, models, tuning

    method, cache = RUNS[run]
    bridge = models.load_model(model_name)
    setup = tuning.prepare(method, bridge, heads if method == "spt" else ())
    records = data.build_training_data(data.load_starter(), micro_batch, seed=0)
    examples = tuning.prepare_examples(bridge.tokenizer, [r["messages"] for r in records])
    layer_cache = tuning.LayerCache(examples)
    config = tuning.TrainConfig(steps=1, batch_size=micro_batch, micro_batch_size=micro_batch,
                                cache_frozen_layers=cache)
    # warm-up: allocator, kernels and (cached SPT) the frozen layers' outputs of every example
    tuning.train(setup, examples, config, progress=False, layer_cache=layer_cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    config = tuning.TrainConfig(steps=steps, batch_size=micro_batch, micro_batch_size=micro_batch,
                                cache_frozen_layers=cache)
    result = tuning.train(setup, examples, config, progress=False, layer_cache=layer_cache)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": run,
        "step_s": result.seconds / steps,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "trainable": sum(p.numel() for p in setup.params.values()),
        "peak_bytes": peak,
        "tokens_per_step": sum(len(e[0]) for e in examples),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--heads-from", type=Path, metavar="RUN",
                        help="time SPT on the heads this run tuned (default: the fixed set)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--heads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        heads = [tuple(h) for h in json.loads(args.heads)]
        print(json.dumps(measure(args.child, args.model, args.steps, args.micro_batch, heads)))
        return
    heads = run_heads(args.heads_from) if args.heads_from else HEADS
    rows = {}
    for run in RUNS:
        output = subprocess.run(
            [sys.executable, __file__, "--child", run, "--model", args.model,
             "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
             "--heads", json.dumps(heads)],
            check=True, capture_output=True, text=True,
        ).stdout
        rows[run] = json.loads(output.strip().splitlines()[-1])
    spt, sft = rows["spt"], rows["sft"]
    print(f"model {args.model} on {spt['device']}, {args.steps} timed steps of "
          f"{args.micro_batch} conversations ({spt['tokens_per_step']} tokens), "
          f"SPT on {len(heads)} heads from layer {min(h[0] for h in heads)} "
          f"({'of ' + str(args.heads_from) if args.heads_from else 'the fixed set'})")
    print(f"{'method':14}{'trainable':>14}{'optimizer MB':>14}{'step s':>10}{'peak MB':>10}")
    for row in rows.values():
        state_mb, peak_mb = row["optimizer_state_bytes"] / 2**20, row["peak_bytes"] / 2**20
        print(f"{row['method']:14}{row['trainable']:>14,}{state_mb:>14.2f}"
              f"{row['step_s']:>10.3f}{peak_mb:>10.0f}")
    state_ratio = spt["optimizer_state_bytes"] / sft["optimizer_state_bytes"]
    time_ratio = spt["step_s"] / sft["step_s"]
    print(f"optimizer-state ratio SPT/SFT: {state_ratio:.4f} (target <= 0.05: "
          f"{'met' if state_ratio <= 0.05 else 'MISSED'})")
    print(f"step-time ratio SPT/SFT:       {time_ratio:.3f} (target <= 0.3: "
          f"{'met' if time_ratio <= 0.3 else 'MISSED'}); without the cache "
          f"{rows['spt_uncached']['step_s'] / sft['step_s']:.3f}")
    print(f"peak-memory ratio SPT/SFT:     {spt['peak_bytes'] / sft['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
