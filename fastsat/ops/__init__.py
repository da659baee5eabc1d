"""Fused ops for the inner loop of adversarial training (METHODS.md §2 and §4).

:mod:`~fastsat.ops.functional` holds the public ops (checks, layout, backend choice); a backend
implements :class:`~fastsat.ops._backends.Backend`: :mod:`~fastsat.ops.reference` (pure PyTorch,
the specification), :mod:`~fastsat.ops._cpp` (the C++/CUDA kernels of ``fastsat._C``) and
:mod:`~fastsat.ops._triton`. :data:`~fastsat.ops._backends.BACKEND_TABLE` says which one runs.

To add an op ``foo``:

1. ``reference.py``: ``foo`` in pure PyTorch, float64 included: the specification.
2. ``_backends.py``: its signature and contract as a method of ``Backend``; ``"foo"`` in ``OPS``
   and a row in ``AUTO_CUDA``.
3. ``csrc/``: the schema in ``bindings.cpp`` (``TORCH_LIBRARY_FRAGMENT``), a binding that checks
   arguments, the kernels in ``cpu/kernels.cpp`` and ``cuda/kernels.cu``, their ``m.impl`` lines;
   in ``_cpp.py`` its ``register_fake`` and ``foo`` (the op itself when its arguments match).
4. ``_triton.py``: kernel → launcher registered as ``fastsat::foo_triton`` → ``foo`` (float64 runs
   the reference).
5. ``functional.py``: the public ``foo`` (argument checks, ``_dense`` layout, then
   ``_backends.resolve(backend, device, "foo").foo(...)``); export it here.
6. Tests: a reference-vs-backend test in ``tests/test_ops.py`` (copy ``alignment_stats``'s), the
   opcheck tests in ``test_ops_cpp.py`` / ``test_ops_triton.py``; ``test_every_backend_implements
   _the_interface`` then checks the new method in every backend.

To add a backend: a module implementing ``Backend`` and one row in ``BACKEND_TABLE`` (how to
import it, where it runs, how to get it); list it in the ``AUTO_CUDA`` rows where ``auto`` should
try it on CUDA tensors.
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
