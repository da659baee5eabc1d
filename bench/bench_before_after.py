"""One training step of fastsat before and after a change, timed side by side on one machine.

    git worktree add /tmp/old a7833d1 && (cd /tmp/old && ../main/.venv/bin/python setup.py build_ext --inplace)
    python bench/bench_before_after.py --old-repo /tmp/old
    python bench/bench_before_after.py --old-repo /tmp/old --compile --works pgd,fast   # both compiled

Old and new run in separate processes (each imports its own fastsat), alternating old, new, old,
new, ... so that load on the machine hits both alike; the median per work is reported. The step is
what each version's trainer runs per batch in a steady-state epoch: before issue 8,
``recipe.train_step`` (the trainer added the LR schedule's step); after, ``Trainer.train_step``
inside ``no_host_checks()``. CPU, fp32, MadryCNN (the old SmallCNN) width 16, 32×32, batch 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKS = {"pgd": ("pgd", {"steps": 10}), "fast": ("fast", {}), "sat": ("sat", {"maps": "boxes"}),
         "standard": ("standard", {})}
CHILD = r"""
import json, sys, time, torch
torch.set_flush_denormal(True)
from fastsat import models
from fastsat.data import shapes
import fastsat.train as T
work, options, steps, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
compile_model = sys.argv[5] == "1"
EPOCH = 3
name = "smallcnn" if "smallcnn" in models.names() else "madrycnn"
data = shapes(batch * steps, size=32, num_classes=10, seed=0)
batches = [{"image": data.images[i * batch:(i + 1) * batch].float().div(255), "label": data.labels[i * batch:(i + 1) * batch],
            "box": data.boxes[i * batch:(i + 1) * batch]} for i in range(steps)]
torch.manual_seed(0)
model = models.create(name, num_classes=10, width=16)
if hasattr(T, "Trainer"):
    from fastsat._checks import no_host_checks
    trainer = T.Trainer(model, batches, T.TrainConfig(recipe=work, recipe_options=options, epochs=EPOCH + 1,
                                                      lr=0.01, early_stop_drop=None, progress=False,
                                                      compile=compile_model))
    def run():
        with no_host_checks():
            for b in batches:
                trainer.train_step(dict(b), EPOCH)
else:
    recipe = T.make_recipe(work, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    def run():
        for b in batches:
            recipe.train_step(model, dict(b), opt, epoch=EPOCH)
run()  # warm-up
times = []
for _ in range(3):
    started = time.perf_counter(); run(); times.append((time.perf_counter() - started) / steps)
print(json.dumps(min(times)))
"""


def time_step(repo: Path, work: str, steps: int, batch: int, compile_model: bool) -> float:
    name, options = WORKS[work]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", CHILD, name, json.dumps(options), str(steps), str(batch),
                          str(int(compile_model))],
                         env=env, capture_output=True, text=True, check=True, cwd=repo)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-repo", type=Path, required=True, help="a built checkout of the older commit")
    parser.add_argument("--new-repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=3, help="alternating old/new process pairs per work")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--works", default=",".join(WORKS), help=f"comma-separated subset of {tuple(WORKS)}")
    parser.add_argument("--compile", action="store_true", help="both trainers with compile=True (the trainer "
                        "versions only; the warm-up step compiles)")
    args = parser.parse_args()
    works = args.works.split(",")
    if unknown := sorted(set(works) - set(WORKS)):
        parser.error(f"--works: unknown {unknown}")
    print("| work | before ms/step | after ms/step | after / before time |\n|---|---|---|---|")
    for work in works:
        old, new = [], []
        for _ in range(args.rounds):
            old.append(time_step(args.old_repo, work, args.steps, args.batch, args.compile))
            new.append(time_step(args.new_repo, work, args.steps, args.batch, args.compile))
        before, after = statistics.median(old), statistics.median(new)
        print(f"| {work} | {before * 1e3:.1f} | {after * 1e3:.1f} | {after / before:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
