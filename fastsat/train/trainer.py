"""The trainer: :func:`fit` runs a recipe over the user's model and data, evaluates every epoch,
logs, checkpoints atomically and resumes bit-exactly."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastsat._checks import positive_int
from fastsat.data import as_batch, make_loader
from fastsat.evaluate import evaluate
from fastsat.train.checkpoint import atomic_save, atomic_write_text, capture_rng, load_checkpoint, restore_rng
from fastsat.train.recipes import PRECISIONS, NonFiniteLossError, Recipe, make_recipe

__all__ = ["CHECKPOINT_NAME", "OPTIMIZERS", "SCHEDULES", "FitResult", "fit", "lr_factor"]

log = logging.getLogger("fastsat.train")

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
SCHEDULES = ("piecewise", "cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adam")
_LOG_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "seconds", "images_per_s", "clean_acc", "robust_acc", "alignment", "cosine")


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
    if schedule == "piecewise":
        epoch, epochs = step // steps_per_epoch, total_steps / steps_per_epoch
        return 1.0 if epoch < 0.5 * epochs else 0.1 if epoch < 0.75 * epochs else 0.01
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "onecycle":
        return float(np.interp(step + 1, [0, 0.4 * total_steps, total_steps], [0.0, 1.0, 0.0]))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def _generators(data: object) -> dict[str, torch.Generator]:
    """Shuffling generators of a torch DataLoader (its own, or its sampler's)."""
    found = {}
    for name, owner in (("loader", data), ("sampler", getattr(data, "sampler", None))):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            found[name] = gen
    return found


def _make_optimizer(name, params, lr, momentum, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS} or a torch.optim.Optimizer, got {name!r}")


def _write_logs(out_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl and metrics.csv, rewritten atomically from the checkpoint's history (so after a
    resume the logs hold exactly the completed epochs)."""
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def _tensorboard(out_dir: Path | None):
    if out_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def fit(
    model: nn.Module,
    train_data: object,
    *,
    recipe: str | Recipe = "sat",
    recipe_options: dict | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    augment: bool = True,
    optimizer: str | torch.optim.Optimizer = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "piecewise",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    ema: float | None = None,
    seed: int = 0,
    attack_mode: str | None = None,
    eval_data: object = None,
    eval_eps: float = 8 / 255,
    eval_steps: int = 10,
    eval_batch_size: int = 256,
    early_stop_drop: float = 0.2,
    out_dir: str | Path | None = None,
    resume: bool | str | Path = False,
    progress: bool | None = None,
) -> FitResult:
    """Train ``model`` in place with a recipe; evaluate, log and checkpoint every epoch.

    Args:
        model: any classifier taking pixel-space (B, C, H, W) input in [0, 1] and returning (B, K)
            logits; it is trained on the device its parameters are on.
        train_data: a map-style dataset of sample dicts (e.g. ``fastsat.data.shapes(...)``),
            batched with ``batch_size``, shuffled and (``augment``) padded-crop+flip augmented by
            :func:`fastsat.data.loader`; or your own iterable of batches with ``len()`` — a
            DataLoader yielding (x, y) tuples or dicts — used as it is.
        recipe: a name from :data:`fastsat.train.RECIPES` (default "sat") or a :class:`Recipe`.
        recipe_options: the recipe's hyper-parameters (eps, steps, beta, lam, maps, ...).
        epochs: number of epochs (default 10). batch_size: default 128 (datasets only).
        augment: padded crop + flip when ``train_data`` is a dataset (default True).
        optimizer: "sgd" (momentum, default) or "adam", or an optimizer over the model's parameters.
        lr: peak learning rate (default 0.1). momentum: SGD momentum (0.9).
        weight_decay: L2 weight decay (default 5e-4).
        schedule: per-step learning-rate schedule, one of :data:`SCHEDULES` (see :func:`lr_factor`).
        precision: "fp32" (default), "bf16" or "fp16" autocast; fp16 uses a GradScaler.
        channels_last: NHWC memory format for model and inputs (faster convs on GPUs).
        compile: run the forward through ``torch.compile``.
        ema: decay of an exponential moving average of the weights (e.g. 0.999) used for
            evaluation and saved in the checkpoint; None (default) disables it.
        seed: seeds python, numpy and torch and the data order (default 0).
        attack_mode: "eval" or "train": the model's mode while a recipe's attack runs; None keeps
            the recipe's default ("eval").
        eval_data: data (as ``train_data``) for the per-epoch clean accuracy, PGD-``eval_steps``
            robust accuracy at ``eval_eps`` (pixels, default 8/255, step eps/4) and the mean
            alignment and cosine from the attack's last-step gradient; None skips evaluation.
        eval_batch_size: batch size for ``eval_data`` given as a dataset (default 256).
        early_stop_drop: for recipes with ``early_stop`` (``fast``): stop and restore the best
            epoch's weights when PGD accuracy falls this much below its best (default 0.2). With
            ``ema`` the evaluated, best-kept (best.pt) and restored weights are the EMA's.
        out_dir: where checkpoint.pt (every epoch, atomic), best.pt, metrics.jsonl/.csv and (if
            installed) TensorBoard logs go; None keeps nothing on disk.
        resume: True resumes from ``out_dir``/checkpoint.pt if present (else starts fresh), or a
            checkpoint path. Model, optimizer, scheduler, scaler, EMA, recipe state, RNG states and
            epoch are restored; the run then continues exactly as if never interrupted.
        progress: tqdm progress bars; None shows them only when stderr is a terminal.

    Returns:
        :class:`FitResult`. The trained weights are in ``model`` (the best epoch's after an early stop).

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint stays on disk.
    """
    options = dict(recipe_options or {})
    if attack_mode is not None and not isinstance(recipe, Recipe):
        options["attack_mode"] = attack_mode
    recipe = make_recipe(recipe, **options)
    positive_int(epochs, "epochs")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"ema: expected a decay in (0, 1) or None, got {ema!r}")
    if recipe.early_stop and eval_data is None:
        raise ValueError(f"eval_data: recipe {recipe.name!r} stops early on a PGD check and needs eval_data")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model: has no parameters to train")
    device = param.device
    out_dir = Path(out_dir) if out_dir is not None else None
    if resume and out_dir is None and not isinstance(resume, (str, Path)):
        raise ValueError("resume: needs out_dir (or a checkpoint path)")

    loader = make_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed, device=device, augment=augment)
    eval_loader = None if eval_data is None else make_loader(eval_data, batch_size=eval_batch_size, shuffle=False, seed=seed, device=device)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError("train_data: yields no batches")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if isinstance(optimizer, torch.optim.Optimizer):
        opt, optimizer_name = optimizer, type(optimizer).__name__
    else:
        opt, optimizer_name = _make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay), optimizer
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(schedule, step, total_steps, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    averaged = None
    if ema is not None:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema), use_buffers=True
        )
    train_model = torch.compile(model) if compile else model
    config = {
        "recipe": recipe.name, "recipe_options": recipe.options(), "epochs": epochs, "optimizer": optimizer_name,
        "lr": lr, "schedule": schedule, "precision": precision, "seed": seed, "steps_per_epoch": steps_per_epoch,
        "ema": ema,
    }

    history: list[dict] = []
    best: dict | None = None
    best_state: dict | None = None
    start_epoch = 0
    generators = _generators(loader)
    checkpoint_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    resume_path = Path(resume) if isinstance(resume, (str, Path)) else checkpoint_path if resume else None
    if resume_path is not None and resume_path.exists():
        state = load_checkpoint(resume_path)
        differing = sorted(k for k in config if state["config"].get(k) != config[k])
        if differing:
            raise ValueError(f"resume: {resume_path} was written with different settings {differing}: "
                             f"{ {k: state['config'].get(k) for k in differing} } vs now { {k: config[k] for k in differing} }")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        if averaged is not None:
            averaged.load_state_dict(state["ema"])
        recipe.load_state_dict(state["recipe_state"])
        restore_rng(state["rng"], generators)
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        log.info("resumed from %s after epoch %d", resume_path, start_epoch)
    else:
        if resume_path is not None and isinstance(resume, (str, Path)):
            raise FileNotFoundError(f"resume: checkpoint {resume_path} does not exist")
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        for gen in generators.values():
            gen.manual_seed(seed)

    board = _tensorboard(out_dir)
    show = sys.stderr.isatty() if progress is None else progress
    result = FitResult(history=history, checkpoint=checkpoint_path if start_epoch else None)
    for epoch in range(start_epoch, epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        epoch_lr = opt.param_groups[0]["lr"]
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"{recipe.name} epoch {epoch + 1}/{epochs}", disable=not show, leave=False, file=sys.stderr)
        for index, item in enumerate(bar):
            batch = as_batch(item, device)
            if channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            try:
                out = recipe.train_step(train_model, batch, opt, epoch=epoch, precision=precision, scaler=scaler)
            except NonFiniteLossError as err:
                kept = (f"the last good checkpoint {checkpoint_path} (after epoch {history[-1]['epoch']}) is intact"
                        if result.checkpoint is not None else "no checkpoint was written yet")
                raise NonFiniteLossError(f"{err} in epoch {epoch + 1}, batch {index}; training stopped, {kept}") from None
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            size = batch["label"].shape[0]
            loss_sum += out.loss.detach().float() * size
            correct += (out.logits.argmax(1) == batch["label"]).sum()
            seen += size
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch + 1, "lr": epoch_lr, "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen, "seconds": seconds, "images_per_s": seen / seconds,
        }
        # With EMA the averaged weights are the ones evaluated, kept as best and restored on an early stop.
        evaluated = averaged.module if averaged is not None else model
        if eval_loader is not None:
            metrics = evaluate(evaluated, eval_loader, eps=[eval_eps], steps=eval_steps)
            robust = metrics["attacks"]["pgd"][0]
            record.update(clean_acc=metrics["clean_acc"], robust_acc=robust["acc"],
                          alignment=robust["alignment"], cosine=robust["cosine"])
        history.append(record)
        log.info("%s epoch %d/%d: %s", recipe.name, epoch + 1, epochs,
                 ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and v is not None))

        stop = None
        if "robust_acc" in record:
            if best is None or record["robust_acc"] > best["robust_acc"]:
                best = {"epoch": record["epoch"], "robust_acc": record["robust_acc"]}
                best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
                if out_dir is not None:
                    atomic_save({"epoch": best["epoch"], "model": best_state}, out_dir / BEST_NAME)
            elif recipe.early_stop and record["robust_acc"] < best["robust_acc"] - early_stop_drop:
                stop = (f"catastrophic overfitting: PGD accuracy fell from {best['robust_acc']:.3f} (epoch {best['epoch']}) "
                        f"to {record['robust_acc']:.3f} (epoch {record['epoch']}); restored epoch {best['epoch']}'s weights")
        if out_dir is not None:
            state = {
                "format": 1, "config": config, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": averaged.state_dict() if averaged is not None else None,
                "recipe_state": recipe.state_dict(), "rng": capture_rng(generators), "history": history, "best": best,
            }
            result.checkpoint = atomic_save(state, checkpoint_path)
            _write_logs(out_dir, history)
            if board is not None:
                for key, value in record.items():
                    if key != "epoch" and value is not None:
                        board.add_scalar(key, value, record["epoch"])
        if stop is not None:
            model.load_state_dict(best_state if best_state is not None else load_checkpoint(out_dir / BEST_NAME)["model"])
            log.warning("%s: %s", recipe.name, stop)
            result.stopped = stop
            break
    if board is not None:
        board.close()
    return result
