"""The frozen-layer cache: each example's input to the lowest trained decoder layer,
computed once, and a forward pass that starts at that layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from spt_utils.tuning.examples import Example
from spt_utils.tuning.methods import TuningSetup


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns its input hidden states."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


class _Captured(Exception):
    """Ends a forward pass once the wanted layer input is recorded."""


def _layer_input(kwargs: dict, args: tuple) -> Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextlib.contextmanager
def _start_at_layer(hf_model: nn.Module, layer: int, inputs: list[Tensor]):
    """Run the decoder from ``layer`` on: the layers below become pass-throughs and the
    input of ``layer`` is replaced by ``inputs`` (one ``[pos, d_model]`` tensor per example,
    right-padded with zeros like the token ids). Mask, positions and rotary embeddings are
    still computed by the model itself, so the layers above see exactly what they would."""
    layers = hf_model.get_decoder().layers
    padded = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)  # [batch, pos, d_model]

    def replace(_module, args: tuple, kwargs: dict):
        hidden = _layer_input(kwargs, args)
        value = padded.to(hidden.device, hidden.dtype)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": value}
        return (value, *args[1:]), kwargs

    below = [layers[i] for i in range(layer)]
    handle = layers[layer].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        for i in range(layer):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, module in enumerate(below):
            layers[i] = module
        handle.remove()


def first_trained_layer(setup: TuningSetup) -> int:
    """The lowest decoder layer with a trained tensor: the lowest head's layer for ``spt``
    and ``lora_heads``, 0 for the methods that train from the embeddings up."""
    return min(layer for layer, _ in setup.heads) if setup.method in ("spt", "lora_heads") \
        else 0


class LayerCache:
    """Each training example's input to a decoder layer, computed once and reused.

    Frozen layers below the lowest trained one give the same output for an example at every
    step (and for every setting on the same base weights), so :func:`train` asks the cache
    instead of running them. An entry is computed on first use from the example alone
    (unpadded, no gradient) and kept on the layer's device; entries are keyed by layer and
    example index, so one cache serves settings whose lowest layers differ. Memory: one
    ``[pos, d_model]`` tensor per example and layer used.
    """

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)
        self.inputs: dict[tuple[int, int], Tensor] = {}

    def check(self, examples: Sequence[Example]) -> None:
        """Raise ``ValueError`` unless ``examples`` are the ones this cache was built for."""
        if len(examples) != len(self.examples) or any(
            a[0] is not b[0] for a, b in zip(examples, self.examples, strict=True)
        ):
            raise ValueError("layer_cache: built for other training examples")

    @torch.no_grad()
    def get(self, setup: TuningSetup, layer: int, indices: Sequence[int], autocast) -> list[Tensor]:
        """The input of decoder ``layer`` for each example in ``indices``."""
        for index in indices:
            if (layer, index) not in self.inputs:
                self.inputs[layer, index] = self._compute(setup, layer, index, autocast)
        return [self.inputs[layer, index] for index in indices]

    def _compute(self, setup: TuningSetup, layer: int, index: int, autocast) -> Tensor:
        ids = self.examples[index][0][None].to(setup.device)  # [1, pos]
        captured = []

        def capture(_module, args: tuple, kwargs: dict):
            captured.append(_layer_input(kwargs, args)[0].detach())  # [pos, d_model]
            raise _Captured

        handle = setup.model.get_decoder().layers[layer].register_forward_pre_hook(
            capture, with_kwargs=True)
        try:
            with autocast, contextlib.suppress(_Captured):
                setup.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            handle.remove()
        return captured[0]
