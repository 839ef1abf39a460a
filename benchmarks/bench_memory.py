"""Peak memory per method on SmolLM2, each in its own child process, and a table
extrapolated by parameter count to 7B and 70B models.

    python benchmarks/bench_memory.py [--model smollm2-135m-instruct] [--steps 2]

Phases: ``load`` (the model and one forward pass), ``path_patching`` (``path_patch_heads`` on
``--pairs`` pairs), one tuning run per method (``--steps`` steps of ``--micro-batch``
conversations; SPT on bench_tuning's 8 heads), and evaluation with every candidate in memory
at once (each tuned folder loaded on its own, as notebook 05 did) against one at a time
(``candidates.iter_candidates``: each candidate built around the base's tensors and freed
before the next). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the
process's ``ru_maxrss`` on the CPU, where the figure reported is above an idle child that only
imported the package (Python, torch, transformers). Linux keeps a process's peak RSS across
``exec``, so the parent loads no model: the tuned folders are written by a child too. The
extrapolation multiplies each figure by the parameter ratio (Llama-2-7B: 6.74e9,
Llama-2-70B: 69.0e9), in the measured dtype: a rough guide, since activations grow with
width × depth × tokens rather than with parameters; README "GPUs and scale" gives the
arithmetic per component.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_tuning import HEADS  # noqa: E402

from spt_utils import candidates, data, io, models, patching, tuning  # noqa: E402
from spt_utils.evaluation import Candidate  # noqa: E402

TUNED = ("spt", "sft", "lora_attn", "prompt_tuning")
MEASURED = ("load", "path_patching", *TUNED, "eval_all_at_once", "eval_one_at_a_time")
TARGETS = {"7B": 6.74e9, "70B": 69.0e9}


def _examples(bridge, n: int) -> list:
    records = data.build_training_data(data.load_starter(), n, seed=0)
    return tuning.prepare_examples(bridge.tokenizer, [r["messages"] for r in records])


def _tokens(bridge) -> torch.Tensor:
    pairs = data.build_patching_pairs(data.load_starter().select(range(2)), bridge.tokenizer)
    return pairs.reference.to(bridge.cfg.device)


def prepare_run(work: Path, model_name: str) -> None:
    """The tuned folders and training file the evaluation phases read (one step each)."""
    io.write_jsonl(work / "data" / "train.jsonl",
                   data.build_training_data(data.load_starter(), 4, seed=0))
    for method in TUNED:
        bridge = models.load_model(model_name)
        setup = tuning.prepare(method, bridge, HEADS)
        config = tuning.TrainConfig(steps=1, batch_size=2, micro_batch_size=2)
        tuning.train(setup, _examples(bridge, 2), config, progress=False)
        tuning.export_hf(setup, bridge.tokenizer, work / "tuned" / method,
                         base_model=model_name)


@torch.no_grad()
def _forward(candidate: Candidate) -> None:
    """One forward pass, standing in for an evaluation."""
    tokens = _tokens(candidate.bridge)
    if candidate.hf_model is not None:
        candidate.hf_model(input_ids=tokens)
    else:
        candidate.bridge(tokens, return_type="logits")


def run_phase(phase: str, model_name: str, work: Path, args: argparse.Namespace) -> dict:
    """One phase in this (child) process; returns what the parent needs besides the peak."""
    if phase == "prepare":
        prepare_run(work, model_name)
        return {}
    if phase == "idle":
        return {}
    base = models.load_model(model_name)
    if phase == "load":
        with torch.no_grad():
            base(_tokens(base), return_type="logits")
        return {"n_params": sum(p.numel() for p in base.original_model.parameters()),
                "dtype": str(base.cfg.dtype).removeprefix("torch."), "device": base.cfg.device}
    if phase == "path_patching":
        questions = data.load_starter().select(range(args.pairs))
        patching.path_patch_heads(base, data.build_patching_pairs(questions, base.tokenizer))
    elif phase in TUNED:
        setup = tuning.prepare(phase, base, HEADS)
        config = tuning.TrainConfig(steps=args.steps, batch_size=args.micro_batch,
                                    micro_batch_size=args.micro_batch)
        tuning.train(setup, _examples(base, args.micro_batch), config, progress=False)
    elif phase == "eval_all_at_once":
        loaded = [Candidate("base", base)]
        for method in TUNED:
            bridge, hf_model = tuning.load_tuned(work / "tuned" / method)
            loaded.append(Candidate(method, bridge, hf_model=None if hf_model is
                                    bridge.original_model else hf_model))
        for candidate in loaded:
            _forward(candidate)
    else:
        for candidate in candidates.iter_candidates(work, base, ("base", *TUNED)):
            _forward(candidate)
    return {}


def peak_bytes() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        facts = run_phase(args.child, args.model, args.work, args)
        print(json.dumps({"peak": peak_bytes(), **facts}))
        return
    peaks, facts = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for phase in ("prepare", "idle", *MEASURED):
            command = [sys.executable, __file__, "--child", phase, "--work", folder,
                       "--model", args.model, "--steps", str(args.steps),
                       "--micro-batch", str(args.micro_batch), "--pairs", str(args.pairs)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            peaks[phase] = result.pop("peak")
            facts.update(result)
            print(f"[bench] {phase}: peak {peaks[phase] / 2**20:.0f} MB", flush=True)
    n_params, cuda = facts["n_params"], facts["device"].startswith("cuda")
    idle = 0 if cuda else peaks["idle"]
    print(f"\n{args.model}: {n_params / 1e6:.1f}M parameters, {facts['dtype']} on "
          f"{facts['device']}; peak memory in GB "
          f"({'allocated on the GPU' if cuda else 'above an idle process'}), and scaled by "
          "parameter count")
    print(f"{'phase':20}{'measured':>10}" + "".join(f"{name:>10}" for name in TARGETS))
    for phase in MEASURED:
        measured = (peaks[phase] - idle) / 2**30
        scaled = "".join(f"{measured * size / n_params:>10.1f}" for size in TARGETS.values())
        print(f"{phase:20}{measured:>10.3f}{scaled}")
    ratio = (peaks["eval_one_at_a_time"] - idle) / (peaks["eval_all_at_once"] - idle)
    print(f"evaluation peak, one candidate at a time / all at once: {ratio:.2f}")


if __name__ == "__main__":
    main()
