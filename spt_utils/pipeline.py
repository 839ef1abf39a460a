"""Run the notebooks in order with papermill: ``python -m spt_utils.pipeline`` (``make run``).

Each run writes the executed notebooks, their artifacts and ``manifest.json`` under
``runs/<timestamp>/``; figures go to ``figures/``. ``--resume RUN_DIR`` skips notebooks that
already finished in that run. ``SPT_PROFILE`` (``cpu``, ``paper`` or ``test``) and
``SPT_MODEL`` choose the sizes and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from spt_utils.models import DEFAULT_MODEL

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
RESULTS_TABLE = "results.md"
DONE_DIR = ".done"
PACKAGES = ("torch", "transformer-lens", "transformers", "peft", "datasets", "spt-utils")

# Parameter overrides per profile and notebook (by file-name prefix). The notebooks' own
# `parameters` cells hold the CPU defaults; "paper" is the GPU configuration of the paper
# (appendix C, tables 13-14) and "test" the smallest sizes that still exercise every cell.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {},
    "paper": {
        "01": {
            "source": "mmlu", "n_source": 20000, "n_pairs": 100, "n_train": 3840,
            "n_eval": 400, "n_general": 500, "check_accuracy": 1000,
        },
        "02": {
            "top_k": 32, "n_oracle_layers": 6, "n_check_pairs": 16, "n_receiver_pairs": 16,
            "n_pattern_heads": 8,
        },
        "03": {
            "max_k": 32, "k_values": [1, 2, 4, 8, 16, 32], "n_random": 50, "n_sweep_pairs": 100,
            "n_reference": 100, "n_generate": 200, "n_random_generate": 10,
            "generate_ks": [1, 2, 4, 8, 16, 32],
            "max_new_tokens": 48, "batch_size": 32,
        },
        "04": {
            "spt_steps": 240, "sft_steps": 120, "baseline_steps": 120, "batch_size": 32,
            "micro_batch_size": 8, "spt_lr": 1e-5, "sft_lr": 5e-6, "lora_lr": 2e-4,
            "prompt_lr": 3e-2, "weight_decay": 0.1, "dtype": "bfloat16", "n_heldout": 32,
            "checkpoint_every": 40,
        },
        "05": {
            "n_eval": 400, "n_general": 500, "n_opinion": 1000, "n_kl_docs": 1000,
            "max_new_tokens": 64, "batch_size": 64,
        },
        "06": {
            "eval_source": "sst2", "train_source": "rotten_tomatoes", "n_eval": 872,
            "n_train": 1000, "n_questions": 100, "max_new_tokens": 8, "protocol_tokens": 48,
            "batch_size": 64, "n_pairs": 32, "top_k": 16, "train_batch_size": 16,
            "n_virtual_tokens": 20,
        },
    },
    "test": {
        "00": {"max_new_tokens": 8},
        "01": {
            "n_pairs": 4, "n_train": 8, "n_eval": 4, "n_general": 4, "n_arithmetic": 4,
            "check_accuracy": 4,
        },
        "02": {
            "top_k": 3, "n_oracle_layers": 1, "n_check_pairs": 2, "n_receiver_pairs": 1,
            "n_pattern_heads": 2,
        },
        "03": {
            "max_k": 2, "n_random": 2, "n_sweep_pairs": 4, "n_reference": 2, "n_generate": 2,
            "n_random_generate": 1, "max_new_tokens": 8, "n_examples": 2,
        },
        "04": {
            "spt_steps": 2, "sft_steps": 2, "baseline_steps": 1, "batch_size": 2,
            "micro_batch_size": 2, "n_heldout": 1, "checkpoint_every": 2, "few_shot_k": 2,
        },
        "05": {"n_eval": 2, "n_general": 4, "n_opinion": 2, "n_kl_docs": 2, "max_new_tokens": 8},
        "06": {
            "n_eval": 2, "n_train": 3, "n_questions": 1, "max_new_tokens": 4,
            "protocol_tokens": 4, "n_boot": 20, "n_pairs": 1, "top_k": 1, "n_shots": 1,
            "epochs": 1, "train_batch_size": 3, "n_virtual_tokens": 2, "n_examples": 1,
        },
    },
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def parameters_for(notebook: Path, profile: str, common: dict[str, Any]) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}: choose one of {sorted(PROFILES)}")
    return {**common, **PROFILES[profile].get(notebook.name[:2], {})}


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run_pipeline(
    run_dir: Path,
    *,
    model_name: str = DEFAULT_MODEL,
    profile: str = "cpu",
    seed: int = 0,
    figures_dir: Path = REPO / "figures",
    notebooks: list[Path] | None = None,
    log_output: bool = False,
) -> dict[str, Any]:
    """Execute ``notebooks`` (default: all) into ``run_dir``; return the manifest."""
    import papermill

    run_dir = run_dir.resolve()
    (run_dir / DONE_DIR).mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        model=model_name, profile=profile, seed=seed, git_commit=_git_commit(),
        versions=_versions(), timings_s=manifest.get("timings_s", {}),
    )
    common = {
        "model_name": model_name, "run_dir": str(run_dir), "seed": seed,
        "figures_dir": str(figures_dir.resolve()),
    }
    for notebook in notebooks or notebook_paths():
        done = run_dir / DONE_DIR / notebook.name
        if done.exists():
            print(f"[spt] {notebook.name}: already finished in this run, skipped")
            continue
        print(f"[spt] {notebook.name} ...", flush=True)
        started = time.perf_counter()
        papermill.execute_notebook(
            str(notebook),
            str(run_dir / notebook.name),
            parameters=parameters_for(notebook, profile, common),
            cwd=str(REPO),
            kernel_name="python3",
            progress_bar=False,
            log_output=log_output,
        )
        manifest["timings_s"][notebook.name] = round(time.perf_counter() - started, 1)
        done.touch()
        manifest_path.write_text(json.dumps(manifest, indent=2))
        print(f"[spt] {notebook.name}: {manifest['timings_s'][notebook.name]} s", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("SPT_MODEL", DEFAULT_MODEL))
    parser.add_argument("--profile", default=os.environ.get("SPT_PROFILE", "cpu"))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SPT_SEED", "0")))
    parser.add_argument("--resume", type=Path, help="a run directory to finish")
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    args = parser.parse_args(argv)
    run_dir = args.resume or args.runs / datetime.now().strftime("%Y%m%d-%H%M%S")
    print(f"[spt] run directory: {run_dir}")
    started = time.perf_counter()
    run_pipeline(run_dir, model_name=args.model, profile=args.profile, seed=args.seed)
    print(f"[spt] pipeline finished in {time.perf_counter() - started:.0f} s")
    table = run_dir / RESULTS_TABLE
    if table.exists():
        print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
