"""SPT on the tiny model, run as ``torchrun --nproc_per_node=2 tests/tuning_ddp_worker.py OUT``
(CPU, gloo) by ``test_tuning.py``: each rank writes ``OUT.rank<r>`` with, for SGD and AdamW,
the per-step losses, the gradients every step applied and the trained slices. The same
functions give the single-process reference run."""

from __future__ import annotations

import dataclasses
import sys
from unittest import mock

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from spt_utils import data, models, tuning

HEADS = [(0, 1), (1, 0), (1, 1)]
CONFIG = tuning.TrainConfig(steps=3, batch_size=4, micro_batch_size=1, lr=1e-2, seed=0)
# SGD's update is proportional to the gradient (Adam's is not), and without clipping a
# uniformly mis-scaled gradient changes it.
OPTIMIZERS = {"sgd": dataclasses.replace(CONFIG, max_grad_norm=1e9, lr=0.5), "adamw": CONFIG}


def conversations(n: int = 6) -> list[list[dict]]:
    """``n`` insist/revise training conversations, as notebook 01 writes them."""
    records = data.build_training_data(data.load_starter().select(range(n)), n, seed=0)
    return [record["messages"] for record in records]


def train_recorded(optimizer_name: str) -> dict[str, torch.Tensor]:
    """Train SPT with ``optimizer_name``; ``{"loss": per-step losses, "step<i>.grad.<name>":
    the gradient step i applied, "final.<name>": the trained slice}``."""
    bridge = models.load_model(models.TINY_MODEL, device="cpu")
    setup = tuning.prepare("spt", bridge, HEADS, include_kv=True)
    examples = tuning.prepare_examples(bridge.tokenizer, conversations())
    applied: list[dict[str, torch.Tensor]] = []
    make_adamw = tuning._optimizer

    def recording_optimizer(setup: tuning.TuningSetup, config: tuning.TrainConfig):
        if optimizer_name == "sgd":
            optimizer = torch.optim.SGD(list(setup.params.values()), lr=config.lr)
        else:
            optimizer = make_adamw(setup, config)
        optimizer.register_step_pre_hook(lambda *_: applied.append(
            {n: p.grad.detach().clone() for n, p in setup.params.items()}))
        return optimizer

    with mock.patch.object(tuning.loop, "_optimizer", recording_optimizer):  # train calls it
        result = tuning.train(setup, examples, OPTIMIZERS[optimizer_name], progress=False)
    recorded = {"loss": torch.tensor(result.losses, dtype=torch.float64)}
    for index, grads in enumerate(applied):
        recorded |= {f"step{index}.grad.{name}": grad for name, grad in grads.items()}
    recorded |= {f"final.{name}": p.detach().clone() for name, p in setup.params.items()}
    return recorded


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        recorded = {f"{name}.{key}": value for name in OPTIMIZERS
                    for key, value in train_recorded(name).items()}
        save_file(recorded, f"{out}.rank{dist.get_rank()}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
