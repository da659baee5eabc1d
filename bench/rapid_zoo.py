"""Validation of ``suite="rapid"`` against ``suite="standard"`` on a zoo of models.

The gate, written before the results: rapid counts as validated when, on every zoo model at both
of its radii, its robust accuracy is within 0.5 accuracy points (0.005) of the standard suite's on
the same points, and on both gradient-masking models its checks raise at least one flag. A model
where it falls outside is reported, not dropped.

The zoo (:func:`bench.eval_models.zoo`): scikit-learn's digits (8x8, radii 0.03 and 0.1) and the
shapes (16 px, 4 classes, radii 4/255 and 8/255), each with Madry et al.'s CNN trained by
standard, gradnorm, pgd, trades, fast and sat+pgd (12 models), plus the digits standard model
behind a quantised input and behind a saturated softmax (the masked models the tests build).
Both suites run at their defaults (AutoAttack's iterations, targets and queries; rapid's), with
their masking checks, on the whole test split (449 digits, 500 shapes). Forward images are
counted around the model; times are wall times on the machine named in the results.

Usage::

    python bench/rapid_zoo.py             # CPU, whole test splits, 2 worker processes
    python bench/rapid_zoo.py --points 200
    python bench/rapid_zoo.py --quick     # 2 models, few points: the pipeline, not the numbers

Writes ``bench/results/rapid-zoo-<date>-<device>[-quick].md`` and ``.json``; trained weights are
cached in ``bench/.cache/zoo`` (delete it to retrain).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastsat.evaluate import evaluate
from fastsat.report import markdown_table

try:
    from bench.eval_models import Counted, zoo
except ImportError:  # run as a script
    from eval_models import Counted, zoo

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache" / "zoo"
TOLERANCE = 0.005  # the gate: 0.5 accuracy points


def run(model: Counted, x: torch.Tensor, y: torch.Tensor, eps: float, suite: str) -> dict:
    model.reset()
    started = time.perf_counter()
    report = evaluate(model, (x, y), suite=suite, eps=[eps], attacks=(), batch_size=len(x))
    return {"acc": report[suite][0]["acc"], "flags": report["masking"]["flags"],
            "forward": model.forward_images / len(x), "seconds": time.perf_counter() - started,
            "clean": report["clean_acc"]}


def validate_one(index: int, radius: int, points: int | None) -> dict:
    """One zoo member at one of its radii: both suites on its first ``points`` test points (None:
    all). Runs in a worker process on one thread; the zoo is read from the cache."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, testbed, net, masked = zoo(CACHE)[index]
    _, test = testbed.load()
    points = len(test) if points is None else min(points, len(test))
    x, y = test.images[:points].float().div(255), test.labels[:points]
    model = Counted(net).eval()
    eps = testbed.radii[radius]
    standard, rapid = run(model, x, y, eps, "standard"), run(model, x, y, eps, "rapid")
    within = abs(rapid["acc"] - standard["acc"]) <= TOLERANCE + 1e-12
    return {"model": name, "ε": round(eps, 4), "points": points, "clean": standard["clean"],
            "standard": standard["acc"], "rapid": rapid["acc"], "rapid − standard": rapid["acc"] - standard["acc"],
            "within 0.5 pt": within, "forward ratio": rapid["forward"] / standard["forward"],
            "time ratio": rapid["seconds"] / standard["seconds"], "standard s": standard["seconds"],
            "rapid s": rapid["seconds"], "standard flags": ", ".join(standard["flags"]) or "none",
            "rapid flags": ", ".join(rapid["flags"]) or "none", "masked": masked}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 models, 16 points: checks the pipeline")
    parser.add_argument("--points", type=int, default=None, help="test points per model (default: the whole split)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    members = zoo(CACHE)  # trains what the cache lacks, once, before the workers read it
    indices = [0, len(members) - 1] if args.quick else range(len(members))
    points = 16 if args.quick else args.points
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d}-cpu{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f"rapid-zoo-{stamp}.jsonl"  # one line per finished row: a cut-off run keeps its rows
    partial.write_text("")
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(validate_one, i, r, points) for i in indices for r in (0, 1)]
        for job in as_completed(jobs):
            row = job.result()
            rows.append(row)
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    order = {name: k for k, (name, *_rest) in enumerate(members)}
    rows.sort(key=lambda r: (order[r["model"]], r["ε"]))
    plain = [r for r in rows if not r["masked"]]
    masked_ok = all(r["rapid flags"] != "none" for r in rows if r["masked"])
    outside = [f"{r['model']} at ε = {r['ε']}" for r in plain if not r["within 0.5 pt"]]
    verdict = ("validated: within 0.5 points on every zoo model and radius, and the masked models flagged"
               if not outside and masked_ok else
               "not validated: " + "; ".join(outside + ([] if masked_ok else ["a masked model raised no flag"])))
    meta = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": "cpu",
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "quick": args.quick, "wall_s": time.perf_counter() - started,
            "load": os.getloadavg(), "verdict": verdict}
    (args.out / f"rapid-zoo-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ratios = [r["time ratio"] for r in plain]
    md = args.out / f"rapid-zoo-{stamp}.md"
    md.write_text("\n".join([
        "# suite=\"rapid\" against suite=\"standard\" on the zoo (bench/rapid_zoo.py)", "",
        (f"Generated {meta['generated']} on cpu ({meta['machine']}), torch {meta['torch']}; wall time "
         f"{meta['wall_s']:.0f} s; load average at the end {meta['load'][0]:.2f} (times shared with other work)."), "",
        ("Gate (stated before the results): |rapid − standard| ≤ 0.005 on every model and radius; the masked models "
         "flagged by rapid's checks."), "",
        (f"**Verdict: {verdict}.** Rapid's wall time over standard's: median "
         f"{sorted(ratios)[len(ratios) // 2]:.3f}, range {min(ratios):.3f}–{max(ratios):.3f} over {len(ratios)} rows."), "",
        markdown_table(list(rows[0]), rows), ""]))
    print(f"wrote {md}: {verdict}")
    return md


if __name__ == "__main__":
    main()
