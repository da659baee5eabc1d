"""Distributed data parallel training on PyTorch's own engine (``torch.distributed`` + DDP), as
launched by ``torchrun``.

``torchrun --nproc_per_node N -m fastsat train ...`` (or a script calling :func:`fastsat.train.fit`)
starts N processes and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each;
:func:`setup` reads them (``init_process_group(init_method="env://")``): NCCL when the rank's
device is a GPU (``cuda:LOCAL_RANK``), gloo on CPUs. Multi-node runs use torchrun's own rendezvous
options (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``); nothing here depends on them.

What the trainer does with a process group of more than one rank:

- the batches go through :func:`wrap` (``DistributedDataParallel``): only the training backward
  all-reduces gradients; attacks run on the unwrapped module (:func:`unwrap`; compiled like the
  wrapper when it is compiled), so their forward passes neither touch the gradient reducer nor
  re-broadcast batch-norm buffers;
- ``batch_size`` is the global batch: each rank takes ``batch_size / world_size`` of it (its
  share of every epoch comes from :func:`fastsat.data.dataset_loader`, or a user DataLoader's
  ``DistributedSampler``); all ranks run :func:`agreed_steps` batches per epoch;
- :func:`seed_epoch` seeds python's, numpy's and torch's generators (augmentation, random starts,
  SAT noise) from (seed, epoch, rank) at every epoch, so streams differ across ranks, are
  reproducible from the seed, and a resume — at any world size — needs nothing rank-specific;
- rank 0 alone writes checkpoints and logs; the others wait at a barrier.

A rank that fails must not leave the others waiting: every collective and barrier gives up after
:func:`timeout` (``FASTSAT_DIST_TIMEOUT`` seconds, default 600), and :func:`teardown` on an error
leaves the group at once, without the barrier the other ranks would never reach (they then fail in
their next collective as its connection closes, or at the timeout; torchrun stops them too).

A script that calls :func:`fastsat.train.fit` under torchrun may call :func:`teardown` at its end
(``fastsat train`` does); the trainer joins the group but leaves it open for the caller's own
evaluation. A user DataLoader is used as it is: give it a ``DistributedSampler`` (the trainer calls
its ``set_epoch``) and its per-rank batch size.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastsat import _dist
from fastsat._dist import unwrap
from fastsat._random import seed_all, seed_epoch

__all__ = ["TIMEOUT_VARIABLE", "agreed_steps", "launched", "seed_all", "seed_epoch", "setup", "teardown", "timeout",
           "unwrap", "wrap"]

log = logging.getLogger("fastsat.train")

#: The environment variable that sets :func:`timeout` (seconds).
TIMEOUT_VARIABLE = "FASTSAT_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE) as
    one of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | str) -> torch.device:
    """Join the process group torchrun describes (if launched and not yet joined) and return the
    device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``.

    The backend is NCCL for CUDA devices and gloo otherwise. Without a launcher (one process) it
    returns ``device`` and starts nothing.
    """
    device = torch.device(device)
    if not launched() and not _dist.initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not _dist.initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timeout())
    return device


def timeout() -> datetime.timedelta:
    """How long a rank waits for the others — joining the group, in a collective, at a barrier —
    before it fails: ``FASTSAT_DIST_TIMEOUT`` seconds (default 600; long enough for rank 0 to write
    a checkpoint while the others wait, short enough that a lost rank does not hold the job for
    torch's default half hour)."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    if text is None:
        return datetime.timedelta(seconds=_DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE}: expected a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def teardown(failed: bool | None = None) -> None:
    """Leave the process group. After a success, behind a barrier (no rank exits while another
    still writes); after a failure — ``failed``, by default whether an exception is propagating
    (teardown called in a ``finally``) — at once: the other ranks may be waiting in a collective
    this rank will never join, and would wait for it at the barrier forever.

    Garbage is collected first: a ``DistributedDataParallel`` module still alive (a finished
    trainer in a reference cycle) when the group is destroyed makes a gloo process abort now and
    then as it exits ("terminate called without an active exception", seen with torch 2.13 on
    the CPU); with the module collected first it did not happen."""
    if not _dist.initialized():
        return
    if failed is None:
        failed = sys.exc_info()[1] is not None
    gc.collect()
    if not failed:
        _dist.barrier()
        dist.destroy_process_group()
        return
    try:
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 -- the error being raised is the one to report, not this one
        log.warning("leaving the process group after an error failed too (%s: %s)", type(err).__name__, err)


def wrap(model: nn.Module, device: torch.device, *, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` as the module the training batches go through: itself on one process, else a
    ``DistributedDataParallel`` around it (weights broadcast from rank 0 now, gradients averaged
    over ranks in every backward). ``sync_batchnorm`` first turns its BatchNorm layers into
    ``SyncBatchNorm`` (batch statistics over the global batch; PyTorch implements it for CUDA
    only). ``model`` keeps its parameters: it stays the module to save and to attack."""
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError(f"sync_batchnorm: torch's SyncBatchNorm runs on CUDA devices only, not {device.type}")
        if _dist.world_size() > 1:
            _convert_batchnorm(model)
    if _dist.world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _convert_batchnorm(model: nn.Module) -> None:
    """Replace every BatchNorm child of ``model`` in place by a SyncBatchNorm with its state."""
    for name, child in model.named_children():
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)


def agreed_steps(steps: int) -> int:
    """The batches per epoch all ranks run: the fewest any rank has (rank shares of an epoch can
    differ by a sample, and a DDP backward needs every rank)."""
    return min(_dist.all_gather_objects(int(steps)))


