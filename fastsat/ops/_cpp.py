"""The ``cpp`` and ``cuda`` backends: the kernels of the compiled extension ``fastsat._C``.

Importing this module loads ``fastsat._C`` (an ImportError marks both backends missing), which
registers ``torch.ops.fastsat.<op>`` with CPU (and, if built with CUDA, CUDA) kernels; the device
of the tensors picks the kernel. This module adds the fakes ``torch.compile`` traces with, and
implements :class:`fastsat.ops._backends.Backend` over the ops.

Seeds reach the kernels as a (1,) int64 tensor on the device of the data
(:func:`fastsat.ops.reference.seed_tensor`), read through a pointer: no host sync, graph-safe.
RNG: Philox4x32-10 keyed by the seed; call q of sample b on stream s (counter ``(q, b, s)``) draws
the sample's elements 4q..4q+3, so results depend neither on the thread count nor on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastsat import _C
from fastsat.ops.reference import accumulation_dtype, seed_tensor

__all__ = ["HAS_CUDA", "alignment_stats", "pgd_step", "random_start", "sat_perturb"]

HAS_CUDA: bool = _C.has_cuda()


@torch.library.register_fake("fastsat::pgd_step")
def _pgd_step_fake(x, grad, x_nat, out, step_size, eps, l2, lo, hi, with_stats):
    shape = (x.shape[0], 4) if with_stats else (0, 0)
    return x.new_empty(shape, dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("fastsat::random_start")
def _random_start_fake(x_nat, eps, l2, lo, hi, seed):
    return torch.empty_like(x_nat)


@torch.library.register_fake("fastsat::alignment_stats")
def _alignment_stats_fake(x, g):
    return x.new_empty((x.shape[0], 3), dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("fastsat::sat_perturb")
def _sat_perturb_fake(x, eps, p, seed, lo, hi, saliency, boxes, masks):
    return torch.empty_like(x)


# The ops whose arguments are the interface's as they are; the two random ops take the seed as a tensor.
pgd_step = torch.ops.fastsat.pgd_step
alignment_stats = torch.ops.fastsat.alignment_stats


def random_start(x_nat: Tensor, eps: float, l2: bool, lo: float, hi: float, seed: int | None) -> Tensor:
    return torch.ops.fastsat.random_start(x_nat, eps, l2, lo, hi, seed_tensor(seed, x_nat.device))


def sat_perturb(x: Tensor, eps: float, p: float, seed: int | None, lo: float, hi: float, saliency: Tensor | None,
                boxes: Tensor | None, masks: Tensor | None) -> Tensor:
    return torch.ops.fastsat.sat_perturb(x, eps, p, seed_tensor(seed, x.device), lo, hi, saliency, boxes, masks)
