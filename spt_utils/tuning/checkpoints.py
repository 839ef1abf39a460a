"""Atomic checkpoints of a training run and their exact restore."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spt_utils.io import atomic_folder
from spt_utils.tuning.heads import CheckpointError
from spt_utils.tuning.methods import TuningSetup

CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "state.pt"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None when there is none)."""
    root = Path(root)
    complete = sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())
    return complete[-1] if complete else None


def save_checkpoint(
    root: str | Path, step: int, setup: TuningSetup, optimizer, scheduler, meta: dict, *,
    losses: list[float], evals: list[dict], keep: int = 2,
) -> Path:
    """Write ``root/step-NNNNNN/`` atomically: staged in a hidden folder, then renamed, so a
    failed save never replaces or corrupts a good checkpoint. Keeps the newest ``keep``."""
    root, final = Path(root), _step_dir(Path(root), step)
    with atomic_folder(final) as staging:
        tensors = {n: p.detach().contiguous().cpu() for n, p in setup.params.items()}
        save_file(tensors, str(staging / CHECKPOINT_WEIGHTS), metadata={"step": str(step)})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng, "step": step, "meta": json.dumps(meta),
                    "losses": losses, "evals": json.dumps(evals)}, staging / CHECKPOINT_STATE)
    for old in sorted(p for p in root.glob("step-[0-9]*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: str | Path, setup: TuningSetup, optimizer, scheduler, meta: dict
) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG state from ``folder``.

    Raises :class:`CheckpointError` naming the file when it is missing or corrupt, or when it
    was written for another method, model, tokenizer or parameter set."""
    folder = Path(folder)
    weights_path, state_path = folder / CHECKPOINT_WEIGHTS, folder / CHECKPOINT_STATE
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{weights_path}: corrupt or missing checkpoint ({error})") from error
    try:
        state = torch.load(state_path, weights_only=True)
    except Exception as error:  # torch raises several unrelated types on a damaged file
        raise CheckpointError(f"{state_path}: corrupt or missing checkpoint ({error})") from error
    saved_meta = json.loads(state["meta"])
    for key, value in meta.items():
        if saved_meta.get(key) != value:
            raise CheckpointError(
                f"{state_path}: field {key!r} is {saved_meta.get(key)!r} in the checkpoint but "
                f"{value!r} in this run: it belongs to another run"
            )
    with torch.no_grad():
        for name, parameter in setup.params.items():
            parameter.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {"step": state["step"], "losses": list(state["losses"]),
            "evals": json.loads(state["evals"])}
