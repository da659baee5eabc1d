"""The trainer: :class:`Trainer` runs one :class:`~fastsat.train.TrainConfig` over the user's model
and data — train an epoch, evaluate, keep the best, checkpoint atomically, log — and resumes
bit-exactly; :func:`fit` is the one-call API on top of it."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import sys
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastsat import _dist
from fastsat import evaluate as evaluation
from fastsat._checks import choice, describe, nearest, no_host_checks
from fastsat._io import atomic_write_text, locked_folder, sweep_stale_temporaries
from fastsat.attacks import FGSM, PGD
from fastsat.data import as_batch, as_batches, data_kind, resize
from fastsat.grad import frozen
from fastsat.train import checkpoint as ckpt
from fastsat.train import distributed
from fastsat.train.checkpoint import BEST_NAME, CHECKPOINT_NAME, capture_rng, load_checkpoint, load_weights, restore_rng
from fastsat.train.config import SCHEDULES, TrainConfig
from fastsat.train.recipes import NonFiniteLossError, Recipe, RecipeOutput, StepGuard

__all__ = ["BEST_NAME", "CHECKPOINT_NAME", "FitResult", "Trainer", "data_record", "fit", "lr_factor"]

log = logging.getLogger("fastsat.train")

# The guard's relative rule (Trainer.collapsed): PGD accuracy at a quarter of its best or below is a collapse.
COLLAPSE_SHARE = 0.25
_LOG_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "seconds", "images_per_s", "clean_acc", "robust_acc", "alignment", "cosine",
               "train_pgd_acc", "train_fgsm_acc")


@dataclass
class FitResult:
    """history: one dict per completed epoch (the rows of metrics.jsonl).
    checkpoint: path of the last checkpoint (None without ``out_dir``).
    stopped: why training ended before ``epochs`` (early stop), else None."""

    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped: str | None = None


def lr_factor(schedule: str, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total_steps``.

    piecewise: 1 until half the epochs, 0.1 until three quarters, then 0.01 (Madry/Rice).
    cosine: ½(1 + cos(π·step/total)). onecycle: linear 0 → 1 over the first 40% of the steps,
    then → 0 (Wong et al.'s cyclic schedule). constant: 1.
    """
    choice(schedule, "schedule", SCHEDULES)
    if schedule == "piecewise":
        epoch, epochs = step // steps_per_epoch, total_steps / steps_per_epoch
        return 1.0 if epoch < 0.5 * epochs else 0.1 if epoch < 0.75 * epochs else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "onecycle":
        return float(np.interp(step + 1, [0, 0.4 * total_steps, total_steps], [0.0, 1.0, 0.0]))
    return 1.0


def _generators(data: object) -> dict[str, torch.Generator]:
    """Shuffling generators of a torch DataLoader (its own, or its sampler's)."""
    found = {}
    for name, owner in (("loader", data), ("sampler", getattr(data, "sampler", None))):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            found[name] = gen
    return found


def _make_optimizer(config: TrainConfig, params, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels: one pass over all parameters, and they take the StepGuard's found-inf flag on
    # the device, so skipping a step with a NaN loss costs no host sync.
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)


def device_defaults(config: TrainConfig, device: torch.device) -> dict:
    """The run's ``precision``, ``channels_last`` and ``compile`` on ``device``: as set, or for
    "auto"/None what a careful user picks — on CUDA bf16 autocast, channels_last and compile;
    elsewhere fp32, contiguous and eager."""
    cuda = device.type == "cuda"
    return {"precision": ("bf16" if cuda else "fp32") if config.precision == "auto" else config.precision,
            "channels_last": cuda if config.channels_last is None else config.channels_last,
            "compile": cuda if config.compile is None else config.compile}


def _compile(module: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` of the module that runs the attack and the update; on CUDA in
    "reduce-overhead" mode: each compiled graph is captured and replayed as a CUDA graph."""
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else None)


class _EMA:
    """Exponential moving average of a model's weights: ``module`` (a copy of the model, made when
    training starts) moves ``1 - decay`` of the way to the model after every step; so do its
    floating-point buffers (batch-norm statistics), the others are copied. One foreach kernel per
    update and no host sync (torch's AveragedModel reads its step counter on the host)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module, self.decay = copy.deepcopy(model).requires_grad_(False), decay
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()]))
        self.floats = ([a for a, b in pairs if a.is_floating_point()], [b for a, b in pairs if a.is_floating_point()])
        self.others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self.floats[0]:
            torch._foreach_lerp_(self.floats[0], self.floats[1], 1 - self.decay)
        for average, current in self.others:
            average.copy_(current)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, source: object) -> None:
        load_weights(self.module, state, source)


def _tensorboard(out_dir: Path | None):
    if out_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _check_batch_keys(data: object, recipe: Recipe) -> None:
    """The recipe's batch entries are in the first sample of a map-style dataset of dicts (a user's
    iterable of batches is not peeked at: that could consume its shuffling randomness)."""
    if data_kind(data) != "dataset" or not len(data):
        return
    sample = data[0]
    have = set(sample) if isinstance(sample, Mapping) else {"image", "label"}
    missing = [key for key in recipe.batch_keys if key not in have]
    if missing:
        raise ValueError(f"train_data: recipe {recipe.name!r} reads the batch entries {list(recipe.batch_keys)}; "
                         f"the data's samples have no {missing}")


def data_record(data: object, settings: Mapping | None = None) -> dict:
    """What a checkpoint records about the training data, and a resume compares: ``settings`` (the
    caller's, e.g. the command line's dataset, image_size, n_train, data_seed), plus what the
    trainer sees itself, under ``train_data.*`` names: its type, ``len()`` (samples of a data set,
    batches of a loader), ``image_size`` where it has one, and for a map-style data set the first
    sample's image shape and a SHA-256 of samples 0, n/2 and n-1 (another seed or source gives other
    samples). Nothing else is read: iterating could consume a loader's randomness."""
    record = {**(settings or {}), "train_data.type": type(data).__name__}
    if hasattr(data, "__len__"):
        record["train_data.len"] = len(data)
    if getattr(data, "image_size", None) is not None:
        record["train_data.image_size"] = list(data.image_size)
    if data_kind(data) != "dataset" or not len(data):
        return record
    digest = hashlib.sha256()
    for index in sorted({0, len(data) // 2, len(data) - 1}):
        sample = data[index]  # a dict, or a tuple (x, y, ...)
        for key, value in sorted(sample.items()) if isinstance(sample, Mapping) else enumerate(sample):
            value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(
                value, torch.Tensor) else repr(value).encode()
            digest.update(str(key).encode() + bytes(value))
        if index == 0:
            image = sample.get("image") if isinstance(sample, Mapping) else sample[0]
            if isinstance(image, torch.Tensor):
                record["train_data.sample_shape"] = list(image.shape)
    record["train_data.sample_digest"] = digest.hexdigest()
    return record


class Trainer:
    """One training run of ``model`` on ``train_data`` as set by ``config``, as small named steps.

    The constructor is the ``_setup_*`` steps in order; :meth:`fit` is :meth:`restore`, then per
    epoch :meth:`train_epoch` (:meth:`train_step` per batch), :meth:`evaluate`,
    :meth:`check_overfitting`, :meth:`keep_best`, :meth:`checkpoint` and :meth:`log`, and
    :meth:`restore_best` after an early stop. Override a step to change one thing.

    ``model`` is the module whose weights are trained and saved; the batches go through
    ``train_model`` (the same module, DDP-wrapped under torchrun, compiled with ``compile``).
    :attr:`evaluated` is what is evaluated and kept as best (the EMA's average with ``ema``). A
    training step does not sync with the host: every batch is checked on the device, a bad batch
    or a NaN/inf loss skips its update, and the epoch's tally is read once at its end, where it
    stops the run (ValueError, :class:`NonFiniteLossError`) before the epoch is checkpointed.

    Args:
        model: a classifier on pixel-space (B, C, H, W) input in ``config.clip`` returning (B, K)
            logits; trained in place on the device its parameters are on.
        train_data: a map-style dataset of sample dicts (e.g. ``fastsat.data.shapes(...)``),
            batched, shuffled and augmented by :func:`fastsat.data.as_batches`; or your own
            iterable of batches with ``len()`` (a DataLoader of (x, y) or dicts), used as it is.
        config: the run's options (default ``TrainConfig()``).
        eval_data: data (as ``train_data``) for the per-epoch metrics (:meth:`evaluate`); None: none.
        recipe: a :class:`Recipe` object (e.g. a subclass) to use instead of ``config.build_recipe()``;
            it must be the recipe the configuration describes (:meth:`TrainConfig.check_recipe`).
        optimizer: an optimizer over the model's parameters to use instead of ``config.optimizer``
            (then ``lr``, ``momentum`` and ``weight_decay`` are its own).
        data_settings: the settings that made ``train_data`` (e.g. ``fastsat train``'s dataset
            options), recorded with :func:`data_record` in checkpoints; a resume on other data is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: object,
        config: TrainConfig | None = None,
        *,
        eval_data: object = None,
        recipe: Recipe | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_settings: Mapping | None = None,
    ) -> None:
        self._setup_config(config, recipe)
        self._setup_device(model)
        self._setup_data(train_data, eval_data, data_settings)
        self._setup_backends()
        self._setup_optimizer(optimizer)
        self._setup_modules()
        self._setup_record(optimizer)
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "robust_acc"} of the best evaluated epoch
        self.best_state: dict | None = None
        self.epoch = 0  # completed epochs
        self.num_classes: int | None = None  # the model's logit count, read at the first batch
        self.board = None

    def _setup_config(self, config: TrainConfig | None, recipe: Recipe | None) -> None:
        """``config`` (checked) and the recipe it describes."""
        self.config = TrainConfig() if config is None else config
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {describe(self.config)}")
        self.recipe = self.config.build_recipe() if recipe is None else self.config.check_recipe(recipe)
        self.out_dir = Path(self.config.out_dir) if self.config.out_dir is not None else None
        if self.config.resume is True and self.out_dir is None:
            raise ValueError("resume: needs out_dir (or a checkpoint path)")
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def _setup_device(self, model: nn.Module) -> None:
        """The rank's device, with ``model`` on it. Under torchrun this joins the process group and
        each rank trains on its own device (cuda:LOCAL_RANK)."""
        param = next(model.parameters(), None)
        if param is None:
            raise ValueError("model: has no parameters to train")
        self.device = distributed.setup(param.device)
        if self.device != param.device:
            model.to(self.device)
        self.model, self.world_size = model, _dist.world_size()
        if self.config.batch_size % self.world_size:
            raise ValueError(f"batch_size: the global batch ({self.config.batch_size}) must split evenly over the "
                             f"{self.world_size} ranks")

    def _setup_data(self, train_data: object, eval_data: object, data_settings: Mapping | None) -> None:
        """The training and evaluation loaders, the record of the data, and the guard's data."""
        config = self.config
        _check_batch_keys(train_data, self.recipe)
        # batch_size is the global batch; fastsat's loaders deal each rank its share of every epoch.
        self.loader = as_batches(train_data, batch_size=config.batch_size // self.world_size, shuffle=True,
                                 seed=config.seed, device=self.device, augment=config.augment,
                                 num_workers=config.num_workers)
        # Every rank iterates over the whole evaluation data; evaluate() attacks this rank's part of each batch.
        self.eval_loader = None if eval_data is None else as_batches(
            eval_data, batch_size=config.eval_batch_size, shuffle=False, seed=config.seed, device=self.device,
            rank=0, world_size=1)
        if data_settings is not None and not isinstance(data_settings, Mapping):
            raise TypeError(f"data_settings: expected a mapping of setting: value, got {describe(data_settings)}")
        self.data = data_record(train_data, data_settings)
        self.steps_per_epoch = distributed.agreed_steps(len(self.loader))
        if self.steps_per_epoch < 1:
            raise ValueError("train_data: yields no batches")
        self.generators = _generators(self.loader)
        # The catastrophic-overfitting guard's fixed training minibatch: where it comes from, and (once drawn) it.
        self.guard_data = _guard_source(train_data, config, self.device) if self.guards else None
        self.guard_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _setup_backends(self) -> None:
        """``precision``, ``channels_last`` and ``compile`` as resolved for the device
        (:func:`device_defaults`), and on CUDA torch's process-wide kernel choices."""
        resolved = device_defaults(self.config, self.device)
        self.precision, self.channels_last, self.compile = (resolved[k] for k in ("precision", "channels_last", "compile"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
            if self.config.precision == "auto":  # "auto" asks for speed: TF32 matmuls are part of it
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _setup_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer (``optimizer`` or the config's), the per-step LR schedule and the StepGuard."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {describe(optimizer)}")
        config, steps = self.config, self.steps_per_epoch
        self.optimizer = optimizer if optimizer is not None else _make_optimizer(config, self.model.parameters(),
                                                                                 self.device)
        total = config.epochs * steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config.schedule, step, total, steps))
        self.scaler = StepGuard(self.device, self.precision)

    def _setup_modules(self) -> None:
        """The EMA (``ema``) and ``train_model``: the model wrapped for DDP, then compiled (``compile``)."""
        self.ema = _EMA(self.model, self.config.ema) if self.config.ema is not None else None
        self.eager_model = distributed.wrap(self.model, self.device, sync_batchnorm=self.config.sync_batchnorm)
        self.train_model = _compile(self.eager_model, self.device) if self.compile else self.eager_model

    def _setup_record(self, optimizer: torch.optim.Optimizer | None) -> None:
        """``run_config``: what a checkpoint records and a resume compares (the options that change the results)."""
        self.run_config = {**self.config.recorded(), "precision": self.precision, "channels_last": self.channels_last,
                           "compile": self.compile, "steps_per_epoch": self.steps_per_epoch}
        if optimizer is not None:
            self.run_config["optimizer"] = type(optimizer).__name__

    # --- the run ---------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Run the remaining epochs. Returns :class:`FitResult`; the trained weights are in
        ``model`` (the best epoch's after an early stop).

        Raises:
            NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays on disk.
            ValueError: ``out_dir`` is not writable, or another run holds it (see :meth:`claim_out_dir`).
        """
        with contextlib.ExitStack() as run:
            self.claim_out_dir(run)
            return self._fit()

    def claim_out_dir(self, run: contextlib.ExitStack) -> None:
        """When this process writes (:attr:`writes`): lock ``out_dir`` for the life of ``run``
        (:func:`fastsat._io.locked_folder`: another run in it is refused, naming its pid; a
        killed run's lock is gone with it), which also checks that it is writable before training
        starts, and remove the temporary files a killed run left there."""
        if self.writes:
            run.enter_context(locked_folder(self.out_dir, "out_dir"))
            sweep_stale_temporaries(self.out_dir)

    def _fit(self) -> FitResult:
        self.restore()
        result = FitResult(history=self.history, checkpoint=self.checkpoint_path if self.epoch else None)
        self.board = _tensorboard(self.out_dir) if self.writes else None
        try:
            for epoch in range(self.epoch, self.config.epochs):
                record = self.train_epoch(epoch)
                record.update(self.evaluate())
                record.update(self.check_overfitting())
                self.history.append(record)
                stop = self.keep_best(record)
                self.epoch = epoch + 1
                result.checkpoint = self.checkpoint() or result.checkpoint
                self.log(record)
                if stop is not None:
                    self.restore_best()
                    log.warning("%s: %s", self.recipe.name, stop)
                    result.stopped = stop
                    break
        finally:
            if self.board is not None:
                self.board.close()
        return result

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files: there is an ``out_dir``, and it is rank 0."""
        return self.out_dir is not None and _dist.is_main()

    @property
    def evaluated(self) -> nn.Module:
        """The module evaluated every epoch, kept in best.pt and restored on an early stop: the
        EMA's average with ``ema``, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def restore(self) -> bool:
        """Continue from the checkpoint if ``resume`` asks for one and it exists (True), else seed
        every generator from ``seed`` for a fresh run (False)."""
        config = self.config
        path = Path(config.resume) if isinstance(config.resume, str) else self.checkpoint_path if config.resume else None
        if path is not None and path.exists():
            self.load_state_dict(load_checkpoint(path), path)
            log.info("resumed from %s after epoch %d", path, self.epoch)
            return True
        if path is not None and isinstance(config.resume, str):
            raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
        distributed.seed_all(config.seed)
        for gen in self.generators.values():
            gen.manual_seed(config.seed)
        return False

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data (0-based ``epoch``). Returns the epoch's record:
        epoch (1-based), lr (at its start), train_loss, train_acc, seconds, images_per_s."""
        # fastsat's loaders and a DataLoader's DistributedSampler order (and augment) each epoch from it.
        for owner in (self.loader, getattr(self.loader, "sampler", None)):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        if self.world_size > 1:
            distributed.seed_epoch(self.config.seed, epoch)
        size = self.config.image_size(epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        lr = self.optimizer.param_groups[0]["lr"]
        show = sys.stderr.isatty() if self.config.progress is None else self.config.progress
        bar = tqdm(itertools.islice(self.loader, self.steps_per_epoch), total=self.steps_per_epoch,
                   desc=f"{self.recipe.name} epoch {epoch + 1}/{self.config.epochs}", disable=not show or not _dist.is_main(),
                   leave=False, file=sys.stderr)
        skipped = self.scaler.skipped.zero_()
        first_skipped = torch.full((), -1, dtype=torch.int64, device=self.device)
        faults = torch.zeros(2, dtype=torch.int64, device=self.device)  # batches with bad pixels, bad labels
        first_fault = torch.full((), -1, dtype=torch.int64, device=self.device)
        started = time.perf_counter()
        with contextlib.ExitStack() as unchecked:
            for index, item in enumerate(bar):
                if index == 1:  # the first batch was checked on the host; the others run without a sync
                    unchecked.enter_context(no_host_checks())
                batch = as_batch(item, self.device)
                fault = self.audit_batch(batch, epoch, checked=index == 0)
                faults += fault
                first_fault = torch.where((first_fault < 0) & fault.any(), index, first_fault)
                if size is not None:
                    batch = resize(batch, (size, size), self.config.clip)
                out = self.train_step(batch, epoch)
                count = batch["label"].shape[0]
                loss_sum += out.loss.detach().float() * count
                correct += (out.logits.argmax(1) == batch["label"]).sum()
                first_skipped = torch.where((first_skipped < 0) & (skipped > 0), index, first_skipped)
                seen += count
        seconds = time.perf_counter() - started
        self.scaler.refused.zero_()
        # Summed over ranks on the device, read once (float64 holds float32 sums and counts exactly).
        totals = torch.stack([loss_sum.double(), correct.double(), skipped.double(),
                              torch.tensor(float(seen), device=self.device, dtype=torch.float64), *faults.double()])
        loss_total, correct_total, skipped_total, seen, bad_pixels, bad_labels = _dist.all_reduce_sum(totals).tolist()
        kept = (f"the last good checkpoint {self.checkpoint_path} (after epoch {self.history[-1]['epoch']}) is intact"
                if self.writes and self.history else "no checkpoint was written yet")
        if bad_pixels or bad_labels:
            what = [f"{int(n)} with {text}" for n, text in ((bad_pixels, self._pixel_fault()),
                                                             (bad_labels, self._label_fault())) if n]
            rank = f" on rank {_dist.rank()}" if self.world_size > 1 else ""
            where = f" (the first: batch {int(first_fault)}{rank})" if first_fault >= 0 else ""
            raise ValueError(f"train_data: invalid batches in epoch {epoch + 1}{where}: {'; '.join(what)}; their "
                             f"updates were skipped; training stopped, {kept}")
        if skipped_total:
            where = f", batch {int(first_skipped)}" if first_skipped >= 0 else ""  # this rank's first
            raise NonFiniteLossError(
                f"recipe {self.recipe.name!r}: the training loss was not finite in epoch {epoch + 1}{where} "
                f"({int(skipped_total)} steps in all; their updates were skipped); training stopped, {kept}")
        return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_total / seen, "train_acc": correct_total / seen,
                "seconds": seconds, "images_per_s": seen / seconds}

    def audit_batch(self, batch: dict, epoch: int, *, checked: bool) -> torch.Tensor:
        """Check every batch on the device: images inside the run's input box ``clip`` (finite) and
        labels in [0, K) for the model's K logits. Returns int64 (2,) flags — bad pixels, bad labels —
        for the epoch's tally (read once at its end); a bad batch's update is skipped
        (:attr:`StepGuard.refused`) and its labels are clamped so that the step cannot fail inside
        torch. With ``checked`` (the epoch's first batch) the flags are read now and a bad batch
        raises at once.

        Raises:
            ValueError: ``checked`` and the batch is invalid (naming what and where).
        """
        images, labels = batch["image"], batch["label"]
        if not images.numel():
            self.scaler.refused.zero_()
            return torch.zeros(2, dtype=torch.int64, device=self.device)
        if self.num_classes is None:
            self.num_classes = self._count_classes(images)
        lo, hi = self.config.clip
        low, high = torch.aminmax(images.detach())
        least, most = torch.aminmax(labels)
        # NaN fails both comparisons.
        fault = torch.stack([~((low >= lo) & (high <= hi)), ~((least >= 0) & (most < self.num_classes))]).long()
        batch["label"] = labels.clamp(0, self.num_classes - 1)
        if checked and bool(fault.any()):
            found = []
            if fault[0]:
                found.append(f"{self._pixel_fault()}: values from {float(low):g} to {float(high):g}")
            if fault[1]:
                found.append(f"{self._label_fault()}: labels from {int(least)} to {int(most)}")
            raise ValueError(f"train_data: batch 0 of epoch {epoch + 1} is invalid: {'; '.join(found)}")
        self.scaler.refused.copy_(fault.any())
        return fault

    def _pixel_fault(self) -> str:
        lo, hi = self.config.clip
        return (f"images outside the input box clip=({lo:g}, {hi:g}) or not finite (expected pixel values in "
                f"[{lo:g}, {hi:g}]: e.g. images in [0, 1], not [0, 255])")

    def _label_fault(self) -> str:
        return (f"labels outside [0, {self.num_classes}) (expected class indices below num_classes = "
                f"{self.num_classes}, the model's logit count)")

    def _count_classes(self, images: torch.Tensor) -> int:
        """K, the model's logit count, from one image through it (in eval mode, without gradients;
        its mode is restored)."""
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits = self.model(images[:1])
        finally:
            self.model.train(training)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
            raise TypeError(f"model: expected (B, K) logits for a (B, C, H, W) batch, got {describe(logits)} for "
                            f"{describe(images[:1])}")
        return logits.shape[1]

    def train_step(self, batch: dict, epoch: int) -> RecipeOutput:
        """One batch: the recipe's optimisation step through ``train_model``, the LR schedule's
        step and the EMA update."""
        if self.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        if self.train_model is self.eager_model:
            out = self._recipe_step(self.eager_model, batch, epoch)
        else:
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
            try:
                out = self._recipe_step(self.train_model, batch, epoch)
            except torch._dynamo.exc.TorchDynamoException as err:
                # Only the compiler's own errors (tracing, a backend that failed to compile) fall back;
                # anything else (out of memory, a data bug) is the step's error and propagates.
                out = self._recipe_step(self.eager_model, batch, epoch)
                self.train_model = self.eager_model
                said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
                log.warning("torch.compile failed on this model (%s: %.300s); training continues without compiling",
                            type(err).__name__, said)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return out

    def _recipe_step(self, model: nn.Module, batch: dict, epoch: int) -> RecipeOutput:
        return self.recipe.train_step(model, batch, self.optimizer, epoch=epoch, precision=self.precision,
                                      scaler=self.scaler)

    def evaluate(self) -> dict:
        """Metrics of :attr:`evaluated` on ``eval_data`` ({} without it): clean_acc, robust_acc
        (PGD-``eval_steps`` at ``eval_eps``) and the mean alignment and cosine of the predicted
        logit's gradient at the clean inputs (see :func:`fastsat.evaluate.evaluate`)."""
        if self.eval_loader is None:
            return {}
        metrics = evaluation.evaluate(self.evaluated, self.eval_loader, eps=[self.config.eval_eps],
                                      steps=self.config.eval_steps, clip=self.config.clip)
        return {"clean_acc": metrics["clean_acc"], "robust_acc": metrics["attacks"]["pgd"][0]["acc"],
                "alignment": metrics["alignment"], "cosine": metrics["cosine"]}

    @property
    def guards(self) -> bool:
        """Whether the catastrophic-overfitting guard runs: a recipe with ``early_stop`` and an ``early_stop_drop``."""
        return self.recipe.early_stop and self.config.early_stop_drop is not None

    def check_overfitting(self) -> dict:
        """The catastrophic-overfitting guard of single-step recipes (``early_stop``), as Wong et al.
        checked: accuracy of :attr:`evaluated` on one fixed training minibatch (the first
        ``batch_size`` samples in the data's order) under PGD (``eval_steps`` steps of eval_eps/4
        at ``eval_eps``, random start) and under FGSM (one step of eval_eps from x), as
        ``train_pgd_acc`` and ``train_fgsm_acc`` (0-1; a sample counts when it is right both clean
        and attacked). {} when the guard is off (:attr:`guards`). Each rank attacks its share of
        the batch and the counts are summed, so every rank decides alike."""
        if not self.guards:
            return {}
        if self.guard_batch is None:
            state = capture_rng(self.generators)  # drawing a user loader's first batch must not move its shuffling
            try:
                batch = as_batch(next(iter(self.guard_data)), self.device)
            finally:
                restore_rng(state, self.generators)
            self.guard_batch = batch["image"], batch["label"]
        share = _dist.shard(len(self.guard_batch[1]))
        x, y = (t[share.start : share.stop] for t in self.guard_batch)
        model, eps, clip = self.evaluated, self.config.eval_eps, self.config.clip
        attacks = (PGD(model, eps=eps, step_size=eps / 4, steps=self.config.eval_steps, clip=clip), FGSM(model, eps=eps, clip=clip))
        inputs = [x, *(attack.perturb(x, y) for attack in attacks)]
        with frozen(model, "eval"), torch.no_grad():
            right = [model(z).argmax(1) == y for z in inputs]
        counts = torch.stack([(right[0] & r).sum() for r in right[1:]] + [torch.tensor(len(y), device=y.device)])
        pgd, fgsm, n = _dist.all_reduce_sum(counts.double()).tolist()
        return {"train_pgd_acc": pgd / n, "train_fgsm_acc": fgsm / n}

    def keep_best(self, record: dict) -> str | None:
        """Track the epoch of best robust accuracy (its weights in memory and in best.pt): on
        eval_data (``robust_acc``), else, with the guard on, on its training minibatch
        (``train_pgd_acc``). Returns why to stop (catastrophic overfitting of a recipe with
        ``early_stop``, see :meth:`overfitting`), else None."""
        score = record.get("robust_acc", record.get("train_pgd_acc"))
        if score is None:
            return None
        if self.best is None or score > self.best["robust_acc"]:
            self.best = {"epoch": record["epoch"], "robust_acc": score}
            self.best_state = {k: v.detach().clone() for k, v in self.evaluated.state_dict().items()}
            if self.writes:
                ckpt.save_best(self.out_dir, self.best["epoch"], self.best_state)
            return None
        return self.overfitting(record) if self.guards else None

    def overfitting(self, record: dict) -> str | None:
        """Why the epoch ``record`` shows catastrophic overfitting, else None: PGD accuracy on
        eval_data fell from the best epoch's (:meth:`collapsed`); or on the guard's training
        minibatch PGD accuracy fell from its peak while the single-step (FGSM) accuracy rose above
        its value at that peak — the collapse's signature."""
        best = self.best
        restored = f"restored epoch {best['epoch']}'s weights"
        if "robust_acc" in record and self.collapsed(record["robust_acc"], best["robust_acc"]):
            return (f"catastrophic overfitting: PGD accuracy fell from {best['robust_acc']:.3f} (epoch {best['epoch']}) "
                    f"to {record['robust_acc']:.3f} (epoch {record['epoch']}); {restored}")
        # Rows of epochs run before the guard existed (a resumed older run) have no guard numbers.
        guarded = (row for row in self.history[:-1] if "train_pgd_acc" in row)
        peak = max(guarded, key=lambda row: row["train_pgd_acc"], default=None)
        if peak is not None and self.collapsed(record["train_pgd_acc"], peak["train_pgd_acc"]) \
                and record["train_fgsm_acc"] > peak["train_fgsm_acc"]:
            return (f"catastrophic overfitting: on the guard's training minibatch PGD accuracy fell from "
                    f"{peak['train_pgd_acc']:.3f} (epoch {peak['epoch']}) to {record['train_pgd_acc']:.3f} (epoch "
                    f"{record['epoch']}) while FGSM accuracy rose from {peak['train_fgsm_acc']:.3f} to "
                    f"{record['train_fgsm_acc']:.3f}; {restored}")
        return None

    def collapsed(self, accuracy: float, best: float) -> bool:
        """Whether PGD accuracy ``accuracy`` (0-1) is a collapse from ``best``: more than
        ``early_stop_drop`` below it, or at most :data:`COLLAPSE_SHARE` of it where ``best`` is at
        least ``early_stop_drop``·COLLAPSE_SHARE — a collapse from a low peak (a large radius, a
        hard data set), which an absolute drop cannot see, while a best below that floor is noise."""
        drop = self.config.early_stop_drop
        return accuracy < best - drop or (best >= drop * COLLAPSE_SHARE and accuracy <= best * COLLAPSE_SHARE)

    def restore_best(self) -> None:
        """Load the best epoch's weights into ``model`` (from memory, or best.pt after a resume)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        else:
            ckpt.load_trained_weights(self.model, self.out_dir / BEST_NAME)

    def checkpoint(self) -> Path | None:
        """Write checkpoint.pt atomically (when :attr:`writes`); the other ranks wait at a barrier
        until it is complete. Returns its path (None without ``out_dir``)."""
        if self.out_dir is None:
            return None
        if self.writes:
            ckpt.save_checkpoint(self.state_dict(), self.out_dir)
        _dist.barrier()
        return self.checkpoint_path

    def log(self, record: dict) -> None:
        """Report the epoch: the logger, and (when :attr:`writes`) metrics.jsonl and metrics.csv,
        rewritten from the whole history (so after a resume they hold exactly the completed
        epochs), and TensorBoard if installed."""
        if not _dist.is_main():
            return
        log.info("%s epoch %d/%d: %s", self.recipe.name, record["epoch"], self.config.epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and v is not None))
        if not self.writes:
            return
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.out_dir / "metrics.csv", buffer.getvalue())
        if self.board is not None:
            for key, value in record.items():
                if key != "epoch" and value is not None:
                    self.board.add_scalar(key, value, record["epoch"])

    # --- checkpoint contents -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs (the checkpoint's contents). ``world_size`` is the
        number of ranks that wrote it: any other number may resume (each epoch's data order and
        random streams follow from (seed, epoch, rank), see :mod:`fastsat.train.distributed`)."""
        return {
            ckpt.FORMAT_KEY: ckpt.CHECKPOINT_FORMAT, ckpt.CONFIG_KEY: self.run_config, ckpt.DATA_KEY: self.data,
            ckpt.EPOCH_KEY: self.epoch, ckpt.WORLD_SIZE_KEY: self.world_size,
            ckpt.MODEL_KEY: self.model.state_dict(),
            ckpt.OPTIMIZER_KEY: self.optimizer.state_dict(), ckpt.SCHEDULER_KEY: self.scheduler.state_dict(),
            ckpt.SCALER_KEY: self.scaler.state_dict(),
            ckpt.EMA_KEY: self.ema.state_dict() if self.ema is not None else None,
            ckpt.RECIPE_KEY: self.recipe.state_dict(), ckpt.RNG_KEY: capture_rng(self.generators),
            ckpt.HISTORY_KEY: self.history, ckpt.BEST_KEY: self.best,
        }

    def load_state_dict(self, state: dict, source: object = "checkpoint") -> None:
        """Inverse of :meth:`state_dict`. Refuses a checkpoint written with other settings or on
        other data (the ones it recorded: a checkpoint of an older format recorded fewer), or for
        another model (:func:`~fastsat.train.checkpoint.load_weights`)."""
        missing = [key for key in (ckpt.CONFIG_KEY, ckpt.OPTIMIZER_KEY, ckpt.SCHEDULER_KEY, ckpt.RNG_KEY)
                   if key not in state]
        if missing:
            kind = "best.pt (the best epoch's weights alone)" if ckpt.is_best_file(state) else f"a file without {missing}"
            raise ValueError(f"resume: {source} is {kind}; expected a checkpoint.pt written by the trainer (it "
                             "holds the optimizer, schedule and random state a resume needs)")
        saved = _with_new_option_defaults(state[ckpt.CONFIG_KEY], self.recipe)
        differing = [k for k in self.run_config if k in saved and saved[k] != self.run_config[k]]
        if differing:
            raise ValueError(f"resume: {source} was written with different settings {differing}: "
                             f"{ {k: saved[k] for k in differing} } vs now { {k: self.run_config[k] for k in differing} }")
        data = state.get(ckpt.DATA_KEY, {})  # checkpoints written before fastsat recorded the data have none
        differing = [k for k in sorted(set(data) & set(self.data)) if data[k] != self.data[k]]
        if differing:
            said = "; ".join(f"{k}: {data[k]!r} then, {self.data.get(k)!r} now" for k in differing)
            raise ValueError(f"resume: {source} was written for other training data ({said}); resume with the data "
                             "settings it was written with, or start a new run")
        load_weights(self.model, state[ckpt.MODEL_KEY], source)
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER_KEY])
        self.scheduler.load_state_dict(state[ckpt.SCHEDULER_KEY])
        if state[ckpt.SCALER_KEY] is not None:  # None: written before every run had a StepGuard
            self.scaler.load_state_dict(state[ckpt.SCALER_KEY])
        if self.ema is not None:
            self.ema.load_state_dict(state[ckpt.EMA_KEY], source)
        self.recipe.load_state_dict(state[ckpt.RECIPE_KEY])
        restore_rng(state[ckpt.RNG_KEY], self.generators)
        self.history, self.best, self.epoch = state[ckpt.HISTORY_KEY], state[ckpt.BEST_KEY], state[ckpt.EPOCH_KEY]


def _guard_source(train_data: object, config: TrainConfig, device: torch.device) -> object:
    """Where the guard's fixed minibatch comes from: the first ``batch_size`` samples of a map-style
    data set (a subset: no second device-resident copy of the data), else the data's own first batch."""
    if data_kind(train_data) == "dataset":
        train_data = torch.utils.data.Subset(train_data, range(min(config.batch_size, len(train_data))))
    return as_batches(train_data, batch_size=config.batch_size, shuffle=False, seed=config.seed, device=device,
                      rank=0, world_size=1)


def _with_new_option_defaults(saved: dict, recipe: Recipe) -> dict:
    """A checkpoint's recorded settings, its recipe's options completed with the defaults of options
    added since it was written (what that run ran with: e.g. ``awp_gamma`` 0 for pgd and trades)."""
    options = saved.get("recipe_options")
    if saved.get("recipe") != recipe.name or not isinstance(options, dict):
        return saved
    defaults = {f.name: f.default for f in dataclasses.fields(recipe)
                if f.init and f.default is not dataclasses.MISSING and f.name not in recipe.from_run}
    return {**saved, "recipe_options": {**defaults, **options}}


def fit(model: nn.Module, train_data: object, config: TrainConfig | None = None, *, eval_data: object = None,
        data_settings: Mapping | None = None, **options) -> FitResult:
    """Train ``model`` in place with a recipe; evaluate, log and checkpoint every epoch.

    The one-call API over :class:`Trainer`: ``options`` are the fields of :class:`TrainConfig`
    (recipe, recipe_options, epochs, batch_size, augment, optimizer, lr, ..., out_dir, resume,
    progress — every one with its default and units there), applied on top of ``config`` if given.
    Two of them also take objects: ``recipe`` a :class:`Recipe` (then no ``recipe_options``) and
    ``optimizer`` a ``torch.optim.Optimizer`` over the model's parameters.

    Args:
        model, train_data, eval_data, data_settings: see :class:`Trainer`.

    Example::

        fit(model, fastsat.data.shapes(10_000), recipe="pgd", recipe_options={"steps": 7}, epochs=30,
            eval_data=test, out_dir="runs/pgd", resume=True)

    Returns:
        :class:`FitResult`. The trained weights are in ``model`` (the best epoch's after an early stop).

    Raises:
        TypeError: an unknown option (naming the nearest one).
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays on disk.
    """
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in options:
        if key not in names:
            raise TypeError(f"fit: unknown option {key!r}{nearest(key, names)}; the options are TrainConfig's fields")
    recipe, optimizer = options.get("recipe"), options.get("optimizer")
    if isinstance(recipe, Recipe):
        if options.get("recipe_options"):
            raise ValueError(f"recipe_options: {sorted(options['recipe_options'])} given with a Recipe object; "
                             "set them on the object")
        # The object's from_run options (clip) are the run's unless given; the Trainer checks they agree.
        run = {name: getattr(recipe, name) for name in recipe.from_run}
        own = {k: v for k, v in recipe.options().items() if k not in run}
        options = {**run, **options, "recipe": recipe.name, "recipe_options": own}
    else:
        recipe = None
    if isinstance(optimizer, torch.optim.Optimizer):
        options = {k: v for k, v in options.items() if k != "optimizer"}
    else:
        optimizer = None
    config = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    return Trainer(model, train_data, config, eval_data=eval_data, recipe=recipe, optimizer=optimizer,
                   data_settings=data_settings).fit()


def _signature() -> inspect.Signature:
    """fit's signature with every TrainConfig field as a keyword (for help(), IDEs and the tests)."""
    hints = typing.get_type_hints(TrainConfig)
    head = list(inspect.signature(fit).parameters.values())[:-1]  # model, train_data, config, eval_data, data_settings
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                default=f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
              for f in dataclasses.fields(TrainConfig)]
    return inspect.Signature([*head, *fields], return_annotation=FitResult)


fit.__signature__ = _signature()
