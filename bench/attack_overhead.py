"""Where an attack's CPU time goes: the network's own passes against the library's work around them.

On the CPU, per attack of AutoAttack's chain (APGD-T, FAB-T, Square), run on the digits test points
that APGD-CE leaves robust on a PGD-trained Madry CNN (:mod:`bench.eval_models`), one thread:

- CPU seconds in all, in the network's passes (timed inside :class:`bench.eval_models.Counted`)
  and the rest (the library's own: step arithmetic, projections, selections);
- for FAB-T, the share of its iterates that are adversarial (each then needs its own forward at
  the pulled-back point, which is why FAB's check forward cannot be fused with the next gradient).

Each attack runs twice; the faster run is reported. Run it on two checkouts to compare code::

    python bench/attack_overhead.py --label after        # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/attack_overhead.py --label before

Writes ``bench/results/attack-overhead-<date>-cpu[-<label>].md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastsat
from fastsat.attacks import APGD, APGDT, FAB, Square
from fastsat.report import markdown_table

# This script's own bench/ comes first: with another checkout on PYTHONPATH (to time its attacks),
# the models and the timing wrapper must still be these.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_models import TESTBEDS, Counted, cached_model

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent / ".cache" / "zoo"
EPS = 0.1


def adversarial_share(attack: FAB, x: torch.Tensor, y: torch.Tensor) -> float:
    """The mean share of adversarial iterates over FAB's per-iteration checks (the first, at the
    clean points, left out)."""
    shares, check = [], attack._misclassified

    def counted(logits, labels, targeted=False):
        out = check(logits, labels, targeted)
        shares.append(out.float().mean().item())
        return out

    attack._misclassified = counted
    try:
        attack(x, y)
    finally:
        del attack._misclassified
    return statistics.fmean(shares[1:])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200, help="test points before APGD-CE (default 200)")
    parser.add_argument("--queries", type=int, default=2000, help="Square's queries (default 2000)")
    parser.add_argument("--label", default="", help="suffix of the results file (e.g. before)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    testbed = TESTBEDS["digits"]
    _, test = testbed.load()
    net = Counted(cached_model(testbed, "pgd", CACHE)).eval()
    x, y = test.images[: args.points].float().div(255), test.labels[: args.points]
    torch.manual_seed(0)
    robust = ~APGD(net, eps=EPS)(x, y).success
    x, y = x[robust], y[robust]
    attacks = {"APGD-T (3 targets)": APGDT(net, eps=EPS, n_target_classes=3),
               "FAB-T (3 targets)": FAB(net, eps=EPS, n_target_classes=3),
               f"Square ({args.queries} queries)": Square(net, eps=EPS, n_queries=args.queries)}
    rows = []
    for name, attack in attacks.items():
        runs = []
        for _ in range(2):
            net.reset()
            torch.manual_seed(0)
            started = time.process_time()
            success = attack(x, y).success.float().mean().item()
            runs.append((time.process_time() - started, net.network_seconds, success))
        total, network, success = min(runs)
        rows.append({"attack": name, "points": len(y), "CPU s": total, "network CPU s": network,
                     "library CPU s": total - network, "library share": (total - network) / total, "success": success})
    share = adversarial_share(attacks["FAB-T (3 targets)"], x, y)
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d}-cpu{'-' + args.label if args.label else ''}"
    md = args.out / f"attack-overhead-{stamp}.md"
    args.out.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join([
        "# Where an attack's CPU time goes (bench/attack_overhead.py)", "",
        (f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} on cpu ({platform.processor() or platform.machine()}, "
         f"1 thread), torch {torch.__version__}, fastsat from {Path(fastsat.__file__).parent}; PGD-trained digits "
         f"Madry CNN, ε = {EPS}, the {len(y)} of {args.points} test points APGD-CE leaves robust; the faster of two runs."),
        "", markdown_table(list(rows[0]), rows), "",
        f"FAB-T: {share:.3f} of its iterates are adversarial (mean over its per-iteration checks).", ""]))
    print(md.read_text())
    return md


if __name__ == "__main__":
    main()
