"""Multi-process training under ``torchrun``: the ranks, FSDP2 sharding of full SFT and
the all-reduce of the trainable gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from spt_utils import models
from spt_utils.tuning.methods import TuningSetup


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_fully(setup: TuningSetup, device: str | torch.device) -> TuningSetup:
    """Shard full SFT with FSDP2 (``fully_shard``) over the ranks of ``torchrun``: every
    decoder layer, then the rest. Each rank keeps 1/world of the parameters, gradients and
    AdamW state (float32 masters; on CUDA the forward runs in bf16 with float32 gradient
    reduction). Gradients are summed over ranks, not averaged, since :func:`train` normalises
    the loss by the global batch's token count. ``device``: this rank's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if setup.method != "sft":
        raise ValueError(f"shard_fully: FSDP2 is for full SFT, not {setup.method!r} (SPT and "
                         "LoRA train few tensors: plain data parallel, see train)")
    if _distributed()[1] < 2:
        raise ValueError("shard_fully: needs torch.distributed with 2 or more ranks (torchrun)")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in setup.model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(setup.model, mesh=mesh, mp_policy=policy)
    for module in setup.model.modules():  # each sharded group reduces its own gradients
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    setup.params, setup.device, setup.sharded = models.clean_state_dict(setup.model), device, True
    return setup


def full_state_dict(setup: TuningSetup) -> dict[str, Tensor]:
    """Every trainable tensor in full on the CPU; for a sharded setup an all-gather, so call
    it on every rank."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in setup.params.items()}


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the trainable gradients over ranks in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(params, grads, strict=True):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()
