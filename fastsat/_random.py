"""Seeds: deriving one from several numbers, and seeding the global generators.

Every stream fastsat draws (shuffling, augmentation, per-sample crops, each rank's and epoch's
global generators) is keyed by seeds made here, so a run is reproducible from its one ``seed``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from fastsat import _dist

__all__ = ["epoch_seed", "mix_seed", "seed_all", "seed_epoch"]


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several non-negative ints (a fixed polynomial hash: stable across
    processes and Python versions, unlike ``hash()``)."""
    out = 0
    for value in values:
        out = (out * 1_000_003 + int(value) + 1) % (1 << 63)
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a loader's shuffling and augmentation in ``epoch``."""
    return (seed * 1_000_003 + epoch) % (1 << 63)


def seed_all(value: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(value)
    np.random.seed(value % (1 << 32))  # numpy takes 32 bits
    torch.manual_seed(value)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed the global generators for ``epoch`` of this rank from ``(seed, epoch, rank)``."""
    seed_all(mix_seed(seed, epoch, _dist.rank()))
