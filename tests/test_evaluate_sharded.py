"""fastsat.evaluate sharded over torch.distributed ranks: two CPU processes over gloo (spawned by
the test, localhost) each attack their contiguous share of the data and every rank returns the
numbers of a single-process evaluation of the same data."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastsat import _dist
from fastsat.data import shapes
from fastsat.evaluate import evaluate

WORLD = 2
N = 21  # odd: the two shares differ in size
TIMEOUT_S = 120


class Counting(nn.Module):
    """Counts the sample rows of every forward pass."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


def _binary_linear() -> nn.Module:
    # Two classes, linear: the CE gradient points along ±(w₁ − w₀) everywhere, so PGD and APGD reach
    # the same corner of the ball from any random start, and their last gradient's alignment does
    # not depend on where they started: the results do not depend on the random draws.
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()


def _evaluations() -> tuple[list[dict], int]:
    """The same evaluations in every process: an (x, y) pair, a list of batches (read whole by every
    rank, split batch by batch) and a map-style dataset (cut into rank shares before loading);
    plus the rows this rank's forward passes saw on the dataset."""
    torch.set_num_threads(1)
    model = _binary_linear()
    gen = torch.Generator().manual_seed(2)
    x = 0.3 + 0.4 * torch.rand(N, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = 1 - y[:3]
    options = {"eps": [0.0, 0.02], "attacks": ["pgd", "apgd-ce"], "steps": 12, "batch_size": 4}
    reports = [
        evaluate(model, (x, y), **options),
        evaluate(model, [(x[i : i + 5], y[i : i + 5]) for i in range(0, N, 5)], **options, max_samples=N - 2),
    ]
    torch.manual_seed(0)
    net = Counting(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 3)))
    data = shapes(N, size=8, num_classes=3, seed=0, cache_dir=False)
    reports.append(evaluate(net, data, eps=[0.0], batch_size=4, max_samples=N - 1))
    for report in reports:
        report.pop("seconds", None), report.pop("points_per_s", None)
    return reports, net.rows


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        reports, rows = _evaluations()
        torch.save({"reports": reports, "rows": rows}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-15)  # sums added in another order
    return a == b


@pytest.mark.usefixtures("one_thread")  # _evaluations sets one thread; the fixture restores the count
def test_two_ranks_return_the_single_process_numbers(tmp_path):
    assert not _dist.initialized()
    single, single_rows = _evaluations()
    out = str(tmp_path / "result")
    context = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish in time"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]
    for rank in ranks:
        for sharded, whole in zip(rank["reports"], single, strict=True):
            assert _close(sharded, whole), (sharded, whole)
    assert single[0]["attacks"]["pgd"][1]["acc"] not in (0.0, single[0]["clean_acc"]), "the attack must matter"
    # Each rank ran its forward passes on its own contiguous share only (a clean forward and a
    # saliency pass per batch): 10 and 10 of the first 20 samples, not all 20 each.
    assert [rank["rows"] for rank in ranks] == [2 * len(_dist.shard(N - 1, r, WORLD)) for r in range(WORLD)]
    assert single_rows == 2 * (N - 1)
