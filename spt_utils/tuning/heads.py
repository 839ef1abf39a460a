"""Model plumbing and the head-sparse parameters: the selected heads' q/o (and k/v)
slices as the only trainable tensors, swapped into the frozen weights by forward hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import align_module_device
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spt_utils import models
from spt_utils.models import attn_linear, d_head_of
from spt_utils.patching import Head, validate_heads


class CheckpointError(RuntimeError):
    """A checkpoint, delta file or tuned folder is missing, corrupt or does not fit."""


# --------------------------------------------------------------------------- model plumbing


HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_head_layout(hf_model: nn.Module, method: str) -> None:
    """Raise ``ValueError`` unless every layer has separate q/k/v/o projections whose rows
    (q, k, v) and columns (o) are laid out head by head, as in Llama, Mistral, Qwen2 and
    Gemma-2; fused projections (GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``) are
    refused."""
    config = hf_model.config
    try:
        layers = hf_model.get_decoder().layers
        width = config.num_attention_heads * d_head_of(config)
        kv_width = config.num_key_value_heads * d_head_of(config)
        shapes = [(attn_linear(hf_model, layer, proj).weight.shape, proj)
                  for layer in range(len(layers)) for proj in HEAD_PROJECTIONS]
    except AttributeError as error:
        raise ValueError(
            f"{method}: the {config.model_type!r} attention has no separate q_proj/k_proj/"
            f"v_proj/o_proj per layer ({error}); head slices are supported for Llama, Mistral, "
            "Qwen2 and Gemma-2 style attention only"
        ) from error
    expected = {"q_proj": (width, None), "k_proj": (kv_width, None),
                "v_proj": (kv_width, None), "o_proj": (None, width)}
    for shape, proj in shapes:
        rows, columns = expected[proj]
        if (rows is not None and shape[0] != rows) or (columns is not None and shape[1] != columns):
            raise ValueError(f"{method}: {proj} has shape {list(shape)}, not head by head")


def check_tokenizer(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str):
    """Raise :class:`CheckpointError` when the tokenizer has ids the model cannot embed."""
    rows = hf_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
            f"{rows}: the tokenizer and the checkpoint do not belong together."
        )


# --------------------------------------------------------------------------- head slices


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device for an offloaded module
    (whose weights are ``meta`` between calls), else the device of its weight."""
    hook = getattr(module, "_hf_hook", None)
    if getattr(hook, "offload", False) and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return module.weight.device


def _swap_slices(
    dim: int, index: Tensor, slices: list[nn.Parameter], module: nn.Linear, args: tuple, _out
) -> Tensor:
    """Forward hook: recompute the Linear with the trained slices swapped into its weight
    (the float32 slices cast to the weight's dtype; an offloaded weight is loaded for it)."""
    with align_module_device(module):
        weight = module.weight
        weight = weight.index_copy(dim, index, torch.cat(list(slices), dim=dim).to(weight.dtype))
        return F.linear(args[0], weight, module.bias)


@dataclass
class _SliceGroup:
    """The trained slices of one Linear: their names, their index along ``dim``."""

    linear: nn.Linear
    dim: int  # 0: output rows (q/k/v), 1: input columns (o)
    names: list[str]
    index: Tensor


class HeadSparseParameters:
    """Trainable copies of the selected heads' slices, swapped in by forward hooks.

    ``params`` maps names such as ``layers.3.q_proj.head5``, ``layers.3.o_proj.head5`` and
    ``layers.3.k_proj.group1`` to ``nn.Parameter`` slices; ``initial`` holds their base values.
    The slices are float32 master copies whatever the model's dtype (a bf16 weight could not
    take a 1e-5 step), each on its layer's compute device (a model split over devices, or
    with offloaded layers, keeps its frozen weights where they are). Call :meth:`remove` or
    :meth:`materialize` when done.
    """

    def __init__(self, hf_model: PreTrainedModel, heads: Sequence[Head], *, include_kv=False):
        config = hf_model.config
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        d_head = d_head_of(config)
        if not heads:
            raise ValueError("heads: the head set is empty; select at least one head to tune")
        self.heads = sorted(set(validate_heads(list(heads), config.num_hidden_layers, n_heads)))
        self.d_head, self.include_kv, self.model = d_head, include_kv, hf_model
        _freeze(hf_model)
        groups: dict[tuple[int, str], list[tuple[str, int]]] = {}
        for layer, head in self.heads:
            groups.setdefault((layer, "q_proj"), []).append((f"head{head}", head))
            groups.setdefault((layer, "o_proj"), []).append((f"head{head}", head))
            if include_kv:
                group = head // (n_heads // n_kv)
                for proj in ("k_proj", "v_proj"):
                    entries = groups.setdefault((layer, proj), [])
                    if (f"group{group}", group) not in entries:  # heads of a group share it
                        entries.append((f"group{group}", group))
        self.params: dict[str, nn.Parameter] = {}
        self.groups: list[_SliceGroup] = []
        for (layer, proj), entries in sorted(groups.items()):
            linear = attn_linear(hf_model, layer, proj)
            dim = 1 if proj == "o_proj" else 0
            names, index = [], []
            for label, number in entries:
                span = torch.arange(number * d_head, (number + 1) * d_head)
                name = f"layers.{layer}.{proj}.{label}"
                with align_module_device(linear):
                    weight = linear.weight.detach()
                    value = weight.index_select(dim, span.to(weight.device))
                    value = value.to(execution_device(linear), torch.float32)
                self.params[name] = nn.Parameter(value.clone())
                names.append(name)
                index.append(span)
            self.groups.append(
                _SliceGroup(linear, dim, names, torch.cat(index).to(execution_device(linear)))
            )
        self.initial = {name: p.detach().clone() for name, p in self.params.items()}
        self._handles = [
            g.linear.register_forward_hook(
                functools.partial(_swap_slices, g.dim, g.index, [self.params[n] for n in g.names])
            )
            for g in self.groups
        ]

    def remove(self) -> None:
        """Remove the hooks (the model computes with its frozen weights again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def materialize(self) -> None:
        """Write the trained slices into the weights and remove the hooks. Offloaded weights
        cannot be written: save the slices with :func:`save_head_deltas` instead."""
        if models.is_offloaded(self.model):
            raise CheckpointError(
                "materialize: the model keeps offloaded weights (CPU/disk device_map) that "
                "cannot be written in place; save the trained slices with save_head_deltas "
                "and apply them to a model loaded on devices"
            )
        for group in self.groups:
            values = torch.cat([self.params[n] for n in group.names], dim=group.dim)
            group.linear.weight.index_copy_(group.dim, group.index, values.to(group.linear.weight))
        self.remove()


def _freeze(hf_model: nn.Module) -> None:
    for parameter in hf_model.parameters():
        parameter.requires_grad_(False)
