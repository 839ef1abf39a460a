"""The sweep: every setting trained from the same base weights and evaluated."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from spt_utils import models
from spt_utils.patching import Head
from spt_utils.tuning.cache import LayerCache
from spt_utils.tuning.examples import Example
from spt_utils.tuning.heads import _freeze
from spt_utils.tuning.loop import TrainConfig, train
from spt_utils.tuning.methods import prepare

SWEEP_METHODS = ("spt", "sft", "lora_attn", "prompt_tuning")
_RESTORED_FROM_SNAPSHOT = ("sft", "lora_attn")  # methods that change the base weights


def _unwrap_lora(hf_model: nn.Module) -> None:
    """Put every peft LoRA layer's base layer back in its place, under the plain and the
    bridge's alias paths alike (``merge_and_unload`` leaves the aliases wrapped)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, name, child.get_base_layer())


@dataclass
class SweepSetting:
    """One point of a sweep: a method, its learning rate and steps and, for ``spt``, the
    heads (the top ``len(heads)`` of a ranking, or a random draw named by ``label``)."""

    method: str
    lr: float
    steps: int
    heads: list[Head] = field(default_factory=list)
    include_kv: bool = False
    label: str = ""

    @property
    def name(self) -> str:
        if self.method != "spt":
            return f"{self.method} lr={self.lr:g} steps={self.steps}"
        kv = "+kv" if self.include_kv else ""
        return (f"spt{kv} k={len(self.heads)}{' ' + self.label if self.label else ''} "
                f"lr={self.lr:g} steps={self.steps}")


def sweep(
    bridge: TransformerBridge,
    examples: Sequence[Example],
    settings: Sequence[SweepSetting],
    evaluate: Callable[[SweepSetting, nn.Module | None], dict[str, Any]],
    *,
    batch_size: int = 8,
    micro_batch_size: int = 4,
    weight_decay: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train each setting from the same base weights on ``examples`` and evaluate it.

    ``bridge`` is tuned in place and restored after each setting: SPT's slices live in
    hooks that are removed (the base weights never change); full SFT's weights and LoRA's
    merged weights are copied back from a snapshot; a soft prompt wraps the untouched base.
    ``evaluate(setting, hf_model)`` runs while the tuned model is in ``bridge`` and returns
    its metrics; ``hf_model`` is the peft model to generate with for ``prompt_tuning`` (the
    bridge alone is then the base model) and ``None`` otherwise. All SPT settings share one
    :class:`LayerCache`. Returns one row per setting: ``name``, ``method``, ``lr``,
    ``steps``, ``k``, ``include_kv``, ``label``, ``heads``, ``losses``, ``train_s`` and the
    metrics; ``on_row(row)`` receives each as soon as it is measured (e.g. to save progress).
    """
    for setting in settings:
        if setting.method not in SWEEP_METHODS:
            raise ValueError(f"sweep: method {setting.method!r} is not one of {SWEEP_METHODS}")
    hf_model = bridge.original_model
    layer_cache = LayerCache(examples)
    snapshot = None
    rows = []
    for setting in tqdm(settings, desc="sweep", disable=not progress):
        if setting.method in _RESTORED_FROM_SNAPSHOT and snapshot is None:
            snapshot = {n: t.detach().clone()
                        for n, t in models.clean_state_dict(hf_model).items()}
        setup = prepare(setting.method, bridge, setting.heads, include_kv=setting.include_kv,
                        seed=seed)
        config = TrainConfig(steps=setting.steps, batch_size=batch_size,
                             micro_batch_size=micro_batch_size, lr=setting.lr,
                             weight_decay=weight_decay, seed=seed)
        try:
            result = train(setup, examples, config, progress=False, layer_cache=layer_cache)
            if setting.method == "lora_attn":
                setup.model.merge_and_unload()  # the merged weights are the bridge's own
            generator = setup.model if setting.method == "prompt_tuning" else None
            metrics = evaluate(setting, generator)
        finally:
            if setup.head_params is not None:
                setup.head_params.remove()
            elif setting.method in _RESTORED_FROM_SNAPSHOT:
                if setting.method == "lora_attn":
                    _unwrap_lora(hf_model)
                with torch.no_grad():
                    for name, tensor in models.clean_state_dict(hf_model).items():
                        tensor.copy_(snapshot[name])
            _freeze(hf_model)
        rows.append({"name": setting.name, "method": setting.method, "lr": setting.lr,
                     "steps": setting.steps, "k": len(setting.heads),
                     "include_kv": setting.include_kv, "label": setting.label,
                     "heads": [list(h) for h in setting.heads], "losses": result.losses,
                     "train_s": round(result.seconds, 1), **metrics})
        if on_row is not None:
            on_row(rows[-1])
    return rows
