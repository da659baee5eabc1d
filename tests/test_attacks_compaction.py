"""Compaction and batched targets in APGD, APGD-T, FAB-T and Square: the same answers as the
uncompacted, one-target-at-a-time runs, with fewer images through the model and one host read per
compaction.

Why exact equality can be asserted: no attack couples the samples of a batch, every random draw is
made over the whole batch before rows are dropped (APGD's and APGD-T's random starts, FAB's
restarts, Square's per-query signs; Square's windows are shared and drawn once per run), and on
the CPU a row's forward and backward do not depend on the other rows of its batch. So a point
that is still running follows bit for bit the trajectory it has in the uncompacted run. A point
that left the batch keeps the point it had reached: its success is the same, its x_adv may be an
earlier misclassified iterate (Square: the same, since a fooled point never moves again).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _host_reads import HostReads
from _models import template_cnn, tiny_cnn

from bench.eval_models import Counted  # counting the images as the benchmarks do
from fastsat.attacks import APGD, APGDT, FAB, Square
from fastsat.attacks.square import p_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """The 4-class CNN of the attack tests (clean accuracy ≈ 0.9) and 48 held-out 1×8×8 images."""
    return template_cnn(classes=4, held_out=48)


EPS = 0.06
ATTACKS = {
    "apgd-ce": lambda m, **kw: APGD(m, eps=EPS, steps=30, **kw),
    "apgd-l2-restarts": lambda m, **kw: APGD(m, eps=0.4, norm="l2", steps=30, restarts=2, **kw),
    "apgd-t": lambda m, **kw: APGDT(m, eps=EPS, steps=30, **kw),
    "apgd-t-restarts": lambda m, **kw: APGDT(m, eps=EPS, steps=20, restarts=2, **kw),
    "fab-t": lambda m, **kw: FAB(m, eps=EPS, steps=30, **kw),
    "fab-t-l2-restarts": lambda m, **kw: FAB(m, eps=0.4, norm="l2", steps=20, restarts=2, **kw),
    "square": lambda m, **kw: Square(m, eps=EPS, n_queries=300, **kw),
    "square-l2": lambda m, **kw: Square(m, eps=0.4, norm="l2", n_queries=300, p_init=0.3, **kw),
}


def _run(make, model, x, y, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(model, **kwargs)(x, y)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_compaction_gives_the_points_still_robust_exactly_the_uncompacted_result(trained, name):
    model, x, y = trained
    whole = _run(ATTACKS[name], model, x, y, compact_every=None)
    compacted = _run(ATTACKS[name], model, x, y, compact_every=3)
    robust = ~whole.success
    assert robust.any() and whole.success.sum() > 5, "the test needs both kinds of points"
    assert torch.equal(compacted.success, whole.success), (
        f"success differs at {(compacted.success != whole.success).nonzero().flatten().tolist()}"
    )
    assert torch.equal(compacted.x_adv[robust], whole.x_adv[robust])
    assert torch.equal(compacted.delta_norm[robust], whole.delta_norm[robust])
    if whole.stats is not None:
        assert torch.equal(compacted.stats.alignment[robust], whole.stats.alignment[robust])
    with torch.no_grad():
        assert (model(compacted.x_adv).argmax(1) != y)[compacted.success].all(), "a broken point's x_adv is not"
    if name.startswith("square"):  # a fooled point never moves again: everything is the same
        assert torch.equal(compacted.x_adv, whole.x_adv)


@pytest.mark.parametrize("name", ["apgd-t", "apgd-t-restarts", "fab-t", "fab-t-l2-restarts"])
@pytest.mark.parametrize("compact_every", [None, 3])
def test_batched_targets_return_what_one_target_at_a_time_returns(trained, name, compact_every):
    # max_rows=1: one run (target, restart) at a time, each on the points the earlier runs left
    # robust; the default batches all 3 × restarts runs of the 48 points at once. Per point the
    # batch keeps the first run that broke it, as the sequence does; the draws are made run by run
    # over the whole batch, so both see the same starts and agree bit for bit.
    model, x, y = trained
    sequential = _run(ATTACKS[name], model, x, y, compact_every=compact_every, max_rows=1)
    batched = _run(ATTACKS[name], model, x, y, compact_every=compact_every)
    assert sequential.success.sum() > 5 and (~sequential.success).any()
    assert torch.equal(batched.success, sequential.success)
    assert torch.equal(batched.x_adv, sequential.x_adv), f"x_adv differs by {(batched.x_adv - sequential.x_adv).abs().max()}"
    assert torch.equal(batched.delta_norm, sequential.delta_norm)
    if sequential.stats is not None:
        assert torch.equal(batched.stats.alignment, sequential.stats.alignment)


def test_batched_targets_are_bounded_by_max_rows(trained):
    model, x, y = trained
    counted = Counted(model)
    sizes = []
    counted.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[0]))
    _run(ATTACKS["apgd-t"], counted, x, y, max_rows=100)
    assert max(sizes) <= 100 and max(sizes) > 48, sizes  # two of the three targets at once, then one
    sizes.clear()
    _run(ATTACKS["apgd-t"], counted, x, y, max_rows=1)
    assert max(sizes) == 48


BREAKING = {  # ε = 0.15: nearly every point of the test model breaks within a few steps
    "apgd-ce": (lambda m, every: APGD(m, eps=0.15, steps=30, compact_every=every), 0.35),
    "apgd-t": (lambda m, every: APGDT(m, eps=0.15, steps=30, compact_every=every), 0.5),
    "fab-t": (lambda m, every: FAB(m, eps=0.15, steps=30, compact_every=every), 0.5),
    "square": (lambda m, every: Square(m, eps=0.15, n_queries=300, compact_every=every), 0.5),
}


@pytest.mark.parametrize("name", list(BREAKING))
def test_compaction_cuts_the_images_spent_on_points_that_break_early(trained, name):
    # The compacted run must spend a fraction of the uncompacted run's images, counted by a
    # wrapper module as a benchmark counts them (a no-op compaction spends as many).
    model, x, y = trained
    make, ratio = BREAKING[name]
    spent = {}
    for every in (None, 3):
        counted = Counted(model)
        result = _run(lambda m, every=every, **_: make(m, every), counted, x, y)
        spent[every] = (counted.forward_images, counted.gradient_images)
    assert result.success.float().mean() > 0.8, "the test needs a model that breaks nearly everywhere"
    (full_fwd, full_grad), (fwd, grad) = spent[None], spent[3]
    assert fwd <= ratio * full_fwd, f"forward images {fwd} vs {full_fwd} uncompacted"
    assert grad <= ratio * full_grad or full_grad == 0, f"gradient images {grad} vs {full_grad} uncompacted"


def _reads(attack, x, y) -> int:
    with warnings.catch_warnings(), HostReads() as counter:
        warnings.simplefilter("ignore")
        attack(x, y)
    return counter.count


@pytest.mark.parametrize("make, runs", [
    (lambda m, n: APGD(m, eps=1e-4, steps=n, compact_every=5), 1),
    (lambda m, n: APGDT(m, eps=1e-4, steps=n, n_target_classes=2, compact_every=5), 1),  # both targets batched
    (lambda m, n: APGDT(m, eps=1e-4, steps=n, n_target_classes=2, compact_every=5, max_rows=1), 2),
    (lambda m, n: FAB(m, eps=1e-4, steps=n, n_target_classes=2, compact_every=5), 1),
    (lambda m, n: Square(m, eps=1e-4, n_queries=n, compact_every=5), 1),
])
def test_one_host_read_per_compaction_not_per_step(trained, make, runs):
    # ε too small to break anything: every compaction happens. 2 steps: none; 12 steps: after
    # steps 5 and 10 of each run (Square: after 5 and 10 forwards), one sync each (the selection
    # of the rows that go on). The rest (argument checks, audit, per-run selections, Square's one
    # read of its drawn windows per run) does not depend on the steps.
    model, x, y = trained
    with torch.no_grad():
        y = model(x).argmax(1)  # every point correctly classified: all of them run
    assert _reads(make(model, 12), x, y) - _reads(make(model, 2), x, y) == 2 * runs


def test_apgd_perturb_does_not_compact_and_stays_free_of_syncs(trained):
    # The training path: the whole batch for all steps, the batch of an uncompacted call.
    model, x, y = trained
    counts = []
    for steps in (2, 12):
        with HostReads() as counter:
            APGD(model, eps=1e-4, steps=steps).perturb(x, y)
        counts.append(counter.count)
    assert counts[0] == counts[1], counts
    torch.manual_seed(0)
    x_adv = APGD(model, eps=EPS, steps=12).perturb(x, y)
    torch.manual_seed(0)
    assert torch.equal(x_adv, APGD(model, eps=EPS, steps=12, compact_every=None)(x, y).x_adv)


def test_square_linf_query_changes_only_its_window():
    # 8×8 images, p_init 0.3: the first query's window has side round(√(0.3·64)) = 4. Outside it the
    # query's input is bitwise the start; inside, each value is x ± ε (clipped).
    model = tiny_cnn(num_classes=3)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    inputs = []
    model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    eps = 0.03
    torch.manual_seed(0)
    result = Square(model, eps=eps, n_queries=2, p_init=0.3)(x, y)
    _clean, start, query = inputs
    changed = (query != start).any(0).any(0)  # (H, W): pixels changed in any sample or channel
    rows, cols = changed.nonzero().unbind(1)
    side = round((p_schedule(0, 2, 0.3) * 64) ** 0.5)
    assert side == 4 and changed.any()
    assert rows.max() - rows.min() < side and cols.max() - cols.min() < side, "changes outside one 4×4 window"
    window = (slice(None), slice(None), slice(int(rows.min()), int(rows.min()) + side),
              slice(int(cols.min()), int(cols.min()) + side))
    outside = torch.ones_like(query, dtype=torch.bool)
    outside[window] = False
    assert torch.equal(query[outside], start[outside])
    corner = (query[window] - x[window]).abs()
    assert ((corner - eps).abs() <= 1e-7).logical_or(query[window] == 0).logical_or(query[window] == 1).all()
    # Per point: x (neither point lowered the clean margin), the start or the query.
    assert all(any(torch.equal(result.x_adv[i], v[i]) for v in (x, start, query)) for i in range(16))
