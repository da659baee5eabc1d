"""torch.distributed, seen from the rest of fastsat: who am I, how many are we, and the few
collectives the trainer and the evaluation need. Every function works — as the identity, or on a
single process — when no process group is initialised, so single-process code calls them freely.

Sits below every other module (layer 0): data, evaluation and training all shard by rank.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_gather_objects", "all_reduce_sum", "barrier", "initialized", "is_main", "rank", "shard", "unwrap", "world_size"]


def initialized() -> bool:
    """True when a torch.distributed process group is running (e.g. under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (unchanged on one process)."""
    if initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not initialized():
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(n: int, part: int | None = None, parts: int | None = None) -> range:
    """The contiguous, near-equal share of ``range(n)`` that rank ``part`` of ``parts`` owns
    (default: this process's rank and the world size). Shares differ in length by at most one and
    together cover ``range(n)`` exactly once."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    if not 0 <= part < parts:
        raise ValueError(f"part: expected an integer in [0, {parts}), got {part!r}")
    return range(n * part // parts, n * (part + 1) // parts)


# Per compiled DDP wrapper, the module inside it compiled the same way (made once per run).
_COMPILED_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """What attacks run on: the module inside a ``DistributedDataParallel`` — compiled the way the
    wrapper was when ``model`` is ``torch.compile(DDP(module))``, so that attacks stay compiled —
    and ``model`` itself otherwise."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not isinstance(inner, DistributedDataParallel):
        return model
    if inner is model:
        return inner.module
    if model not in _COMPILED_MODULES:
        _COMPILED_MODULES[model] = model.dynamo_ctx(inner.module)  # torch.compile's settings, applied to the module
    return _COMPILED_MODULES[model]
