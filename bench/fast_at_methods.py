"""The single-step and loss-variant adversarial-training methods side by side, on scikit-learn's digits (CPU).

Why people use N-FGSM and GradAlign: at FGSM's cost they avoid the catastrophic overfitting that
makes FGSM-RS collapse at larger radii, and AWP and MART change what PGD-AT converges to. This
benchmark measures that on a data set small enough for a CPU (scikit-learn's 8x8 digits,
:func:`fastsat.data.digits`; Madry et al.'s MNIST network at width 16, ``madrycnn``), with the arms

    standard (the cost reference), FGSM-RS (``fast``), FGSM-RS with fastsat's catastrophic-
    overfitting guard, N-FGSM (``nfgsm``), GradAlign (``gradalign``), PGD-AT (``pgd``, 10 steps
    of ε/4), PGD-AT+AWP (``pgd``, ``awp_gamma`` 5e-3), TRADES (``trades``) and MART (``mart``),

at two L∞ radii: a small one on the 8x8 digits, and the smallest radius of a grid at which FGSM-RS
(Wong et al.'s step 1.25ε) collapses, found first by a sweep (one seed; its per-epoch PGD accuracy
is the collapse curve). The large radius runs on the digits resized to 16x16 (bilinear) for 20
epochs: on the 8x8 images no FGSM-RS run collapsed, up to the radii where PGD-AT itself no longer
learns (0.2-0.4: bench/results/fast-at-methods-2026-12-07-cpu-8px.md; single-seed hand runs at
width 64, step 2ε or a constant learning rate, not committed, collapsed neither), and catastrophic
overfitting is known to need more input dimensions. A run *collapsed* when its test PGD-10
accuracy ends at a quarter of its peak or less, after a peak of at least 0.05 (a run that never
became robust cannot collapse); the rule was written after single-seed exploratory runs at 16x16
(not committed) and before this script's sweep ran. Every arm but "FGSM-RS + guard" runs with the guard off
(``early_stop_drop=None``), so a collapse shows.

Reported per arm and radius, over the seeds (paired: a seed fixes the initial weights and the data
order of every arm): clean test accuracy, PGD-50 accuracy (random start, step ε/4), the standard
suite's robust accuracy (AutoAttack: APGD-CE → APGD-T → FAB-T → Square; on the CPU on a subset of the
test points with fewer iterations — the sizes are in the results), and cost: forward passes of the
network per training step (counted with a hook) and the steady-state epoch time relative to
standard training (median over the epochs after the first). Intervals are 95% t-intervals over
seeds; the paired-seed difference of each arm from PGD-AT is reported the same way. The FastAT
benchmark's CIFAR-10 table (arXiv 2604.22853) is printed beside the results, marked as theirs.

Usage::

    python bench/fast_at_methods.py            # CPU, 3 seeds, 2 worker processes
    python bench/fast_at_methods.py --quick    # seconds: the pipeline, not the numbers
    python bench/fast_at_methods.py --seeds 5  # more seeds

Writes ``bench/results/fast-at-methods-<date>-<device>[-quick].md`` / ``.csv`` / ``.json`` and the
collapse curve ``...-collapse.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fastsat import data, models
from fastsat._stats import holm, t_cdf, t_quantile
from fastsat.evaluate import MaskingChecks, StandardSuite, evaluate
from fastsat.report import markdown_table
from fastsat.train import fit, make_recipe

RESULTS = Path(__file__).resolve().parent / "results"

# Sizes per mode. cpu: 3 seeds x 2 radii x 9 arms + the sweep on 2 worker processes. "small" and "large":
# the image side (pixels) and epochs at the small radius and at the large one (the sweep's).
SIZES = {
    "quick": {"n_train": 128, "small": {"side": 8, "epochs": 1}, "large": {"side": 8, "epochs": 1}, "small_eps": 0.1,
              "collapse_grid": (0.3,), "curve_points": 32, "n_test": 32, "suite_points": 8, "suite_scale": 0.01,
              "masking_factor": 1, "pgd_steps": 2, "batch": 64, "jobs": 2},
    "cpu": {"n_train": None, "small": {"side": 8, "epochs": 10}, "large": {"side": 16, "epochs": 20}, "small_eps": 0.1,
            "collapse_grid": (0.15, 0.2, 0.25), "curve_points": 200, "n_test": None, "suite_points": 100,
            "suite_scale": 0.05, "masking_factor": 4, "pgd_steps": 50, "batch": 128, "jobs": 2},
}
# The training run every arm shares (Wong et al.'s Fast-AT shape: SGD, one-cycle learning rate).
TRAINING = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "onecycle",
            "augment": False, "progress": False}
COLLAPSE_SHARE, COLLAPSE_PEAK = 0.25, 0.05  # collapsed: ends at <= a quarter of a peak of >= 0.05 (see above)

# name -> (recipe, options, guard on). Options that depend on ε are filled in by arm_options.
ARMS = {
    "standard": ("standard", {}, False),
    "FGSM-RS": ("fast", {}, False),
    "FGSM-RS + guard": ("fast", {}, True),
    "N-FGSM": ("nfgsm", {}, False),
    "GradAlign": ("gradalign", {}, False),
    "PGD-AT": ("pgd", {"steps": 10}, False),
    "PGD-AT + AWP": ("pgd", {"steps": 10, "awp_gamma": 5e-3}, False),
    "TRADES": ("trades", {"steps": 10}, False),
    "MART": ("mart", {"steps": 10}, False),
}
# Backward passes per step, by the recipes' code (forwards are counted). GradAlign: the FGSM gradient, the
# two input gradients with create_graph, and the update's backward, which also runs back through those
# two (a double backprop, counted as 2 passes each).
BACKWARDS = {"standard": "1", "fast": "2", "nfgsm": "2", "gradalign": "8 (4 + 2 double backprops)", "pgd": "11",
             "pgd+awp": "12", "trades": "11", "mart": "11"}

# The FastAT benchmark (arXiv 2604.22853, Apr 2026): CIFAR-10 ResNet-18, 100 epochs, 3 seeds, fp32 eager. Theirs.
THEIRS = [
    {"method": "FGSM-RS", "AutoAttack": 43.09, "time": "1,902 s"},
    {"method": "N-FGSM", "AutoAttack": 47.77, "time": "1,941 s"},
    {"method": "GradAlign", "AutoAttack": 47.99, "time": "5,612 s"},
    {"method": "PGD-AT", "AutoAttack": 44.33, "time": "6,954 s"},
    {"method": "PGD-AT + weight averaging", "AutoAttack": 50.49, "time": "—"},
]


GRADALIGN_LAM_ABOVE_RULE = 2.0  # GradAlign's λ where the authors' rule stops (16/255); their largest value, not tuned here


def arm_options(recipe: str, options: dict, eps: float, epochs: int) -> dict:
    """The recipe's options at radius ``eps``: ε, multi-step attacks at ε/4 per step, GradAlign's λ
    beyond its rule's range, and a linear ε warm-up over the first fifth of the epochs for every
    perturbing arm alike."""
    if recipe == "standard":
        return {}
    extra = {"step_size": eps / 4} if recipe in ("pgd", "trades", "mart") else {}
    if recipe == "gradalign" and eps > 16 / 255:
        extra["lam"] = GRADALIGN_LAM_ABOVE_RULE
    return {"eps": eps, "eps_warmup": max(1, epochs // 5), **extra, **options}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over ``values`` (NaN half-width for one value)."""
    if len(values) < 2:
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def forwards_per_step(recipe: str, options: dict, model: torch.nn.Module, train) -> int:
    """Forward passes of the network in one training step of ``recipe``, counted with a hook on a
    copy of ``model`` (one batch of the training data, a zero learning rate)."""
    probe, count = copy.deepcopy(model), [0]
    probe.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
    batch = (train.images[:8].float().div(255), train.labels[:8])
    make_recipe(recipe, **options).train_step(probe, batch, torch.optim.SGD(probe.parameters(), lr=0.0))
    return count[0]


@functools.lru_cache(maxsize=2)
def digits_at(side: int, n_train: int | None) -> tuple:
    """The (train, test) digits at ``side`` x ``side`` pixels (8: as shipped), train cut to ``n_train``."""
    size = None if side == 8 else side
    train, test = data.digits(seed=0, size=size), data.digits(train=False, seed=0, size=size)
    return (train if n_train is None else train.subset(slice(0, n_train))), test


def run_arm(name: str, eps: float, seed: int, sizes: dict, setting: str) -> dict:
    """Train one arm at one radius and seed (``setting``: "small" or "large", its image side and
    epochs); its accuracies, cost and per-epoch curve. Runs in a worker process, on one thread."""
    torch.set_num_threads(1)
    recipe, options, guard = ARMS[name]
    side, epochs = sizes[setting]["side"], sizes[setting]["epochs"]
    train, test = digits_at(side, sizes["n_train"])
    device = torch.device("cpu")
    torch.manual_seed(seed)
    model = models.create("madrycnn", num_classes=10, in_channels=1, width=16, hidden=128, mean=train.mean,
                          std=train.std).to(device)
    options = arm_options(recipe, options, eps, epochs)
    forwards = forwards_per_step(recipe, options, model, train)
    eval_data = (test.images[: sizes["curve_points"]].float().div(255), test.labels[: sizes["curve_points"]])
    started = time.perf_counter()
    result = fit(model, train, recipe=recipe, recipe_options=options,
                 epochs=epochs, batch_size=sizes["batch"], seed=seed, eval_data=eval_data, eval_eps=eps,
                 eval_steps=10, early_stop_drop=0.2 if guard else None, **TRAINING)
    train_seconds = time.perf_counter() - started
    model.eval()
    x, y = test.images.float().div(255).to(device), test.labels.to(device)
    n_suite = sizes["suite_points"]
    k = lambda n: max(1, round(n * sizes["suite_scale"]))
    pgd = evaluate(model, (x, y), eps=[eps], steps=sizes["pgd_steps"], max_samples=sizes["n_test"])
    checks = MaskingChecks(subset=n_suite, factor=sizes["masking_factor"])
    suite = evaluate(model, (x[:n_suite], y[:n_suite]), eps=[eps], steps=1,
                     suite=StandardSuite(steps=k(100), fab_steps=k(100), square_queries=k(5000), checks=checks))
    epoch_seconds = [row["seconds"] for row in result.history[1:]] or [result.history[0]["seconds"]]
    row = {
        "arm": name, "eps": eps, "side": side, "seed": seed, "clean": pgd["clean_acc"], "pgd50": pgd["attacks"]["pgd"][0]["acc"],
        "autoattack": suite["standard"][0]["acc"], "masking_flags": suite["masking"]["flags"], "epoch_s": statistics.median(epoch_seconds),
        "forwards_per_step": forwards,
        "stopped": result.stopped, "epochs_run": len(result.history), "train_s": train_seconds,
        "curve": [row.get("robust_acc") for row in result.history],
    }
    print(f"  {name:16s} ε={eps:.3g} seed {seed}: clean {row['clean']:.3f} PGD-{sizes['pgd_steps']} {row['pgd50']:.3f} "
          f"AA {row['autoattack']:.3f} ({train_seconds:.0f} s{', stopped' if result.stopped else ''})", flush=True)
    return row


def collapsed(curve: list) -> bool:
    """Whether a per-epoch PGD accuracy curve collapsed (see the module docstring)."""
    values = [v for v in curve if v is not None]
    return max(values) >= COLLAPSE_PEAK and values[-1] <= COLLAPSE_SHARE * max(values)


def find_collapse(sizes: dict, pool: ProcessPoolExecutor) -> tuple[float, list[dict]]:
    """FGSM-RS over the grid of radii (seed 0, guard off, the large setting): the smallest radius
    whose run collapsed, and every run's row (the largest radius if none collapsed)."""
    jobs = [pool.submit(run_arm, "FGSM-RS", eps, 0, sizes, "large") for eps in sizes["collapse_grid"]]
    runs = [job.result() for job in jobs]
    for run in runs:
        run["collapsed"] = collapsed(run["curve"])
    hits = [run["eps"] for run in runs if run["collapsed"]]
    return (min(hits) if hits else max(sizes["collapse_grid"])), runs


def paired_p(differences: list[float]) -> float:
    """Two-sided p of a paired t-test that the mean of ``differences`` is 0 (NaN below 2 seeds)."""
    if len(differences) < 2:
        return math.nan
    spread = statistics.stdev(differences)
    if spread == 0:
        return 0.0 if statistics.fmean(differences) else 1.0
    t = statistics.fmean(differences) / (spread / math.sqrt(len(differences)))
    return 2 * (1 - t_cdf(abs(t), len(differences) - 1))


def summarise(rows: list[dict]) -> list[dict]:
    """Per (ε, arm): mean ± t-interval over seeds of each metric, and the paired difference from
    PGD-AT with its two-sided paired-t p-value, Holm-adjusted over the arms compared at that ε."""
    table = []
    for eps in sorted({r["eps"] for r in rows}):
        first = len(table)
        at = {(r["arm"], r["seed"]): r for r in rows if r["eps"] == eps}
        standard = {seed: r["epoch_s"] for (arm, seed), r in at.items() if arm == "standard"}
        for arm, (recipe, options, _) in ARMS.items():
            runs = [r for (name, _), r in at.items() if name == arm]
            if not runs:
                continue
            out = {"ε": eps, "arm": arm, "seeds": len(runs)}
            for key, label in (("clean", "clean"), ("pgd50", "PGD-50"), ("autoattack", "AutoAttack")):
                mean, half = interval([r[key] for r in runs])
                out[label], out[f"{label} ±"] = mean, half
                paired = [r[key] - at[("PGD-AT", r["seed"])][key] for r in runs if ("PGD-AT", r["seed"]) in at]
                if arm != "PGD-AT" and paired:
                    diff, diff_half = interval(paired)
                    out[f"{label} − PGD-AT"] = f"{diff:+.3f}" + (f" ± {diff_half:.3f}" if math.isfinite(diff_half) else "")
                    out[f"{label} p"] = paired_p(paired)
            out["fwd/step"] = runs[0]["forwards_per_step"]
            out["bwd/step"] = BACKWARDS["pgd+awp" if options.get("awp_gamma") else recipe]
            out["epoch time / standard"] = statistics.fmean(r["epoch_s"] / standard[r["seed"]] for r in runs
                                                            if r["seed"] in standard)
            out["collapsed"] = sum(collapsed(r["curve"]) for r in runs)
            out["stopped early"] = sum(bool(r["stopped"]) for r in runs)
            out["masking flags"] = ", ".join(sorted({f for r in runs for f in r["masking_flags"]})) or "none"
            table.append(out)
        for label in ("clean", "PGD-50", "AutoAttack"):  # Holm over this ε's comparisons with PGD-AT
            compared = [row for row in table[first:] if f"{label} p" in row]
            for row, adjusted in zip(compared, holm([row.pop(f"{label} p") for row in compared]), strict=True):
                row[f"{label} − PGD-AT Holm p"] = adjusted
    return table


def collapse_figure(path: Path, sweep: list[dict], rows: list[dict], large: float) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in sweep:
        axes[0].plot(range(1, len(run["curve"]) + 1), run["curve"], marker="o", label=f"ε = {run['eps']:g}")
    axes[0].set(title="FGSM-RS, seed 0: the sweep", xlabel="epoch", ylabel="test PGD-10 accuracy")
    axes[0].legend(fontsize=8)
    for arm in ("FGSM-RS", "FGSM-RS + guard", "N-FGSM", "GradAlign", "PGD-AT"):
        run = next((r for r in rows if r["arm"] == arm and r["eps"] == large and r["seed"] == 0), None)
        if run is not None:
            axes[1].plot(range(1, len(run["curve"]) + 1), run["curve"], marker="o", label=arm)
    axes[1].set(title=f"ε = {large:g}, seed 0", xlabel="epoch", ylabel="test PGD-10 accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(prefix: Path, meta: dict, rows: list[dict], table: list[dict], sweep: list[dict], figure: Path) -> Path:
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows, "summary": table, "sweep": sweep},
                                                      indent=1, default=str))
    sweep_rows = [{"ε": r["eps"], "peak PGD-10": max(v for v in r["curve"] if v is not None),
                   "last PGD-10": r["curve"][-1], "collapsed": r["collapsed"]} for r in sweep]
    columns = ["ε", "arm", "seeds", "clean", "clean ±", "PGD-50", "PGD-50 ±", "PGD-50 − PGD-AT", "PGD-50 − PGD-AT Holm p",
               "AutoAttack", "AutoAttack ±", "AutoAttack − PGD-AT", "AutoAttack − PGD-AT Holm p", "fwd/step", "bwd/step", "epoch time / standard", "collapsed", "stopped early",
               "masking flags"]
    lines = [
        "# Fast adversarial-training methods on scikit-learn's digits (bench/fast_at_methods.py)", "",
        (f"Generated {meta['generated']} on {meta['device']} ({meta['machine']}), torch {meta['torch']}; "
         f"{meta['seeds']} seed(s), mode {meta['mode']}, wall time {meta['wall_s']:.0f} s. {meta['load']}"), "",
        meta["setup"], "",
        "## Where FGSM-RS collapses (seed 0, guard off)", "", markdown_table(list(sweep_rows[0]), sweep_rows), "",
        f"The large radius is ε = {meta['large_eps']:g}" + ("" if any(r["collapsed"] for r in sweep) else
                                                             " (no radius of the grid collapsed: the largest)") + ".", "",
        f"![collapse curves]({figure.name})", "",
        "## Results (mean ± 95% t-interval over seeds; differences paired by seed)", "",
        ("The differences from PGD-AT are tested two-sided with a paired t-test over the seeds; their p-values are "
         "Holm-adjusted over the arms compared at each ε (one family per metric and ε). A difference counts at an "
         "adjusted p < 0.05; the intervals beside them are unadjusted."), "",
        markdown_table(columns, table), "",
        "## The FastAT benchmark's table (theirs: CIFAR-10 ResNet-18, 100 epochs, 3 seeds, fp32 eager; not measured here)",
        "", markdown_table(["method", "AutoAttack", "time"], THEIRS), "",
    ]
    md = prefix.with_suffix(".md")
    md.write_text("\n".join(lines))
    return md


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: checks the pipeline, not the numbers")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "cpu"
    sizes = SIZES[mode]
    seeds = 1 if args.quick else args.seeds
    device = torch.device("cpu")
    train, test = digits_at(8, sizes["n_train"])
    started = time.perf_counter()
    print(f"sweep: FGSM-RS at ε in {sizes['collapse_grid']}", flush=True)
    with ProcessPoolExecutor(max_workers=sizes["jobs"], mp_context=multiprocessing.get_context("spawn")) as pool:
        large, sweep = find_collapse(sizes, pool)
        jobs = [pool.submit(run_arm, arm, eps, seed, sizes, setting)
                for eps, setting in ((sizes["small_eps"], "small"), (large, "large"))
                for seed in range(seeds) for arm in ARMS]
        rows = [job.result() for job in jobs]
    table = summarise(rows)
    load = f"Load average at the end: {os.getloadavg()[0]:.2f} (other work shares the CPU; times are relative to standard)."
    meta = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "mode": mode, "seeds": seeds, "sizes": sizes, "training": TRAINING,
        "large_eps": large, "wall_s": time.perf_counter() - started, "load": load,
        "setup": (f"Data: scikit-learn's digits, grey, {len(train)} training and {len(test)} test images: at the small "
                  f"radius as shipped ({sizes['small']['side']}×{sizes['small']['side']}, {sizes['small']['epochs']} epochs), "
                  f"at the large one resized to {sizes['large']['side']}×{sizes['large']['side']} (bilinear; "
                  f"{sizes['large']['epochs']} epochs; see the script's docstring for why) "
                  f"(per-epoch PGD-10 curve on the first {sizes['curve_points']}, PGD-{sizes['pgd_steps']} on the first "
                  f"{sizes['n_test'] or len(test)}; AutoAttack on the first {sizes['suite_points']}, "
                  f"its iterations and queries at {sizes['suite_scale']:g} of the protocol's, its gradient-masking checks on the "
                  f"same points). Model: madrycnn (width "
                  f"16, hidden 128) with the data's normalisation. Training: batch {sizes['batch']}, SGD lr 0.05 "
                  "(one-cycle), momentum 0.9, weight decay 5e-4, no augmentation, ε warm-up over the first fifth of "
                  "the epochs; PGD-AT, TRADES and MART attack with 10 steps of ε/4; GradAlign's λ follows the authors' "
                  f"rule up to 16/255 and is {GRADALIGN_LAM_ABOVE_RULE:g} above it (not tuned). Runs go to "
                  f"{sizes['jobs']} worker processes of one thread each. Forward passes per step are "
                  "counted with a hook in one training step; backward passes are the recipes' own count."),
    }
    prefix = args.out / f"fast-at-methods-{datetime.now(timezone.utc):%Y-%m-%d}-{device.type}{'-quick' if args.quick else ''}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    figure = collapse_figure(prefix.parent / f"{prefix.name}-collapse.png", sweep, rows, large)
    md = write_results(prefix, meta, rows, table, sweep, figure)
    print(f"wrote {md} ({meta['wall_s']:.0f} s)")
    return md


if __name__ == "__main__":
    main()
