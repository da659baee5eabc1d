"""APGD-T, Square, FAB-T and Carlini–Wagner: exact answers on linear models (minimal perturbations
and robust accuracies are analytic there), the projection of FAB by hand, the result contract,
and strength against torchattacks where it is installed."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import linear_model, template_cnn
from torch import nn

from fastsat.attacks import APGD, APGDT, CW, FAB, FGSM, PGD, DeepFool, Square, apgdt, cw, fab, square
from fastsat.attacks.fab import project_onto_hyperplane
from fastsat.attacks.square import p_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

WIDE = (-100.0, 100.0)  # a box that no minimal perturbation here reaches
PIXELS = 16  # the 1×4×4 points of the linear models, flattened


def _points(n: int, d: int = PIXELS, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 1, 4, d // 4, generator=gen, dtype=torch.float64)


def _pairwise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dual: float) -> torch.Tensor:
    """(B, K): the norm of the smallest perturbation that makes class j score as high as y,
    (z_y − z_j)/‖w_y − w_j‖_dual (the box ignored), inf for j = y. Its row minimum is the minimal
    adversarial perturbation in the dual's norm (L2: dual 2; L∞: dual 1)."""
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    gaps = (z.gather(1, y[:, None]) - z) / (weight[y][:, None, :] - weight[None]).norm(p=dual, dim=2)
    return gaps.masked_fill(F.one_hot(y, z.shape[1]).bool(), torch.inf)


def _labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


# ---------------------------------------------------------------------------------------------
# APGD-T


def test_apgdt_breaks_exactly_the_points_a_targeted_corner_breaks_on_a_linear_model():
    # L∞ ball, linear logits: some class t ≠ y overtakes y inside the ball iff
    # (z_t − z_y) + ε‖w_t − w_y‖₁ > 0 for some t; every class is a target (K − 1 = 4 ≤ 9).
    model = linear_model(5, PIXELS)
    x = _points(64)
    y = _labels(model, x)
    eps = 0.05
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    reach = (z - z.gather(1, y[:, None])) + eps * (weight[None] - weight[y][:, None]).abs().sum(2)
    reach = reach.masked_fill(F.one_hot(y, 5).bool(), -torch.inf).amax(1)
    breakable = reach > 0
    assert 0.2 < breakable.float().mean() < 0.8, "the test needs both kinds of points"
    clear = reach.abs() > 1e-3  # a point on the threshold itself needs the exact corner and a tie
    result = APGDT(model, eps=eps, steps=20, clip=WIDE)(x, y)
    assert torch.equal(result.success[clear], breakable[clear]), (
        f"success differs from the analytic answer at {(result.success != breakable)[clear].sum()} points"
    )
    assert (result.delta_norm <= eps * (1 + 1e-12)).all()
    assert result.stats is not None and result.stats.alignment.shape == (64,)


def test_apgdt_runs_the_top_other_classes_in_order_on_the_points_still_robust(monkeypatch):
    model = linear_model(6, PIXELS)
    x = _points(32)
    y = _labels(model, x)
    with torch.no_grad():
        z = model(x)
    ranking = z.masked_fill(F.one_hot(y, 6).bool(), -torch.inf).argsort(1, descending=True)
    runs = []
    real_run = APGDT._single_run

    def recording(self, x_sub, y_sub, start, **kwargs):
        runs.append((x_sub, kwargs["target"]))
        return real_run(self, x_sub, y_sub, start, **kwargs)

    monkeypatch.setattr(APGDT, "_single_run", recording)
    # max_rows=1: one run at a time (the batched runs are compared with these in test_attacks_compaction.py).
    result = APGDT(model, eps=0.05, steps=10, n_target_classes=3, max_rows=1, clip=WIDE)(x, y)
    assert 2 <= len(runs) <= 3, "the test needs points that survive the first target"
    rows = []
    for k, (x_sub, target) in enumerate(runs):
        index = (x_sub.flatten(1)[:, None] == x.flatten(1)[None]).all(2).double().argmax(1)
        assert torch.equal(target, ranking[index, k]), f"run {k} did not target the class ranked {k + 2}"
        rows.append(set(index.tolist()))
    assert rows[0] == set(range(32))
    for k in range(1, len(rows)):
        assert rows[k] <= rows[k - 1] and result.success[sorted(rows[k - 1] - rows[k])].all(), (
            f"run {k} is not exactly the points run {k - 1} left robust"
        )
    assert set((~result.success).nonzero().flatten().tolist()) <= rows[-1]
    # Points misclassified at x are returned unchanged and successful, without a run.
    runs.clear()
    y_wrong = (y + 1) % 6
    wrong = apgdt(model, x, y_wrong, eps=0.05, steps=5, max_rows=1, clip=WIDE)
    assert wrong.success.all() and torch.equal(wrong.x_adv, x) and not runs
    with pytest.raises(ValueError, match="dlr_targeted.*4 classes"):
        APGDT(linear_model(3, PIXELS), steps=2)(x, _labels(linear_model(3, PIXELS), x))


# ---------------------------------------------------------------------------------------------
# Square


def test_square_schedule_halves_p_at_the_papers_queries():
    assert [p_schedule(q, 10000, 0.8) for q in (0, 10, 11, 51, 201, 8001)] == [0.8, 0.8, 0.4, 0.2, 0.1, 0.8 / 512]
    # Rescaled: query 3 of 1000 is query 30 of 10,000, query 6 is query 60.
    assert (p_schedule(3, 1000, 0.8), p_schedule(6, 1000, 0.8)) == (0.4, 0.2)


def test_square_linf_reaches_the_analytic_robust_accuracy_of_a_binary_linear_model():
    # Binary linear model: the smallest L∞ perturbation that flips x is |⟨w, x⟩ + b| / ‖w‖₁
    # (w, b the logit difference), reached at the corner x − ε·sign(w)·sign(margin). The box is
    # [0, 1] and x ∈ [0.3, 0.7], so for ε ≤ 0.3 the corner is inside it.
    model = linear_model(2, PIXELS)
    x = _points(64)
    y = _labels(model, x)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    w, b = weight[1] - weight[0], bias[1] - bias[0]
    distance = (x.flatten(1) @ w + b).abs() / w.abs().sum()
    eps = distance.median().item() * 1.001  # between two points, neither on the threshold
    assert (distance - eps).abs().min() > 1e-6 and eps < 0.3
    torch.manual_seed(0)
    result = Square(model, eps=eps, n_queries=400)(x, y)
    robust = 1 - result.success.double().mean().item()
    assert robust == (distance > eps).double().mean().item()
    assert torch.equal(result.success, distance <= eps)
    assert result.stats is None and (result.delta_norm <= eps * (1 + 1e-12)).all()


def test_square_l2_breaks_the_clearly_breakable_points_and_none_beyond_the_minimum():
    # Binary linear model on 8×8 images: the smallest L2 perturbation is |⟨w, x⟩ + b| / ‖w‖₂.
    # L2 Square moves mass between square windows, a coarse search: within 500 queries it breaks
    # every point whose minimum is below 0.6 ε (seen: all below 0.77 ε), and it can break none
    # beyond ε.
    model = linear_model(2, 8 * 8)
    x = 0.3 + 0.4 * torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = _labels(model, x)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    w, b = weight[1] - weight[0], bias[1] - bias[0]
    distance = (x.flatten(1) @ w + b).abs() / w.norm()
    eps = distance.quantile(0.75).item()
    torch.manual_seed(0)
    result = square(model, x, y, eps=eps, norm="l2", n_queries=500, p_init=0.3)
    assert not result.success[distance > eps].any(), "an L2 attack beat the analytic minimum"
    clear = distance < 0.6 * eps
    assert clear.sum() >= 5 and result.success[clear].all(), f"{(~result.success[clear]).sum()} clear points survived"
    assert (result.delta_norm <= eps * (1 + 1e-9)).all()


def test_square_runs_only_on_correctly_classified_points_and_needs_images():
    model = linear_model(3, PIXELS)
    x = _points(8)
    y = _labels(model, x)
    y[:3] = (y[:3] + 1) % 3
    forwards = []
    model.register_forward_hook(lambda _m, inputs, _o: forwards.append(inputs[0].shape[0]))
    torch.manual_seed(0)
    result = Square(model, eps=1e-6, n_queries=5)(x, y)  # too small to break anything else
    assert result.success.tolist() == [True] * 3 + [False] * 5
    assert torch.equal(result.x_adv[:3], x[:3])
    assert forwards[0] == 8 and set(forwards[1:]) == {5}, forwards
    with pytest.raises(ValueError, match=r"x: Square needs images \(B, C, H, W\)"):
        Square(model)(x.flatten(1), y)


# ---------------------------------------------------------------------------------------------
# FAB-T


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1)])
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm, dual):
    # One FAB projection of x onto the linearised boundary of the nearest class is exact on an
    # affine model; the overshoot η = 1.05 and the pull-back β = 0.9 then leave FAB at most 1%
    # above the minimum (0.5% measured). Never below it: every recorded point was verified
    # adversarial, in float64.
    model = linear_model(5, PIXELS)
    x = _points(32)
    y = _labels(model, x)
    expected = _pairwise(model, x, y, dual).amin(1)
    result = FAB(model, eps=None, norm=norm, steps=10, clip=WIDE)(x, y)
    assert result.success.all()
    ratio = result.delta_norm / expected
    assert ratio.min() >= 1 - 1e-9, f"below the analytic minimum: {ratio.min():.12f}"
    assert ratio.max() <= 1.01, f"{ratio.max():.4f} times the minimum"
    distance = (result.x_adv - x).flatten(1)
    measured = distance.abs().amax(1) if norm == "linf" else distance.norm(dim=1)
    torch.testing.assert_close(result.delta_norm, measured, atol=1e-12, rtol=0)


def test_fab_with_eps_accepts_exactly_the_points_within_eps():
    model = linear_model(5, PIXELS)
    x = _points(32)
    y = _labels(model, x)
    minimal = FAB(model, eps=None, steps=10, clip=WIDE)(x, y)
    eps = minimal.delta_norm.median().item() * 1.001
    result = fab(model, x, y, eps=eps, steps=10, clip=WIDE)
    assert torch.equal(result.success, minimal.delta_norm <= eps)
    # Points broken within ε are not attacked again: their norms agree; the rest keep x.
    ok = result.success
    torch.testing.assert_close(result.delta_norm[ok], minimal.delta_norm[ok], atol=1e-12, rtol=0)
    assert torch.equal(result.x_adv[~ok], x[~ok])
    assert (result.delta_norm[~ok] > eps).all()


def test_fab_projection_by_hand():
    # Box [0, 1], t = (0.9, 0.5), w = (1, 2). Raising ⟨w, ·⟩ by 0.6: L∞ moves both coordinates
    # by λ until the first hits the box (0.1), then the second alone: 0.1 + 2λ = 0.6, λ = 0.25.
    # L2 moves d ∝ w, the first coordinate capped at 0.1: 0.1 + 2·(2λ) = 0.6, d₂ = 2λ = 0.25.
    t = torch.tensor([[0.9, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    base = (w * t).sum(1)
    for norm in ("linf", "l2"):
        d = project_onto_hyperplane(t, w, base + 0.6, norm, (0.0, 1.0))
        torch.testing.assert_close(d, torch.tensor([[0.1, 0.25]], dtype=torch.float64), atol=1e-15, rtol=0)
        # Out of reach (at most 0.1 + 2·0.5 = 1.1 inside the box): the best corner.
        d = project_onto_hyperplane(t, w, base + 5.0, norm, (0.0, 1.0))
        torch.testing.assert_close(d, torch.tensor([[0.1, 0.5]], dtype=torch.float64), atol=1e-15, rtol=0)
    # Lowering by 0.6, nothing in the way: L∞ moves both by 0.2, L2 along w by 0.6/‖w‖² = 0.12.
    down = {"linf": [[-0.2, -0.2]], "l2": [[-0.12, -0.24]]}
    for norm, expected in down.items():
        d = project_onto_hyperplane(t, w, base - 0.6, norm, (0.0, 1.0))
        torch.testing.assert_close(d, torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)
    # A zero weight never moves; a zero gap is no move at all.
    w0 = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    for norm in ("linf", "l2"):
        d = project_onto_hyperplane(t, w0, (w0 * t).sum(1) + 0.4, norm, (0.0, 1.0))
        torch.testing.assert_close(d, torch.tensor([[0.0, 0.2]], dtype=torch.float64), atol=1e-15, rtol=0)
        assert torch.equal(project_onto_hyperplane(t, w, base, norm, (0.0, 1.0)), torch.zeros_like(t))


def test_fab_and_cw_check_their_arguments():
    model = linear_model(3, PIXELS)
    with pytest.raises(ValueError, match="restarts > 1 needs eps"):
        FAB(model, eps=None, restarts=2)
    with pytest.raises(ValueError, match="eta"):
        FAB(model, eta=0.5)
    with pytest.raises(ValueError, match="clip"):
        FAB(model, clip=(0.5, 0.5))
    with pytest.raises(ValueError, match="confidence"):
        CW(model, confidence=-1)
    with pytest.raises(TypeError, match="lr"):
        CW(model, lr="0.01")


# ---------------------------------------------------------------------------------------------
# Carlini–Wagner L2


def test_cw_finds_the_minimal_l2_perturbation_of_a_binary_linear_model():
    # Two classes: the margin is linear and the minimal L2 perturbation |⟨w, x⟩ + b| / ‖w‖₂ lies
    # inside the box; CW's binary search over c and Adam get within 1% of it, never below it.
    model = linear_model(2, PIXELS)
    x = _points(32)
    y = _labels(model, x)
    expected = _pairwise(model, x, y, 2).amin(1)
    foot = x.flatten(1) - (expected / (model[1].weight[y] - model[1].weight[1 - y]).detach().norm(dim=1))[:, None] * (
        model[1].weight[y] - model[1].weight[1 - y]
    ).detach()
    assert ((foot > 0) & (foot < 1)).all(), "the minimal points must lie inside the box"
    result = CW(model, steps=300)(x, y)
    assert result.success.all()
    ratio = result.delta_norm / expected
    assert ratio.min() >= 1 - 1e-9, f"below the analytic minimum: {ratio.min():.12f}"
    assert ratio.max() <= 1.01, f"{ratio.max():.4f} times the minimum"
    torch.testing.assert_close(result.delta_norm, (result.x_adv - x).flatten(1).norm(dim=1), atol=1e-12, rtol=0)


def test_cw_on_a_multiclass_linear_model_is_never_below_the_minimum_and_reports_at_eps():
    model = linear_model(5, PIXELS)
    x = _points(32)
    y = _labels(model, x)
    expected = _pairwise(model, x, y, 2).amin(1)
    unbounded = CW(model, steps=200)(x, y)
    assert unbounded.success.all()
    assert (unbounded.delta_norm >= expected * (1 - 1e-9)).all()
    eps = unbounded.delta_norm.median().item() * 1.001
    torch.manual_seed(0)
    bounded = cw(model, x, y, eps=eps, steps=200)
    assert torch.equal(bounded.success, unbounded.delta_norm <= eps)
    assert torch.equal(bounded.x_adv[~bounded.success], x[~bounded.success])


def test_cw_confidence_keeps_the_margin():
    model = linear_model(3, PIXELS)
    x = _points(16)
    y = _labels(model, x)
    result = CW(model, confidence=0.5, steps=200)(x, y)
    with torch.no_grad():
        z = model(result.x_adv)
    margin = z.gather(1, y[:, None]).squeeze(1) - z.masked_fill(F.one_hot(y, 3).bool(), -torch.inf).amax(1)
    assert result.success.all() and (margin[result.success] < -0.5).all()
    plain = CW(model, steps=200)(x, y)
    assert (result.delta_norm > plain.delta_norm).all(), "a confident point must lie further away"


# ---------------------------------------------------------------------------------------------
# Against torchattacks, where it is installed


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for 40 Adam steps on 4 separable classes of 1×8×8 images, and a held-out
    batch of 48 (the fixture of test_attacks.py, smaller)."""
    return template_cnn(classes=4, held_out=48)


EPS = 0.06
PAIRS = {
    # name: (fastsat attack, torchattacks class name and arguments)
    "fgsm": (lambda m: FGSM(m, eps=EPS), ("FGSM", {"eps": EPS})),
    "pgd": (lambda m: PGD(m, eps=EPS, step_size=EPS / 4, steps=10), ("PGD", {"eps": EPS, "alpha": EPS / 4, "steps": 10})),
    "apgd": (lambda m: APGD(m, eps=EPS, steps=20), ("APGD", {"eps": EPS, "steps": 20})),
    "apgdt": (lambda m: APGDT(m, eps=EPS, steps=20), ("APGDT", {"eps": EPS, "steps": 20, "n_classes": 4})),
    "fab": (lambda m: FAB(m, eps=EPS, steps=20), ("FAB", {"eps": EPS, "steps": 20, "multi_targeted": True, "n_classes": 4})),
    "square": (lambda m: Square(m, eps=EPS, n_queries=300), ("Square", {"eps": EPS, "n_queries": 300})),
    "cw": (lambda m: CW(m, steps=100, binary_search_steps=5), ("CW", {"c": 1, "steps": 100})),
    "deepfool": (lambda m: DeepFool(m, steps=20), ("DeepFool", {"steps": 20})),
}


@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="torchattacks is not installed")
@pytest.mark.parametrize("name", list(PAIRS))
def test_at_least_as_strong_as_torchattacks(trained, name):
    """Bounded attacks: fastsat's robust accuracy is at most torchattacks'. Minimal-norm attacks
    (CW, DeepFool): on the points both break, fastsat's median perturbation is not larger."""
    import torchattacks

    model, x, y = trained
    make, (ta_name, ta_kwargs) = PAIRS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = make(model)(x, y)
        theirs_x = getattr(torchattacks, ta_name)(model, **ta_kwargs)(x, y)
    with torch.no_grad():
        theirs_success = model(theirs_x).argmax(1) != y
    if name in ("cw", "deepfool"):
        both = ours.success & theirs_success
        assert both.sum() >= 10, f"too few common successes ({both.sum()}) to compare"
        ours_norm = (ours.x_adv - x)[both].flatten(1).norm(dim=1).median()
        theirs_norm = (theirs_x - x)[both].flatten(1).norm(dim=1).median()
        assert ours_norm <= theirs_norm * 1.05, f"median L2 {ours_norm:.4f} vs torchattacks {theirs_norm:.4f}"
        assert ours.success.sum() >= theirs_success.sum()
    else:
        assert ours.success.sum() >= theirs_success.sum(), (
            f"fastsat broke {ours.success.sum()} points, torchattacks {theirs_success.sum()}"
        )
