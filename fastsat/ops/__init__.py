"""Fused ops for the inner loop of adversarial training (METHODS.md §2 and §4).

Each op is layered kernel → launcher → torch.library op → the functional API here, with a
pure-PyTorch reference (:mod:`fastsat.ops.reference`) beside it. See
:mod:`fastsat.ops._backends` for how a backend is chosen.
"""

from fastsat.ops._backends import BACKENDS, available_backends
from fastsat.ops.functional import (
    NORMS,
    AlignmentStats,
    StepStats,
    alignment_stats,
    differentiable_alignment,
    pgd_step,
    random_start,
    sat_perturb,
)
from fastsat.ops.reference import accumulation_dtype

__all__ = [
    "BACKENDS",
    "NORMS",
    "AlignmentStats",
    "StepStats",
    "accumulation_dtype",
    "alignment_stats",
    "available_backends",
    "differentiable_alignment",
    "pgd_step",
    "random_start",
    "sat_perturb",
]
