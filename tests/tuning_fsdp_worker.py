"""Full SFT of the tiny model sharded with FSDP2, run as ``torchrun --nproc_per_node=2
tests/tuning_fsdp_worker.py OUT`` (CPU, gloo) by ``test_scale.py``; rank 0 writes the final
weights and the per-step losses to ``OUT``. :func:`train_sft` without sharding gives the
single-process reference run."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tuning_ddp_worker import conversations

from spt_utils import models, tuning

CONFIG = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=1, lr=1e-3, seed=0)
LOSSES = "__losses__"


def train_sft(shard: bool) -> dict[str, torch.Tensor]:
    """The trained weights (full, on the CPU) and, under ``LOSSES``, the per-step losses."""
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    setup = tuning.prepare("sft", bridge)
    if shard:
        tuning.shard_fully(setup, "cpu")
    examples = tuning.prepare_examples(bridge.tokenizer, conversations())
    result = tuning.train(setup, examples, CONFIG, progress=False)
    return {**tuning.full_state_dict(setup),
            LOSSES: torch.tensor(result.losses, dtype=torch.float64)}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trained = train_sft(shard=True)
        if dist.get_rank() == 0:
            save_file(trained, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
