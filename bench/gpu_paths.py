"""The attack, saliency and training paths of ``python -m bench.gpu`` (issue 3 §6, issue 4 §7).

Run by ``bench.gpu`` after the op benchmarks, in the same process; rows go into the same CSV and
markdown. Every function here takes the device, so the same code runs (slowly, and without peak
memory) on the CPU.

- Attacks: PGD-10 L∞ (ε = 8/255, α = 2/255, CE) on PreActResNet-18 (eval mode), 32×32, batch
  512, in fp32 and under bf16 autocast: ``fastsat.attacks.PGD`` against the plain PyTorch loop of
  ``bench.bench_attacks`` (same random start, checked to reach the same batch before timing),
  interleaved in one run.
- Saliency: SmoothGrad (50 samples) and Integrated Gradients (256 steps) of a ResNet-18 with the
  ImageNet stem on 8×3×224×224, with ``chunk_size=None`` and ``chunk_size=8``: time and peak GPU
  memory of one call (``max_memory_allocated`` over the call minus what was allocated before it).
  An unchunked call that runs out of GPU memory is reported as "OOM" (another RuntimeError of
  the unchunked call: as "failed: <message>") and the run goes on.
- Training: images/s of ``Recipe.train_step`` per recipe (standard, SAT from boxes, PGD-10,
  TRADES, Fast, SAT+PGD; SAT at curriculum epoch 3), PreActResNet-18, 32×32, batch
  512, bf16 autocast, channels_last, synthetic shapes data; one timed stretch of 20 steps after 5
  warm-up steps, and each recipe's time relative to standard training (SAT's target: ≤ 1.05×).

Times are measured with CUDA events around each call (``time.perf_counter`` on the CPU). The
attack and saliency numbers are medians over repeated calls; training is timed as one stretch,
since SAT+PGD's steps alternate between a cheap and an expensive kind at random.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.bench_attacks import EPS, STEP, STEPS, plain_pgd
from fastsat import models, ops, saliency
from fastsat.attacks import PGD
from fastsat.data import shapes
from fastsat.train import make_recipe

EPOCH = 3  # SAT curriculum epoch of the SAT recipes
RECIPES = {"standard": ("standard", {}), "sat-boxes": ("sat", {"maps": "boxes"}), "pgd": ("pgd", {"steps": 10}),
           "trades": ("trades", {"steps": 10}), "fast": ("fast", {}), "sat+pgd": ("sat+pgd", {"maps": "boxes"})}
TRAIN_RECIPES = tuple(RECIPES)
# fp32 reaches the plain loop's batch up to sign flips of near-zero gradient entries (as in
# bench_attacks); under bf16 the agreement is reported, not required.
MIN_AGREEMENT_FP32 = 0.99


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions of one run."""

    attack_batch: int = 512
    image_size: int = 32
    saliency_batch: int = 8
    saliency_size: int = 224
    smoothgrad_samples: int = 50
    ig_steps: int = 256
    chunk_size: int = 8
    train_batch: int = 512
    train_warmup: int = 5
    train_steps: int = 20
    repeats: int = 10  # timed calls per attack / saliency configuration (median)


FULL = Sizes()
QUICK = Sizes(attack_batch=128, saliency_batch=2, smoothgrad_samples=16, ig_steps=32, train_batch=128,
              train_warmup=2, train_steps=5, repeats=3)


@dataclass(frozen=True)
class PathRow:
    """One measured configuration. ``ms`` is None when the call failed (``note``: "OOM" or why);
    ``time_vs_baseline`` is ms / the ms of the row named ``baseline`` (< 1: faster than it);
    ``peak_mib`` is None where not measured (CPU, training)."""

    op: str
    variant: str
    shape: str
    dtype: str
    impl: str
    ms: float | None
    images: int  # images per timed call
    peak_mib: float | None = None
    time_vs_baseline: float | None = None
    baseline: str = ""
    note: str = ""

    @property
    def images_per_s(self) -> float | None:
        return None if self.ms is None else self.images / (self.ms * 1e-3)


# --- timing ------------------------------------------------------------------------------------

def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events on a GPU (including any time the GPU
    idles while the host catches up), wall time on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms per call of each function over ``repeats`` calls, the functions taking turns so
    that drift (clocks, temperature) hits all alike. Warm up before calling this."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed_ms(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra peak GPU memory of one call of ``fn`` (MiB above what was allocated before it);
    None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _shape(*dims: int) -> str:
    return "×".join(map(str, dims))


# --- the three benchmarks ----------------------------------------------------------------------

def attack_rows(device: torch.device, sizes: Sizes) -> list[PathRow]:
    """PGD-10 L∞: fastsat.attacks.PGD vs the plain loop, fp32 and bf16 autocast, model in eval mode."""
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10).to(device).eval()
    batch, size = sizes.attack_batch, sizes.image_size
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    attack = PGD(model, eps=EPS, step_size=STEP, steps=STEPS)

    # Both sides draw their random start from the same seed through fastsat.ops.random_start.
    def run_fastsat() -> torch.Tensor:
        torch.manual_seed(1)
        return attack(x, y).x_adv

    def run_plain() -> torch.Tensor:
        torch.manual_seed(1)
        return plain_pgd(model, x, y, ops.random_start(x, eps=EPS))

    rows = []
    for precision in ("fp32", "bf16"):
        with _autocast(device, precision):
            agreement = ((run_fastsat() - run_plain()).abs() <= 1e-6).float().mean().item()
            if precision == "fp32" and agreement < MIN_AGREEMENT_FP32:
                raise RuntimeError(f"PGD-10 fp32: fastsat and the plain loop disagree on {1 - agreement:.2%} "
                                   f"of the elements (allowed {1 - MIN_AGREEMENT_FP32:.0%})")
            times = interleaved_ms({"fastsat": run_fastsat, "plain torch": run_plain}, device, sizes.repeats)
        dtype = "float32" if precision == "fp32" else "bf16 autocast"
        for impl, ms in times.items():
            note = f"same x_adv as plain on {agreement:.2%} of elements" if impl == "fastsat" else ""
            rows.append(PathRow("PGD-10 linf", "eps=8/255 step=2/255", _shape(batch, 3, size, size), dtype, impl, ms,
                                batch, time_vs_baseline=ms / times["plain torch"], baseline="plain torch", note=note))
        print(f"  PGD-10 {dtype}: fastsat {times['fastsat']:.2f} ms, plain {times['plain torch']:.2f} ms", flush=True)
    return rows


def saliency_rows(device: torch.device, sizes: Sizes) -> list[PathRow]:
    """SmoothGrad and IG with chunk_size None and ``sizes.chunk_size``: median ms and peak memory."""
    torch.manual_seed(0)
    model = models.create("resnet18", num_classes=1000, stem="imagenet").to(device).eval()
    batch, size = sizes.saliency_batch, sizes.saliency_size
    x = torch.rand(batch, 3, size, size, device=device)
    methods = {
        ("SmoothGrad", f"n_samples={sizes.smoothgrad_samples}"): lambda chunk: saliency.smoothgrad(
            model, x, n_samples=sizes.smoothgrad_samples, seed=0, chunk_size=chunk),
        ("IG", f"steps={sizes.ig_steps}"): lambda chunk: saliency.integrated_gradients(
            model, x, steps=sizes.ig_steps, chunk_size=chunk),
    }
    rows = []
    for (name, setting), method in methods.items():
        unchunked_ms = None
        for chunk in (None, sizes.chunk_size):
            impl = f"chunk_size={chunk}"
            ms, peak, note = _time_and_peak(functools.partial(method, chunk), device, sizes.repeats, may_fail=chunk is None)
            unchunked_ms = ms if chunk is None else unchunked_ms
            ratio = None if ms is None or unchunked_ms is None else ms / unchunked_ms
            rows.append(PathRow(name, setting, _shape(batch, 3, size, size), "float32", impl, ms, batch, peak, ratio,
                                "" if ratio is None else "chunk_size=None", note))
            result = note if ms is None else f"{ms:.1f} ms, peak {'n/a' if peak is None else f'{peak:.0f} MiB'}"
            print(f"  {name} {setting} {impl}: {result}", flush=True)
    return rows


def _time_and_peak(call: Callable[[], object], device: torch.device, repeats: int,
                   *, may_fail: bool) -> tuple[float | None, float | None, str]:
    """(median ms, peak MiB, "") of ``call``; with ``may_fail``, (None, None, why) if it raised
    torch.OutOfMemoryError ("OOM") or another RuntimeError — unchunked, one pass holds the
    activations of B·n inputs, and past 2³¹ elements per tensor some kernels refuse to run
    instead of running out of memory."""
    try:
        peak = peak_mib(call, device)  # also the warm-up call
        return interleaved_ms({"call": call}, device, repeats)["call"], peak, ""
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not may_fail:
            raise
        note = "OOM" if isinstance(err, torch.OutOfMemoryError) else f"failed: {str(err).splitlines()[0][:120]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the failed call's blocks back before the next run
    return None, None, note


def _train_batches(device: torch.device, sizes: Sizes, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct batches of synthetic shapes (images channels_last, with boxes)."""
    batch, size = sizes.train_batch, sizes.image_size
    data = shapes(batch * count, size=size, num_classes=10, seed=0, cache_dir=False)
    batches = []
    for i in range(count):
        part = slice(i * batch, (i + 1) * batch)
        image = data.images[part].float().div(255).to(device).contiguous(memory_format=torch.channels_last)
        batches.append({"image": image, "label": data.labels[part].to(device), "box": data.boxes[part].to(device)})
    return batches


def train_rows(device: torch.device, sizes: Sizes, precision: str = "bf16") -> list[PathRow]:
    """Images/s of each recipe's train_step over one timed stretch, and its time vs standard."""
    torch.manual_seed(0)
    model = models.create("preactresnet18", num_classes=10).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = _train_batches(device, sizes)
    times = {}
    for name in TRAIN_RECIPES:
        recipe_name, options = RECIPES[name]
        recipe = make_recipe(recipe_name, **options)
        cycle = itertools.cycle(batches)

        def stretch(steps: int, recipe=recipe, cycle=cycle) -> None:
            for _ in range(steps):
                recipe.train_step(model, next(cycle), optimizer, epoch=EPOCH, precision=precision)

        stretch(sizes.train_warmup)
        times[name] = timed_ms(lambda: stretch(sizes.train_steps), device)
        print(f"  train {name}: {sizes.train_batch * sizes.train_steps / times[name] * 1e3:.0f} images/s", flush=True)
    shape = _shape(sizes.train_batch, 3, sizes.image_size, sizes.image_size)
    dtype = "bf16 autocast" if precision == "bf16" else "float32"
    return [PathRow("train_step", name, shape, dtype, "fastsat", ms, sizes.train_batch * sizes.train_steps,
                    time_vs_baseline=ms / times["standard"], baseline="standard",
                    note=f"{sizes.train_steps} steps after {sizes.train_warmup} warm-up, channels_last")
            for name, ms in times.items()]


def run(device: torch.device, sizes: Sizes) -> list[PathRow]:
    """All three benchmarks, in order."""
    rows = []
    for title, bench in (("attacks", attack_rows), ("saliency", saliency_rows), ("training", train_rows)):
        print(f"timing {title} ...", flush=True)
        rows += bench(device, sizes)
    return rows


# --- reports -----------------------------------------------------------------------------------

CSV_FIELDS = ["images_per_s", "peak_MiB", "time_vs_baseline", "baseline", "note"]


def _optional(value: float | None, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def csv_record(row: PathRow) -> dict[str, str]:
    """The row under the columns of bench.gpu's CSV (the op-only columns stay empty; ``median_ms``
    is empty for a call that failed, ``note`` says why)."""
    return {"op": row.op, "variant": row.variant, "shape": row.shape, "dtype": row.dtype, "impl": row.impl,
            "median_ms": _optional(row.ms, ".6f", ""), "images_per_s": _optional(row.images_per_s, ".1f", ""),
            "peak_MiB": _optional(row.peak_mib, ".1f", ""), "time_vs_baseline": _optional(row.time_vs_baseline, ".3f", ""),
            "baseline": row.baseline, "note": row.note}


def markdown_sections(rows: Sequence[PathRow]) -> list[str]:
    """Markdown lines: one table per benchmark (attacks, saliency, training)."""
    if not rows:
        return []
    lines = [f"cuDNN TF32 for float32 convolutions: {torch.backends.cudnn.allow_tf32} (torch's default).", ""]
    attacks = [r for r in rows if r.op.startswith("PGD")]
    if attacks:
        lines += ["## Attacks: PGD-10 L∞ (ε = 8/255, α = 2/255), PreActResNet-18, eval mode", "",
                  ("Median ms per attack; × plain = time / the plain PyTorch loop's (< 1: fastsat faster), "
                   "measured interleaved in one run."), "",
                  "| shape | dtype | impl | ms | images/s | × plain | note |", "|---|---|---|---:|---:|---:|---|"]
        lines += [f"| {r.shape} | {r.dtype} | {r.impl} | {r.ms:.2f} | {r.images_per_s:.0f} | {r.time_vs_baseline:.3f} "
                  f"| {r.note} |" for r in attacks]
        lines.append("")
    maps = [r for r in rows if r.op in ("SmoothGrad", "IG")]
    if maps:
        lines += ["## Saliency: ResNet-18 (ImageNet stem), float32, eval mode", "",
                  ("Median ms per call; peak = max GPU memory allocated during one call minus what was "
                   "allocated before it; × unchunked = time / the chunk_size=None call's."), "",
                  "| method | shape | chunk | ms | peak MiB | × unchunked |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r.op} {r.variant} | {r.shape} | {r.impl} | {_optional(r.ms, '.1f', r.note)} "
                  f"| {_optional(r.peak_mib, '.0f')} | {_optional(r.time_vs_baseline, '.3f', '')} |" for r in maps]
        lines.append("")
    train = [r for r in rows if r.op == "train_step"]
    if train:
        lines += [f"## Training throughput: PreActResNet-18, {train[0].shape}, {train[0].dtype}", "",
                  (f"`Recipe.train_step`, SGD, synthetic shapes with boxes; {train[0].note}. × standard = time / "
                   "standard training's (SAT's target ≤ 1.05)."), "",
                  "| recipe | images/s | × standard |", "|---|---:|---:|"]
        lines += [f"| {r.variant} | {r.images_per_s:.0f} | {r.time_vs_baseline:.3f} |" for r in train]
        lines.append("")
    return lines
