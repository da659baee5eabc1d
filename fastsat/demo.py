"""``fastsat demo``: seven runs, the same budget, one report.

On the built-in shapes data (train and test from different seeds) it trains ``standard``,
``gradnorm``, a ``noise-only`` control (SAT with the map replaced by random signs), ``sat`` with
boxes, ``sat`` with masks, ``pgd`` and ``sat+pgd`` for the same number of epochs from the same
initial weights, evaluates each (clean accuracy and PGD-10 accuracy at ε ∈ {2, 4, 8}/255 on
``n_test`` images; Etmann's α and ρ with their Spearman correlation on the first ``n_analysis``)
and writes ``report.md`` / ``report.html`` with the measured numbers, figures and findings decided
from the numbers (:func:`findings`). SAT's curriculum is compressed to the run length
(:func:`compressed_curriculum`) and the PGD recipes ramp ε up over the first third of the epochs
(``eps_warmup``: without it the small network's PGD training stalls at chance). The default size
runs in under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from fastsat import data, models
from fastsat._checks import choice, number, positive_int
from fastsat._checks import device as check_device
from fastsat._checks import seed as check_seed
from fastsat.evaluate import evaluate
from fastsat.report import analyze, markdown_table, robustness_curves, write_report
from fastsat.train import fit, sat_probability

__all__ = [
    "CONTROL",
    "DEMO_RECIPES",
    "EVAL_EPS",
    "VERDICTS",
    "Comparison",
    "Finding",
    "compare",
    "compressed_curriculum",
    "findings",
    "run_demo",
    "sat_verdicts",
]

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
# Sized so that all seven runs, evaluation and analysis fit 10 minutes on 2 CPU cores. 2,000 test
# images: a difference of two accuracies near 0.5 then has a standard error of 1.6 points (2 SE = 3.2),
# so the differences the findings call out are beyond their noise.
_FULL = {"epochs": 10, "n_train": 3000, "n_test": 2000, "n_analysis": 200, "image_size": 16, "num_classes": 4,
         "width": 8, "eval_steps": 10}
# Quick mode checks the pipeline, not the numbers: PGD-2 and a short DeepFool keep it to seconds.
_QUICK = {"epochs": 1, "n_train": 64, "n_test": 16, "n_analysis": 16, "image_size": 12, "num_classes": 4, "width": 4,
          "eval_steps": 2}


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


def _model(num_classes: int, width: int) -> torch.nn.Module:
    # PreActResNet-18 at 1/8 width: learns the shapes within a few epochs, affordable on a CPU.
    return models.create("preactresnet18", num_classes=num_classes, width=width)


def run_demo(
    *,
    quick: bool = False,
    epochs: int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    recipes: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    out_dir: str | Path = "runs/demo",
) -> Path:
    """Train, evaluate and analyse the demo recipes; write ``out_dir``/report.md and report.html.

    Args:
        quick: tiny sizes (seconds; for tests). epochs, n_train, n_test, image_size (pixels):
            override the sizes (defaults 10, 3000, 2000, 16; quick 1, 64, 16, 12). Etmann's α and
            ρ are measured on the first 200 test images (quick: 16). The data has 4 classes; the
            model is PreActResNet-18 of width 8 (quick: 4).
        recipes: subset of :data:`DEMO_RECIPES` (default all seven, in that order).
        seed: data, weights and training seed. device: "auto" (cuda if available), "cpu", ...

    Returns:
        Path of report.md (report.html and the figures sit next to it).
    """
    sizes = dict(_QUICK if quick else _FULL)
    for key, value in (("epochs", epochs), ("n_train", n_train), ("n_test", n_test), ("image_size", image_size)):
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
    train_set = data.shapes(sizes["n_train"], size=sizes["image_size"], num_classes=classes, seed=seed)
    test_set = data.shapes(sizes["n_test"], size=sizes["image_size"], num_classes=classes, seed=seed + 1)
    test_batch = (test_set.images.float().div(255).to(dev), test_set.labels.to(dev))
    n_analysis = min(sizes["n_analysis"], sizes["n_test"])
    analysis_batch = (test_batch[0][:n_analysis], test_batch[1][:n_analysis])

    # The saliency grid's SmoothGrad and IG dominate the analysis of a tiny run; quick mode trims them.
    grid = {"grid_samples": 6}
    if quick:
        grid = {"grid_samples": 2, "smoothgrad_kwargs": {"n_samples": 4}, "ig_kwargs": {"steps": 8},
                "deepfool_kwargs": {"steps": 10, "bisection_steps": 5}}
    results = {}
    for name in names:
        recipe, options = DEMO_RECIPES[name]
        options = _options(recipe, options, sizes["epochs"])
        torch.manual_seed(seed)
        model = _model(classes, sizes["width"]).to(dev)
        run_started = time.perf_counter()
        history = fit(
            model, train_set, recipe=recipe, recipe_options=options, epochs=sizes["epochs"], batch_size=64,
            optimizer="adam", lr=2e-3, weight_decay=0.0, schedule="cosine", seed=seed, augment=False,
            out_dir=out_dir / name, progress=False,
        ).history
        train_seconds = sum(row["seconds"] for row in history)
        metrics = evaluate(model, test_batch, eps=EVAL_EPS, steps=sizes["eval_steps"])
        analysis = analyze(model, analysis_batch, out_dir=out_dir / name / "analysis", **grid)
        results[name] = {
            "recipe": recipe, "control": name == CONTROL, "options": options, "train_seconds": train_seconds, "total_seconds": time.perf_counter() - run_started,
            "train_acc": history[-1]["train_acc"], "clean": metrics["clean_acc"],
            "pgd": {row["eps"]: row["acc"] for row in metrics["attacks"]["pgd"]},
            "median_alpha": analysis.summary["median_alpha"], "median_rho": analysis.summary["median_rho"],
            "spearman": analysis.summary["spearman_alpha_rho"], "files": analysis.files,
        }
    wall = time.perf_counter() - started
    curves = robustness_curves(out_dir / "robustness_vs_eps.png",
                               {n: [(0.0, r["clean"]), *r["pgd"].items()] for n, r in results.items()})
    markdown = _markdown(results, sizes, dev, wall, curves.relative_to(out_dir), out_dir)
    md, _ = write_report(out_dir, markdown)
    return md


def _markdown(results: dict, sizes: dict, device: torch.device, wall: float, curves: Path, out_dir: Path) -> str:
    base = results.get("standard")
    rows = []
    for name, r in results.items():
        rows.append({
            "run": name, "recipe": r["recipe"], "train s": r["train_seconds"],
            "cost vs standard": r["train_seconds"] / base["train_seconds"] if base else None,
            "train acc (own inputs)": r["train_acc"], "clean acc": r["clean"],
            **{f"PGD {round(e * 255)}/255": acc for e, acc in r["pgd"].items()},
            "median α": r["median_alpha"], "median ρ": r["median_rho"], "Spearman(α, ρ)": r["spearman"],
        })
    columns = list(rows[0])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    generated = (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on {device} ({machine}), "
                 f"torch {torch.__version__}. Total wall time {wall:.1f} s.")
    a = compressed_curriculum(sizes["epochs"])
    warmup = _options("pgd", {}, sizes["epochs"])["eps_warmup"]
    setup = (f"Data: built-in shapes, {sizes['num_classes']} classes, {sizes['n_train']} training and {sizes['n_test']} test images of "
             f"{sizes['image_size']}×{sizes['image_size']} px (different seeds). Model: PreActResNet-18 of width "
             f"{sizes['width']}, the same initial "
             f"weights for every run. Training: {sizes['epochs']} epochs per recipe, Adam (lr 2e-3, cosine), batch 64, "
             "no augmentation; ε = 8/255 for every adversarial recipe (pgd: 5 steps of 2/255, ε ramped up linearly "
             f"over the first {warmup} epochs; sat: the authors' 100-epoch curriculum p_e = 1 − 0.6^(e/10) compressed "
             f"to {sizes['epochs']} epochs, a = 0.6^(100/{sizes['epochs']}) = {a:.3g}, so p rises from 0 to "
             f"{sat_probability(sizes['epochs'] - 1, a):.3f}); `{CONTROL}` is the SAT perturbation with random signs "
             "only (a = 1: the map never used), the control that tells the map's effect from the noise's; "
             "gradnorm λ = 0.1.")
    method = (f"Evaluation: clean and PGD-{sizes['eval_steps']} (step ε/4, random start) accuracy on all "
              f"{sizes['n_test']} test images; the Etmann alignment α = |⟨x, ∇Ψ⟩|/‖∇Ψ‖ of the predicted logit and "
              "the boundary distance ρ (DeepFool + bisection, L2, pixel units) on the first "
              f"{min(sizes['n_analysis'], sizes['n_test'])} of them. "
              "Train acc is measured on each recipe's own training inputs "
              "(adversarial or perturbed) during the last epoch. Cost = training wall time relative to `standard` on "
              "this machine; it is only as steady as the machine's load (see bench/bench_e2e.py for controlled "
              "throughput).")
    lines = [
        "# fastsat demo report",
        "",
        generated,
        "",
        setup,
        "",
        method,
        "",
        "## Results",
        "",
        markdown_table(columns, rows),
        "",
        "## What the numbers say (computed, not curated)",
        "",
        (f"Each difference of two accuracies on the {sizes['n_test']} test images is called higher or lower only "
        "when it exceeds two standard errors (binomial, sqrt((a(1−a) + b(1−b))/n)); "
        f"near accuracy 0.5 one SE is {100 * math.sqrt(0.5 / sizes['n_test']):.1f} points."),
        "",
        *_findings(results, sizes["n_test"]),
        "",
        "## Robust accuracy against ε",
        "",
        f"![robust accuracy vs eps]({curves.as_posix()})",
        "",
    ]
    for name, r in results.items():
        lines += [f"## {name}", ""]
        for key in ("scatter", "saliency_grid"):
            lines += [f"![{name} {key}]({r['files'][key].relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


class Comparison(NamedTuple):
    """Two accuracies measured on the same n test images, and what their difference says.

    value, reference: the accuracies (fractions of n). difference: value − reference.
    standard_error: of that difference, sqrt((value(1 − value) + reference(1 − reference)) / n)
    (binomial standard errors of the two, combined as if independent). verdict: one of
    :data:`VERDICTS` — "equal" when the difference is 0; "higher" / "lower" when it exceeds two
    standard errors; "indistinguishable" otherwise.
    """

    value: float
    reference: float
    difference: float
    standard_error: float
    verdict: str


VERDICTS = ("higher", "lower", "indistinguishable", "equal")


def compare(value: float, reference: float, n: int) -> Comparison:
    """Compare two accuracies on ``n`` test images (see :class:`Comparison`)."""
    value = number(value, "value", minimum=0, maximum=1)
    reference = number(reference, "reference", minimum=0, maximum=1)
    n = positive_int(n, "n")
    se = math.sqrt((value * (1 - value) + reference * (1 - reference)) / n)
    diff = value - reference
    if diff == 0:
        verdict = "equal"
    elif abs(diff) <= 2 * se:
        verdict = "indistinguishable"
    else:
        verdict = "higher" if diff > 0 else "lower"
    return Comparison(value, reference, diff, se, verdict)


class Finding(NamedTuple):
    """One run against a reference run on one metric ("pgd": accuracy under the strongest PGD of
    :data:`EVAL_EPS`; "clean": clean accuracy)."""

    run: str
    reference: str
    metric: str
    comparison: Comparison


def findings(results: dict, n: int) -> list[Finding]:
    """Every run against ``standard`` and against ``pgd``, and the SAT runs against the
    noise-only :data:`CONTROL` (those present), on PGD-8/255 and clean accuracy. results: run name →
    {"recipe", "clean", "pgd": {ε: accuracy}, optional "control": bool} (as :func:`run_demo`
    collects them); n: test images."""
    strongest = max(EVAL_EPS)
    out = []
    for reference in ("standard", CONTROL, "pgd"):
        if reference not in results:
            continue
        ref = results[reference]
        for name, r in results.items():
            if name != reference and (reference != CONTROL or r["recipe"] == "sat"):
                out.append(Finding(name, reference, "pgd", compare(r["pgd"][strongest], ref["pgd"][strongest], n)))
                out.append(Finding(name, reference, "clean", compare(r["clean"], ref["clean"], n)))
    return out


def sat_verdicts(results: dict, found: list[Finding], reference: str = "standard") -> dict[str, str]:
    """SAT-alone run (recipe "sat", the control excluded) → its verdict against ``reference``
    ("standard", or :data:`CONTROL`) on PGD-8/255 accuracy."""
    return {f.run: f.comparison.verdict for f in found
            if f.reference == reference and f.metric == "pgd" and results[f.run]["recipe"] == "sat"
            and not results[f.run].get("control", False)}


def _phrase(c: Comparison) -> str:
    if c.verdict == "equal":
        return f"{c.value:.3f} is equal to {c.reference:.3f}"
    if c.verdict == "indistinguishable":
        return (f"{c.value:.3f} is not distinguishable (Δ = {100 * c.difference:+.1f} points, "
                f"2 SE = {200 * c.standard_error:.1f}) from {c.reference:.3f}")
    return f"{c.value:.3f} is {100 * abs(c.difference):.1f} points {c.verdict} than {c.reference:.3f}"


def _findings(results: dict, n: int) -> list[str]:
    """The findings as Markdown list items, rendered from the verdicts of :func:`findings`."""
    label = f"PGD-{round(max(EVAL_EPS) * 255)}/255"
    found = findings(results, n)
    by_pair = {(f.run, f.reference, f.metric): f.comparison for f in found}
    lines = [f"- {run} vs {reference}: {label} accuracy {_phrase(c)}; "
             f"clean accuracy {_phrase(by_pair[(run, reference, 'clean')])}."
             for (run, reference, metric), c in by_pair.items() if metric == "pgd"]
    sat = sat_verdicts(results, found)
    helped = [name for name, verdict in sat.items() if verdict == "higher"]
    not_helped = [name for name, verdict in sat.items() if verdict != "higher"]
    if helped:
        lines.append(f"- SAT alone raised {label} accuracy over standard training beyond noise here: {', '.join(helped)}.")
    if not_helped:
        lines.append(f"- SAT alone did not raise {label} accuracy over standard training beyond noise here: "
                     f"{', '.join(not_helped)}.")
    if CONTROL in results:
        versus = sat_verdicts(results, found, CONTROL)
        beat = [name for name, verdict in versus.items() if verdict == "higher"]
        tied = [name for name, verdict in versus.items() if verdict != "higher"]
        if beat:
            lines.append(f"- The map mattered (SAT beat its random-sign {CONTROL} control on {label} accuracy beyond "
                         f"noise): {', '.join(beat)}.")
        if tied:
            lines.append(f"- The map did not matter beyond noise (SAT did not beat the {CONTROL} control on {label} "
                         f"accuracy): {', '.join(tied)}.")
    return lines
