"""Shared fixtures: seeding, the tiny random model and the real embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from spt_utils import models


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    """2 layers, 4 query heads sharing 2 kv heads, random weights, trained BPE tokenizer."""
    return models.load_model(models.TINY_MODEL, device="cpu")


# A split of the tiny Llama: layer 0 and the unembedding offloaded to disk (accelerate keeps
# them as meta tensors and loads them for each forward pass), the rest on the CPU.
SPLIT_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="session")
def split_map() -> dict[str, str]:
    return dict(SPLIT_MAP)


@pytest.fixture(scope="session")
def split_tiny_model(tmp_path_factory):
    """The tiny model (same weights as ``tiny_model``) split by ``SPLIT_MAP``."""
    return models.load_model(models.TINY_MODEL, device_map=SPLIT_MAP,
                             offload_folder=tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (cached HF folder; built on first use)."""
    return models.load_model(device="cpu")


def _token_ending_rows_apart(new_tokens: torch.Tensor) -> int:
    """A token of ``new_tokens`` ([batch, new]) that, as their EOS, ends rows apart: of the
    tokens in some rows before the last step but not in every row, the one whose first
    appearances fall on the most different steps."""
    def steps_ended(token: int) -> int:
        hits = new_tokens[:, :-1] == token
        if not hits.any() or (new_tokens == token).any(1).all():
            return 0
        return len({int(row.nonzero()[0, 0]) for row in hits if row.any()})
    token = max(new_tokens.unique().tolist(), key=steps_ended)
    assert steps_ended(token), "no token of these rows ends them apart"
    return token


def _assert_same_attended_cache(ours, theirs, attention_mask: torch.Tensor,
                                lengths: list[int]) -> None:
    """Two KV caches of one greedy decoding agree wherever a follow-up attends: each row's
    prompt (``attention_mask``) and its first ``lengths[row]`` new tokens; a cache holding
    copies of the rows (an interchange's twins after them) in every copy."""
    width, batch = attention_mask.shape[1], len(lengths)
    for mine, reference in zip(ours.layers, theirs.layers, strict=True):
        assert mine.keys.shape == reference.keys.shape  # [copies * batch, kv, pos, d_head]
        for held in range(len(mine.keys) // batch):
            for row, length in enumerate(lengths):
                generated = torch.arange(mine.keys.shape[2] - width) < length
                attended = torch.cat([attention_mask[row].bool(), generated])
                place = held * batch + row
                for a, b in ((mine.keys, reference.keys), (mine.values, reference.values)):
                    torch.testing.assert_close(a[place][:, attended], b[place][:, attended])


@pytest.fixture(scope="session")
def same_attended_cache():
    """:func:`_assert_same_attended_cache`."""
    return _assert_same_attended_cache


@pytest.fixture(scope="session")
def ending_token():
    """:func:`_token_ending_rows_apart`: an EOS that makes greedy rows finish apart."""
    return _token_ending_rows_apart


def _load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (its functions, not its ``main``)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """:func:`_load_benchmark`, for the tests of the benchmark scripts."""
    return _load_benchmark
