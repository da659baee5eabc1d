"""``fastsat demo``: seven runs, the same budget, several seeds, one report.

On the built-in shapes data in the setting where standard training learns the task (16 px, 4
classes, no clutter, the object lighter than its background: ``clutter=False, polarity="light"``;
see ``bench/results/paper-claims-pilot-2026-12-07.md``) it trains ``standard``, ``gradnorm``, a
``noise-only`` control (SAT with the map replaced by random signs), ``sat`` with boxes, ``sat``
with masks, ``pgd`` and ``sat+pgd`` for the same number of epochs, each seed from the same data
and initial weights for every run. It evaluates each (clean accuracy and PGD-10 accuracy at
ε ∈ {2, 4, 8}/255 on ``n_test`` images; Etmann's α and ρ with their Spearman correlation on the
first ``n_analysis`` of the first seed) and writes ``report.md`` / ``report.html``.

What the numbers say is decided by :func:`fastsat.report.claims.judge_claims`: paired differences
over the seeds with t-intervals and Holm's correction over the comparisons (:data:`MARGIN` for
"fails"). The cost column is the training's CPU time relative to standard training, trained on one
thread, so that other processes on a busy machine do not enter it (wall-clock epoch times did:
``bench/results/demo-cost-under-load-2026-12-07.md``). SAT's curriculum is compressed to the run length (:func:`compressed_curriculum`) and
the PGD recipes ramp ε up over the first third of the epochs.
"""

from __future__ import annotations

import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastsat import data, models
from fastsat._checks import choice, number, positive_int
from fastsat._checks import device as check_device
from fastsat._checks import seed as check_seed
from fastsat._threads import one_thread
from fastsat.evaluate import evaluate
from fastsat.report import analyze, markdown_table, robustness_curves, write_report
from fastsat.report.claims import ClaimResult, judge_claims
from fastsat.train import fit, sat_probability

__all__ = ["CONTROL", "DEMO_RECIPES", "EVAL_EPS", "FULL_SIZES", "MARGIN", "QUICK_SIZES", "comparisons",
           "compressed_curriculum", "cost_vs_standard", "run_demo"]

#: The control run: SAT's perturbation with random signs only (a = 1, so p_e = 0 at every epoch).
CONTROL = "noise-only"
#: run name → (recipe, recipe options). ε = 8/255 for every adversarial recipe. SAT runs other than
#: the control get the compressed curriculum, PGD runs an ε warm-up (see :func:`run_demo`).
#: gradnorm's λ = 0.1 is 100× the library's default (Etmann's MNIST setting): at 1e-3 the penalty
#: barely changes a 10-epoch run, at 0.1 its effect on robustness is visible.
DEMO_RECIPES: dict[str, tuple[str, dict]] = {
    "standard": ("standard", {}),
    "gradnorm": ("gradnorm", {"lam": 0.1}),
    CONTROL: ("sat", {"maps": "boxes", "a": 1.0}),
    "sat-boxes": ("sat", {"maps": "boxes"}),
    "sat-masks": ("sat", {"maps": "masks"}),
    "pgd": ("pgd", {"steps": 5}),
    "sat+pgd": ("sat+pgd", {"maps": "boxes"}),
}
EVAL_EPS = (2 / 255, 4 / 255, 8 / 255)
#: δ of the "fails" verdict (robust AUC and clean accuracy units), stated before any result.
MARGIN = 0.02
#: The demo's sizes (counts; image_size in pixels). Sized for about 10 minutes on 2 CPU cores with 3
#: seeds: standard training reaches >= 0.90 clean accuracy here, so differences in robustness can show.
FULL_SIZES = {"epochs": 10, "n_train": 2500, "n_test": 1000, "n_analysis": 200, "image_size": 16, "num_classes": 4,
              "width": 16, "eval_steps": 10, "seeds": 3}
#: ``quick=True``'s sizes: it checks the pipeline, not the numbers (PGD-2 and a short DeepFool keep it to seconds).
QUICK_SIZES = {"epochs": 1, "n_train": 64, "n_test": 16, "n_analysis": 16, "image_size": 12, "num_classes": 4,
               "width": 4, "eval_steps": 2, "seeds": 2}


def compressed_curriculum(epochs: int, a: float = 0.6, length: int = 100) -> float:
    """The curriculum base a' for which SAT's p_e = 1 − a'^(e/10) ends an ``epochs``-long run where
    the authors' ``length``-epoch run with base ``a`` ends: a' = a^(length/epochs) (0.6^10 ≈ 0.006
    for 10 epochs, so p goes 0, 0.4, 0.64, … 0.99 instead of staying below 0.37)."""
    epochs = positive_int(epochs, "epochs")
    return number(a, "a", minimum=0, exclusive_min=True, maximum=1) ** (positive_int(length, "length") / epochs)


def _options(recipe: str, options: dict, epochs: int) -> dict:
    """The demo's recipe options at ``epochs``: the compressed curriculum for SAT runs that do not
    set ``a`` (the control sets a = 1), an ε warm-up over the first third for the PGD ones."""
    options = dict(options)
    if recipe in ("sat", "sat+pgd"):
        options.setdefault("a", compressed_curriculum(epochs))
    if recipe in ("pgd", "sat+pgd"):
        options.setdefault("eps_warmup", epochs // 3)
    return options


def _model(num_classes: int, width: int, train: data.AnnotatedDataset) -> torch.nn.Module:
    # Madry's CNN: learns these shapes to >= 0.90 clean accuracy in 10 epochs, affordable on a CPU.
    return models.create("madrycnn", num_classes=num_classes, width=width, mean=train.mean, std=train.std)


def cost_vs_standard(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Run name → its training CPU time relative to standard's in the same seed, averaged over the
    seeds (``runs``: name → one dict per seed with ``train_cpu_s``); {} without a standard run."""
    if "standard" not in runs:
        return {}
    return {name: statistics.fmean(r["train_cpu_s"] / b["train_cpu_s"] for r, b in zip(rs, runs["standard"], strict=True))
            for name, rs in runs.items()}


def comparisons(names: list[str]) -> list[tuple[str, str, str, str]]:
    """The comparisons the demo judges among the runs ``names``: every run against standard, the
    SAT runs against the noise-only control, SAT+PGD against PGD — (id, text, run, reference)."""
    out = [(f"{name} vs standard", f"{name} beats standard training", name, "standard")
           for name in names if name != "standard" and "standard" in names]
    if CONTROL in names:
        out += [(f"{name} vs {CONTROL}", f"{name}'s map beats random signs", name, CONTROL)
                for name in names if DEMO_RECIPES[name][0] == "sat" and name != CONTROL]
    if "sat+pgd" in names and "pgd" in names:
        out.append(("sat+pgd vs pgd", "SAT+PGD beats PGD training", "sat+pgd", "pgd"))
    return out


def run_demo(
    *,
    quick: bool = False,
    epochs: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    seeds: int | None = None,
    recipes: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    out_dir: str | Path = "runs/demo",
) -> Path:
    """Train, evaluate and analyse the demo recipes; write ``out_dir``/report.md and report.html.

    Args:
        quick: :data:`QUICK_SIZES` (seconds; for tests) instead of :data:`FULL_SIZES`. epochs,
            n_train, n_test, image_size (pixels), seeds: override those sizes. Etmann's α and ρ are
            measured on the first ``n_analysis`` test images of the first seed.
        recipes: subset of :data:`DEMO_RECIPES` (default all seven, in that order).
        seed: the first seed (seeds seed, seed + 1, ...: data, weights and training).
        device: "auto" (cuda if available), "cpu", ...

    Returns:
        Path of report.md (report.html and the figures sit next to it).
    """
    sizes = dict(QUICK_SIZES if quick else FULL_SIZES)
    for key, value in (("epochs", epochs), ("n_train", n_train), ("n_test", n_test), ("image_size", image_size),
                       ("seeds", seeds)):
        if value is not None:
            sizes[key] = positive_int(value, key)
    names = list(DEMO_RECIPES) if recipes is None else [choice(n, "recipes", list(DEMO_RECIPES)) for n in recipes]
    if not names:
        raise ValueError(f"recipes: expected at least one of {list(DEMO_RECIPES)}, got none")
    seed = check_seed(seed)
    dev = check_device(device)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    classes = sizes["num_classes"]
    look = {"size": sizes["image_size"], "num_classes": classes, "clutter": False, "polarity": "light"}
    # The saliency grid's SmoothGrad and IG dominate the analysis of a tiny run; quick mode trims them.
    grid = {"grid_samples": 6}
    if quick:
        grid = {"grid_samples": 2, "smoothgrad_kwargs": {"n_samples": 4}, "ig_kwargs": {"steps": 8},
                "deepfool_kwargs": {"steps": 10, "bisection_steps": 5}}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for s in range(seed, seed + sizes["seeds"]):
        train_set = data.shapes(sizes["n_train"], seed=s, **look)
        test_set = data.shapes(sizes["n_test"], seed=s + 10_000, **look)
        test_batch = (test_set.images.float().div(255).to(dev), test_set.labels.to(dev))
        for name in names:
            recipe, options = DEMO_RECIPES[name]
            options = _options(recipe, options, sizes["epochs"])
            torch.manual_seed(s)
            model = _model(classes, sizes["width"], train_set).to(dev)
            # Only the first seed keeps its run folders (checkpoints, logs): the others are for the statistics.
            with one_thread():  # its CPU time is then the work alone, whatever else runs
                cpu_started = time.process_time()
                history = fit(
                    model, train_set, recipe=recipe, recipe_options=options, epochs=sizes["epochs"], batch_size=64,
                    optimizer="adam", lr=2e-3, weight_decay=0.0, schedule="cosine", seed=s, augment=False,
                    out_dir=out_dir / name if s == seed else None, progress=False,
                ).history
                train_cpu_s = time.process_time() - cpu_started
            metrics = evaluate(model, test_batch, eps=EVAL_EPS, steps=sizes["eval_steps"])
            run = {"recipe": recipe, "options": options, "train_s": sum(row["seconds"] for row in history),
                   "train_cpu_s": train_cpu_s,
                   "train_acc": history[-1]["train_acc"], "clean": metrics["clean_acc"],
                   "pgd": {row["eps"]: row["acc"] for row in metrics["attacks"]["pgd"]}}
            run["auc"] = statistics.fmean(run["pgd"].values())
            if s == seed:
                n_analysis = min(sizes["n_analysis"], sizes["n_test"])
                analysis = analyze(model, (test_batch[0][:n_analysis], test_batch[1][:n_analysis]),
                                   out_dir=out_dir / name / "analysis", **grid)
                run.update(median_alpha=analysis.summary["median_alpha"], median_rho=analysis.summary["median_rho"],
                           spearman=analysis.summary["spearman_alpha_rho"], files=analysis.files)
            runs[name].append(run)
    wall = time.perf_counter() - started
    curves = {n: [(0.0, statistics.fmean(r["clean"] for r in rs))]
              + [(e, statistics.fmean(r["pgd"][e] for r in rs)) for e in EVAL_EPS] for n, rs in runs.items()}
    bands = {n: [(0.0, min(r["clean"] for r in rs), max(r["clean"] for r in rs))]
             + [(e, min(r["pgd"][e] for r in rs), max(r["pgd"][e] for r in rs)) for e in EVAL_EPS] for n, rs in runs.items()}
    figure = robustness_curves(out_dir / "robustness_vs_eps.png", curves, bands,
                               title=f"mean over {sizes['seeds']} seeds; band: their range", attack=f"PGD-{sizes['eval_steps']}")
    markdown = _markdown(runs, sizes, dev, wall, figure.relative_to(out_dir), out_dir)
    md, _ = write_report(out_dir, markdown)
    return md


def _spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _markdown(runs: dict[str, list[dict]], sizes: dict, device: torch.device, wall: float, curves: Path,
              out_dir: Path) -> str:
    rows = []
    costs = cost_vs_standard(runs)
    for name, rs in runs.items():
        first = rs[0]
        rows.append({
            "run": name, "recipe": first["recipe"], "train s": statistics.fmean(r["train_s"] for r in rs),
            "cost vs standard": costs.get(name), "train acc (own inputs)": _spread([r["train_acc"] for r in rs]),
            "clean acc": _spread([r["clean"] for r in rs]),
            **{f"PGD {round(e * 255)}/255": _spread([r["pgd"][e] for r in rs]) for e in EVAL_EPS},
            "robust AUC": _spread([r["auc"] for r in rs]),
            "median α": first["median_alpha"], "median ρ": first["median_rho"], "Spearman(α, ρ)": first["spearman"],
        })
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    generated = (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {device} ({machine}), "
                 f"torch {torch.__version__}. Total wall time {wall:.1f} s.")
    a = compressed_curriculum(sizes["epochs"])
    warmup = _options("pgd", {}, sizes["epochs"])["eps_warmup"]
    setup = (f"Data: built-in shapes, {sizes['num_classes']} classes, {sizes['image_size']}×{sizes['image_size']} px, no "
             "clutter, the object lighter than its background on every channel (so SAT's −ε·S lowers its contrast); "
             f"{sizes['n_train']} training and {sizes['n_test']} test images per seed. {sizes['seeds']} seeds: each "
             "draws its own data and initial weights, the same for every run. Model: Madry et al.'s CNN of width "
             f"{sizes['width']}. Training: {sizes['epochs']} epochs per recipe, Adam (lr 2e-3, cosine), batch 64, "
             "no augmentation; ε = 8/255 for every adversarial recipe (pgd: 5 steps of 2/255, ε ramped up linearly "
             f"over the first {warmup} epochs; sat: the authors' 100-epoch curriculum p_e = 1 − 0.6^(e/10) compressed "
             f"to {sizes['epochs']} epochs, a = 0.6^(100/{sizes['epochs']}) = {a:.3g}, so p rises from 0 to "
             f"{sat_probability(sizes['epochs'] - 1, a):.3f}); `{CONTROL}` is the SAT perturbation with random signs "
             "only (a = 1: the map never used), the control that tells the map's effect from the noise's; "
             "gradnorm λ = 0.1.")
    method = (f"Evaluation: clean and PGD-{sizes['eval_steps']} (step ε/4, random start) accuracy on the "
              f"{sizes['n_test']} test images of each seed (mean ± SD over seeds); robust AUC is the mean over the three "
              "radii. Etmann's alignment α = |⟨x, ∇Ψ⟩|/‖∇Ψ‖ of the predicted logit and the boundary distance ρ "
              "(DeepFool + bisection, L2, pixel units) on the first "
              f"{min(sizes['n_analysis'], sizes['n_test'])} test images of the first seed. Train acc is measured on "
              "each recipe's own training inputs (adversarial or perturbed) during the last epoch. Train s: wall time of "
              "the training (mean over seeds), which the machine's load enters. Cost: the training's CPU time on one "
              "thread relative to `standard` in the same seed, averaged over seeds, which other processes do not "
              "enter.")
    lines = [
        "# fastsat demo report", "", generated, "", setup, "", method, "",
        "## Results", "", markdown_table(list(rows[0]), rows), "",
        "## What the numbers say (computed, not curated)", "",
        *_findings(runs), "",
        "## Robust accuracy against ε", "",
        f"![robust accuracy vs eps]({curves.as_posix()})", "",
    ]
    for name, rs in runs.items():
        lines += [f"## {name}", ""]
        for key in ("scatter", "saliency_grid"):
            lines += [f"![{name} {key}]({rs[0]['files'][key].relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


_PHRASES = {"holds": "higher", "fails": "not higher (the interval lies below +{margin})",
            "inconclusive": "not distinguishable", "floor": "at the floor (0) for both: not weighed",
            "ceiling": "at the ceiling (1) for both: not weighed", "one seed": "one seed: no interval",
            "no spread": "the same difference in every seed: not weighed"}


def _findings(runs: dict[str, list[dict]]) -> list[str]:
    """The verdicts as Markdown list items: robust AUC and clean accuracy, each judged as one Holm family."""
    spec = comparisons(list(runs))
    if not spec:
        return ["- Nothing to compare: the demo ran one recipe."]
    seeds = len(next(iter(runs.values())))
    lines = [(f"Each comparison is the mean paired difference over the {seeds} seeds with its 95% t-interval; "
              f"Holm's correction runs over the {len(spec)} comparisons of each metric. Higher: the interval lies "
              f"above 0; not higher: it lies below the margin δ = {MARGIN} (a difference too small to matter, or a loss); "
              "otherwise not distinguishable."), ""]
    judged = {}
    for metric in ("auc", "clean"):
        values = {name: [r[metric] for r in rs] for name, rs in runs.items()}
        judged[metric] = judge_claims(spec, values, margin=MARGIN)
    for robust, clean in zip(judged["auc"], judged["clean"], strict=True):
        lines.append(f"- {robust.arm} vs {robust.reference}: robust AUC {_phrase(robust)}; clean accuracy {_phrase(clean)}.")
    return lines


def _phrase(c: ClaimResult) -> str:
    verdict = _PHRASES[c.verdict].format(margin=MARGIN)
    if c.verdict in ("floor", "ceiling", "one seed", "no spread"):
        return f"{verdict} (Δ = {c.effect:+.3f})"
    p = c.p_fails_adjusted if c.verdict == "fails" else c.p_holds_adjusted
    return f"{verdict} (Δ = {c.effect:+.3f}, 95% interval [{c.low:+.3f}, {c.high:+.3f}], Holm-adjusted p = {p:.3g})"
