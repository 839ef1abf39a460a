"""SPT on the tiny model, run as ``torchrun --nproc_per_node=2 tests/tuning_ddp_worker.py OUT``
(CPU, gloo) by ``test_tuning.py``; rank 0 writes the trained slices to ``OUT``. The same
functions give the single-process reference run."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from spt_utils import data, models, tuning

HEADS = [(0, 1), (1, 0), (1, 1)]
CONFIG = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=1, lr=1e-2, seed=0)


def conversations(n: int = 6) -> list[list[dict]]:
    """``n`` insist/revise training conversations, as notebook 01 writes them."""
    records = data.build_training_data(data.load_starter().select(range(n)), n, seed=0)
    return [record["messages"] for record in records]


def train_spt() -> dict[str, torch.Tensor]:
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    setup = tuning.prepare("spt", bridge, HEADS, include_kv=True)
    examples = tuning.prepare_examples(bridge.tokenizer, conversations())
    tuning.train(setup, examples, CONFIG, progress=False)
    return {name: p.detach().clone() for name, p in setup.params.items()}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        trained = train_spt()
        if dist.get_rank() == 0:
            save_file(trained, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
