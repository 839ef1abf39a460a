"""Shared fixtures: seeding, the tiny random model and the real embedded SmolLM2."""

from __future__ import annotations

import random

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


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (cached HF folder; built on first use)."""
    return models.load_model(device="cpu")
