"""The command line: ``python -m spt_utils.tuning`` or ``torchrun -m spt_utils.tuning``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from spt_utils import io, models
from spt_utils.tuning.distributed import _distributed, full_state_dict, shard_fully
from spt_utils.tuning.examples import load_training_conversations, prepare_examples
from spt_utils.tuning.export import export_hf, save_head_deltas
from spt_utils.tuning.loop import TrainConfig, train
from spt_utils.tuning.methods import METHODS, prepare


def _device_map_arg(value: str) -> models.DeviceMap:
    """``--device-map``: ``auto``, ``balanced``… or a JSON object of module → device."""
    return json.loads(value) if value.lstrip().startswith("{") else value


def main(argv: list[str] | None = None) -> None:
    """Train one method from a run directory. Under ``torchrun``: SPT and LoRA data-parallel,
    full SFT sharded with FSDP2. Without it, ``--device-map`` spreads one model over devices
    (SPT keeps only the head slices trainable on their layers' devices)."""
    import argparse

    from spt_utils.patching import load_heads

    parser = argparse.ArgumentParser(prog="python -m spt_utils.tuning", description=main.__doc__)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default="spt")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--include-kv", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda (this rank's GPU) when available")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, "
                        "bfloat16 or float16; FSDP SFT keeps float32 masters")
    parser.add_argument("--device-map", type=_device_map_arg,
                        help="auto, balanced or a JSON object (not under torchrun)")
    parser.add_argument("--offload-folder", help="for disk entries of --device-map")
    args = parser.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and args.device_map is not None:
        parser.error("--device-map splits one model; it does not combine with torchrun")
    device = args.device or models.default_device()
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    sharded = distributed and args.method == "sft"
    try:
        placement = ({"device_map": args.device_map, "offload_folder": args.offload_folder}
                     if args.device_map is not None
                     else {"device": "cpu" if sharded else device})
        # FSDP shards float32 masters (bf16 compute on CUDA); the others load in --dtype
        dtype = "float32" if sharded else args.dtype
        bridge = models.load_model(args.model, dtype=dtype, **placement)
        run = io.provenance(args.model, bridge.tokenizer, profile=None, seed=args.seed)
        heads = load_heads(args.run_dir / "heads.json", expect=run) if args.method in (
            "spt", "lora_heads") else []
        setup = prepare(args.method, bridge, heads, include_kv=args.include_kv, seed=args.seed)
        if sharded:
            shard_fully(setup, device)
        records = load_training_conversations(args.run_dir / "data" / "train.jsonl")
        examples = prepare_examples(bridge.tokenizer, [r["messages"] for r in records])
        if sharded and args.checkpoint_every:
            print("[tuning] FSDP run: no checkpoints (not implemented for sharded state)")
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                             micro_batch_size=args.micro_batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed,
                             checkpoint_every=0 if sharded else args.checkpoint_every)
        tuned = args.run_dir / "tuned"
        train(setup, examples, config, checkpoint_dir=tuned / "checkpoints" / args.method,
              resume=True, meta={"model": args.model})
        state = full_state_dict(setup) if sharded else None  # a collective: every rank
        if _distributed()[0] != 0:
            return
        if args.method == "spt" and models.is_offloaded(bridge.original_model):
            path = save_head_deltas(tuned / "spt_head_deltas.safetensors", setup,
                                    base_model=args.model, provenance=run)
            print(f"[tuning] offloaded layers cannot be exported in full: wrote {path}")
            return
        export_hf(setup, bridge.tokenizer, tuned / args.method, base_model=args.model,
                  seed=args.seed, state=state, provenance=run)
    finally:
        if distributed:
            dist.destroy_process_group()
