"""Torch on one thread, as the torchrun workers of the distributed tests run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block, as the torchrun workers run (OMP_NUM_THREADS=1):
    another thread count sums a matmul in another order, which AdamW then amplifies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
