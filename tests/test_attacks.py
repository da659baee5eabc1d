"""fastsat.attacks: exact answers on linear models, ordering of attack strength on a small trained
net, agreement with a float64 reference loop written out here, and the guard/audit contract."""

from __future__ import annotations

import copy
import gc
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _host_reads import HostReads
from _models import linear_model, template_cnn, tiny_cnn
from torch import nn

from fastsat import ops
from fastsat.attacks import (
    APGD,
    APGDT,
    CW,
    FAB,
    FGSM,
    PGD,
    DeepFool,
    Square,
    TradesAttack,
    apgd,
    base,
    deepfool,
    fgsm,
    pgd,
    trades_attack,
)
from fastsat.attacks.apgd import checkpoints, halve_step
from fastsat.attacks.base import Candidate

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Models and data


PIXELS = 16  # the 1×4×4 inputs of the linear models, flattened


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for 40 Adam steps on 4 separable synthetic classes of 1×8×8 images,
    and a held-out batch of 64. Clean accuracy is about 0.9; at ε = 0.06 FGSM leaves about 30%
    robust accuracy, so the strength ordering of the attacks is visible."""
    model, x, y = template_cnn(classes=4, held_out=64)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.8, "the fixture net failed to train"
    return model, x, y


def _robust_accuracy(result) -> float:
    return 1.0 - result.success.float().mean().item()


def _distance(x_adv, x, norm):
    delta = (x_adv.double() - x.double()).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def _assert_in_ball_and_box(result, x, eps, norm, clip=(0.0, 1.0)):
    dist = _distance(result.x_adv, x, norm)
    # Storage rounding: half an ulp per element of the box scale, √d of them in L2.
    slack = torch.finfo(x.dtype).eps * (1 if norm == "linf" else math.sqrt(x[0].numel()))
    worst = (dist - eps).max().item()
    assert worst <= eps * 1e-6 + slack, f"{norm} ball left by {worst:.3g} (eps={eps})"
    assert result.x_adv.min() >= clip[0] and result.x_adv.max() <= clip[1], "box left"
    assert torch.isfinite(result.x_adv).all()
    assert result.delta_norm.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(result.delta_norm, dist.to(result.delta_norm.dtype), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Exact answers on linear models


def test_deepfool_on_bias_free_binary_linear_model_is_exact_in_one_step():
    # Ψ(x) = ⟨w, x⟩ as the logit difference of two classes: ρ = |⟨w, x⟩|/‖w‖ (Etmann Lemma 1).
    torch.manual_seed(4)
    w = torch.randn(16, dtype=torch.float64)
    model = linear_model(2, PIXELS, bias=False)
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w / 2, -w / 2]))
    x = torch.rand(32, 1, 4, 4, dtype=torch.float64)
    # A wide box so that no clip interferes with the exact answer.
    result = DeepFool(model, clip=(-100.0, 100.0))(x)
    expected = (x.flatten(1) @ w).abs() / w.norm()
    assert result.success.all()
    assert (result.iterations == 1).all(), f"iterations {result.iterations.tolist()}"
    assert result.delta_norm.dtype == torch.float64
    torch.testing.assert_close(result.delta_norm, expected, rtol=1e-5, atol=0)
    on_boundary = (result.x_adv.flatten(1) @ w).abs() / w.norm()
    assert (on_boundary <= 1e-5 * expected).all(), f"x_adv off the boundary by {on_boundary.max():.3g}"


def _linear_boundary_distance(model, x):
    """ρ of a linear model Flatten → Linear: min_j (z_i* − z_j)/‖W_i* − W_j‖ (box ignored)."""
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    pred = z.argmax(1)
    gaps = (z.gather(1, pred[:, None]) - z) / (weight[pred][:, None, :] - weight[None]).norm(dim=2)
    return gaps.masked_fill(F.one_hot(pred, z.shape[1]).bool(), torch.inf).amin(1)


def test_deepfool_on_multiclass_linear_model_finds_the_nearest_boundary():
    # Linear with bias: ρ = min_j (z_i* − z_j)/‖W_i* − W_j‖, reached in one step.
    model = linear_model(5, PIXELS)
    x = torch.rand(24, 1, 4, 4, dtype=torch.float64)
    expected = _linear_boundary_distance(model, x)
    result = deepfool(model, x, clip=(-100.0, 100.0))
    assert (result.iterations == 1).all() and result.success.all()
    torch.testing.assert_close(result.delta_norm.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("logit_scale", [1.0, 1e-3])
def test_deepfool_step_goes_1e4_pixels_past_the_boundary_whatever_the_logit_scale(logit_scale):
    # One DeepFool step on a linear model lands (1 + overshoot)·(ρ + 1e-4) from x (the original
    # code's r = (|f|/‖w‖ + 1e-4)·w/‖w‖): the 1e-4 is in pixel units, so rescaling the logits,
    # which moves no boundary, must not change the step. One bisection halving (t = 1/2 is not
    # yet across) leaves that step as the result. float64: the only error is rounding, ~1e-15.
    model = linear_model(5, PIXELS)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(logit_scale)
    x = torch.rand(24, 1, 4, 4, dtype=torch.float64)
    rho = _linear_boundary_distance(model, x)
    result = DeepFool(model, overshoot=0.02, bisection_steps=1, clip=(-100.0, 100.0))(x)
    assert result.success.all() and (result.iterations == 1).all()
    torch.testing.assert_close(result.delta_norm, 1.02 * (rho + 1e-4), rtol=1e-9, atol=0)


def _binary_linear_setup():
    model = linear_model(2, 2 * 4 * 4)
    x = (0.2 + 0.6 * torch.rand(10, 2, 4, 4, dtype=torch.float64))
    y = torch.randint(0, 2, (10,))
    weight = model[1].weight.detach()
    # CE gradient w.r.t. x is (p_y − 1)(w_y − w_other): its sign is −sign(w_y − w_other).
    ascent_sign = -torch.sign(weight[y] - weight[1 - y]).reshape(x.shape)
    return model, x, y, weight, ascent_sign


def test_fgsm_and_pgd_linf_on_linear_model_give_the_optimal_corner():
    model, x, y, _, ascent_sign = _binary_linear_setup()
    eps = 0.15
    expected = (x + eps * ascent_sign).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, eps=eps).x_adv, expected, atol=1e-15, rtol=0)
    # From a random start, 10 steps of ε/4 travel 2.5ε ≥ 2ε: every element reaches the corner.
    result = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10)
    torch.testing.assert_close(result.x_adv, expected, atol=1e-15, rtol=0)
    # Fast-AT style FGSM (random start, step 1.25ε) stays in the ball and the box.
    fast = fgsm(model, x, y, eps=eps, step_size=1.25 * eps, random_start=True)
    _assert_in_ball_and_box(fast, x, eps, "linf")


def test_pgd_l2_on_linear_model_moves_eps_along_the_weight_difference():
    model, x, y, weight, _ = _binary_linear_setup()
    eps = 0.5
    direction = -(weight[y] - weight[1 - y])
    direction = (direction / direction.norm(dim=1, keepdim=True)).reshape(x.shape)
    result = pgd(model, x, y, eps=eps, step_size=0.2, steps=4, norm="l2", random_start=False, clip=(-10.0, 10.0))
    torch.testing.assert_close(result.x_adv, x + eps * direction, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.delta_norm, torch.full((10,), eps, dtype=torch.float64), atol=1e-12, rtol=0)


def test_targeted_pgd_reaches_the_target_on_a_linear_model():
    model = linear_model(4, PIXELS)
    x = torch.rand(16, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        target = (model(x).argmax(1) + 1) % 4
    result = PGD(model, eps=5.0, step_size=0.5, steps=40, targeted=True, loss="cw", clip=(-10.0, 10.0))(x, target)
    with torch.no_grad():
        reached = model(result.x_adv).argmax(1) == target
    assert torch.equal(result.success, reached)
    assert result.success.all(), f"{(~result.success).sum()} of 16 targets not reached with a huge ε"


# ---------------------------------------------------------------------------------------------
# A small trained net: strength ordering, balls, reference loop


EPS = 0.06


def test_strength_ordering_on_trained_net(trained):
    model, x, y = trained
    accs = {}
    for name, attack in {
        "fgsm": FGSM(model, eps=EPS),
        "pgd": PGD(model, eps=EPS, step_size=EPS / 4, steps=10),
        "apgd": APGD(model, eps=EPS, steps=20),
    }.items():
        torch.manual_seed(0)
        accs[name] = _robust_accuracy(attack(x, y))
    assert accs["pgd"] <= accs["fgsm"] and accs["apgd"] <= accs["pgd"], accs
    assert 0.0 < accs["fgsm"] < 0.9, f"ordering test is vacuous: {accs}"


@pytest.mark.parametrize("attack_cls, kwargs", [(PGD, {"steps": 5, "step_size": EPS / 2}), (APGD, {"steps": 10})])
def test_more_restarts_never_lose_a_success(trained, attack_cls, kwargs):
    model, x, y = trained
    successes = []
    for restarts in (1, 3):
        torch.manual_seed(0)
        successes.append(attack_cls(model, eps=EPS, restarts=restarts, **kwargs)(x, y).success)
    lost = successes[0] & ~successes[1]
    assert not lost.any(), f"samples {lost.nonzero().flatten().tolist()} broken by 1 restart but not by 3"


@pytest.mark.filterwarnings("ignore:.*all-zero input gradient")
@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.4)])
def test_every_attack_stays_inside_its_ball_and_the_box(trained, norm, eps):
    model, x, y = trained
    attacks = [
        PGD(model, eps=eps, step_size=eps / 4, steps=5, norm=norm, loss="cw"),
        PGD(model, eps=eps, step_size=eps / 2, steps=5, norm=norm, loss="dlr", restarts=2),
        FGSM(model, eps=eps, norm=norm, random_start=True, step_size=1.25 * eps),
        APGD(model, eps=eps, steps=10, norm=norm, loss="dlr"),
    ]
    if norm == "linf":
        attacks.append(TradesAttack(model, eps, eps / 4, 5))
    for attack in attacks:
        result = attack(x, y)
        _assert_in_ball_and_box(result, x, eps, norm)
        with torch.no_grad():
            misclassified = model(result.x_adv).argmax(1) != y
        assert torch.equal(result.success, misclassified), f"{attack!r}: success mask is wrong"
        assert result.stats is not None and result.stats.alignment.shape == (64,)


def _reference_pgd(model, x, y, x_start, eps, step_size, steps, norm):
    """Plain float64 PGD, projection written out, the way the papers state it."""
    x_nat = x.double()
    x_adv = x_start.double().clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x_nat - eps), x_nat + eps)
            else:
                g_norm = grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
                x_adv = x_adv + step_size * grad / g_norm
                delta = x_adv - x_nat
                d_norm = delta.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
                x_adv = x_nat + delta * torch.clamp(eps / d_norm, max=1.0)
            x_adv = x_adv.clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("norm, eps, step", [("linf", EPS, EPS / 4), ("l2", 0.4, 0.1)])
def test_fast_path_agrees_with_float64_reference_loop(trained, norm, eps, step):
    model32, x, y = trained
    model64 = copy.deepcopy(model32).double()
    for dtype, model in ((torch.float64, model64), (torch.float32, model32)):
        xd = x.to(dtype)
        torch.manual_seed(7)
        start = ops.random_start(xd, eps=eps, norm=norm)
        torch.manual_seed(7)
        fast = PGD(model, eps=eps, step_size=step, steps=6, norm=norm)(xd, y).x_adv
        expected = _reference_pgd(model64, x.double(), y, start, eps, step, 6, norm)
        if dtype == torch.float64:
            # Same arithmetic in the same precision: only summation order differs.
            torch.testing.assert_close(fast, expected, atol=1e-12, rtol=0)
        else:
            # float32 gradients can flip the sign of near-zero components (L∞: a 2·step jump in
            # that element), so compare the bulk: 99% of the elements within float32 rounding.
            close = ((fast.double() - expected).abs() <= 1e-5).float().mean().item()
            assert close >= 0.99, f"only {close:.2%} of float32 elements match the float64 reference"


# ---------------------------------------------------------------------------------------------
# TRADES and DeepFool on the trained net


def test_trades_attack_increases_the_kl_and_accepts_positional_settings(trained):
    model, x, y = trained
    torch.manual_seed(0)
    result = TradesAttack(model, 0.05, 0.01, 8)(x, y)
    _assert_in_ball_and_box(result, x, 0.05, "linf")
    with torch.no_grad():
        clean = F.log_softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(result.x_adv), 1), clean, log_target=True, reduction="none").sum(1)
        noisy = (x + 0.05 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        kl_noise = F.kl_div(F.log_softmax(model(noisy), 1), clean, log_target=True, reduction="none").sum(1)
    assert kl_adv.mean() > 2 * kl_noise.mean(), f"KL attack {kl_adv.mean():.3g} vs noise {kl_noise.mean():.3g}"
    # Without labels, success means the prediction moved away from the clean one.
    unlabeled = trades_attack(model, x, eps=0.05, step_size=0.01, steps=8)
    with torch.no_grad():
        moved = model(unlabeled.x_adv).argmax(1) != model(x).argmax(1)
    assert torch.equal(unlabeled.success, moved)


def test_trades_attack_agrees_with_the_papers_loop_in_float64(trained):
    # TRADES' own loop: start at x + 0.001·N(0, I), sign steps on KL(f(x) ‖ f(x')) (sum over
    # classes), projection onto the L∞ ball around the clean x, clip to [0, 1], model in eval mode.
    # The model carries a dropout layer and is left in train mode: a train-mode attack would
    # draw dropout masks and differ. Same float64 arithmetic, so only summation order differs.
    model32, x, y = trained
    model = nn.Sequential(copy.deepcopy(model32).double(), nn.Dropout(0.5)).train()
    x = x.double()
    eps, step, steps = 0.05, 0.01, 5
    torch.manual_seed(3)
    fast = TradesAttack(model, eps, step, steps)(x, y).x_adv
    assert model.training, "the model's train mode was not restored"
    model.eval()
    torch.manual_seed(3)
    x_adv = x + 0.001 * torch.randn_like(x)
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(fast, x_adv, atol=1e-12, rtol=0)


def test_deepfool_on_trained_net_lands_just_across_the_boundary(trained):
    model, x, _ = trained
    result = DeepFool(model)(x)
    assert result.success.float().mean() > 0.9
    ok = result.success
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        assert (model(result.x_adv[ok]).argmax(1) != clean_pred[ok]).all()
        # Stepping back 1% towards x returns to the clean class for almost every sample (the
        # bisection brackets the crossing to 2⁻²⁰ of the segment).
        back = x[ok] + 0.99 * (result.x_adv[ok] - x[ok])
        returned = (model(back).argmax(1) == clean_pred[ok]).float().mean()
    assert returned > 0.9, f"only {returned:.0%} return to the clean class 1% before x_adv"
    torch.testing.assert_close(result.delta_norm[ok], _distance(result.x_adv[ok], x[ok], "l2").float())
    assert torch.isinf(result.delta_norm[~ok]).all()
    # No PGD-L2 attack at radius well below ρ can succeed where DeepFool says the boundary is far.
    assert (result.delta_norm[ok] > 0).all()


# ---------------------------------------------------------------------------------------------
# The model is left as found; no leaks


class _ModeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: set[bool] = set()

    def forward(self, x):
        self.seen.add(self.training)
        return x


def _guarded_model():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), _ModeProbe(), nn.BatchNorm1d(12), nn.Linear(12, 4)
    )
    model.train()
    model[4].eval()  # frozen batch-norm inside a training model must survive
    model[1].bias.requires_grad_(False)
    model[5].weight.grad = torch.full_like(model[5].weight, 3.0)
    return model


def _state(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


ALL_ATTACKS = [
    lambda m: FGSM(m, eps=0.1),
    lambda m: PGD(m, eps=0.1, steps=3, restarts=2),
    lambda m: PGD(m, eps=0.5, steps=3, norm="l2", step_size=0.2),
    lambda m: TradesAttack(m, 0.1, 0.02, 3),
    lambda m: APGD(m, eps=0.1, steps=5, loss="dlr"),
    lambda m: DeepFool(m, steps=5, bisection_steps=5),
    lambda m: APGDT(m, eps=0.1, steps=3),
    lambda m: Square(m, eps=0.1, n_queries=5),
    lambda m: FAB(m, eps=0.1, steps=3),
    lambda m: CW(m, steps=5, binary_search_steps=2),
]


@pytest.mark.filterwarnings("ignore:.*all-zero input gradient")
@pytest.mark.parametrize("make", ALL_ATTACKS)
def test_attacks_leave_the_model_as_found(make):
    model = _guarded_model()
    before = _state(model)
    x = torch.rand(8, 1, 4, 4)
    y = torch.randint(0, 4, (8,))
    attack = make(model)
    result = attack(x, y)
    after = _state(model)
    assert after[:2] == before[:2], "mode or requires_grad flags changed"
    for i, (a, b) in enumerate(zip(after[2], before[2], strict=True)):
        assert (a is None and b is None) or torch.equal(a, b), f"parameter {i}: .grad was touched"
    assert model[3].seen == {False}, "the attack did not run in eval mode"
    assert not result.x_adv.requires_grad and result.x_adv.grad_fn is None
    # Labels out of range fail inside the attack, after the model was switched: still restored.
    with pytest.raises(ValueError, match=r"y.*\[0, 4\)"):
        attack(x, torch.full((8,), 4))
    assert _state(model)[:2] == before[:2]


@pytest.mark.filterwarnings("ignore:.*all-zero input gradient")
@pytest.mark.parametrize("make", ALL_ATTACKS)
def test_attacks_run_inside_no_grad_and_refuse_inference_mode_clearly(make):
    # Evaluation loops often run under torch.no_grad(): the attack switches gradients on for
    # itself and gives the same result; inference mode cannot be switched off from inside, so it
    # is refused before any work, with the way out.
    model = _guarded_model()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    torch.manual_seed(3)
    want = make(model)(x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        got = make(model)(x, y)
    assert torch.equal(got.x_adv, want.x_adv) and torch.equal(got.success, want.success)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        make(model)(x, y)
    with torch.inference_mode():
        frozen_x = x.clone()
    with pytest.raises(ValueError, match="x: an inference tensor"):
        make(model)(frozen_x, y)


def test_saliency_and_jacobians_run_inside_no_grad():
    from fastsat import saliency
    from fastsat.alignment import linearization

    model = tiny_cnn().eval()
    x = torch.rand(4, 3, 8, 8)
    for method, options in (("gradient", {}), ("integrated_gradients", {}), ("gradcam_pp", {"layer": model[0]})):
        want = saliency.compute(method, model, x, **options)
        with torch.no_grad():
            assert torch.equal(saliency.compute(method, model, x, **options), want), method
    want = linearization(model, x).rho_tilde
    with torch.no_grad():
        assert torch.equal(linearization(model, x).rho_tilde, want)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("make", [ALL_ATTACKS[i] for i in (1, 3, 4, 5, 6, 7, 8, 9)])
def test_no_tensor_growth_over_100_calls(make):
    model = _guarded_model().eval()
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 4, (4,))
    attack = make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attack(x, y)
        baseline = _live_tensors()
        for _ in range(100):
            attack(x, y)
        grown = _live_tensors() - baseline
    assert grown <= 0, f"{grown} tensors still alive after 100 calls of {attack!r}"


@pytest.mark.parametrize("make", [
    lambda m, s: PGD(m, eps=0.1, steps=s, restarts=2),
    lambda m, s: PGD(m, eps=0.1, steps=s, loss="cw", targeted=True),
    lambda m, s: PGD(m, eps=0.5, step_size=0.1, steps=s, norm="l2", loss="dlr"),
    lambda m, s: APGD(m, eps=0.1, steps=s, loss="dlr", compact_every=None),
    lambda m, s: APGD(m, eps=0.5, steps=s, norm="l2", compact_every=None),
    lambda m, s: TradesAttack(m, 0.1, 0.02, s),
    lambda m, s: APGDT(m, eps=0.1, steps=s, n_target_classes=2, compact_every=None),
    lambda m, s: FAB(m, eps=None, steps=s, n_target_classes=2),
    lambda m, s: FAB(m, eps=0.1, steps=s, n_target_classes=2, compact_every=None),
    lambda m, s: CW(m, steps=s, binary_search_steps=2, abort_early=False),
])
def test_step_loops_do_not_sync_with_the_host(make):
    # Argument checks and the output audit sync a fixed number of times per call; the step loop
    # must not (each sync stalls a GPU). So the count must not grow from 2 to 12 steps. (With
    # compaction, one sync per compaction: tests/test_attacks_compaction.py.)
    model = _guarded_model().eval()
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 4, (4,))
    counts = []
    for steps in (2, 12):
        with warnings.catch_warnings(), HostReads() as counter:
            warnings.simplefilter("ignore")
            make(model, steps)(x, y)
        counts.append(counter.count)
    assert counts[0] == counts[1], f"host syncs grow with the steps: {counts[0]} at 2 steps, {counts[1]} at 12"


# ---------------------------------------------------------------------------------------------
# Audit, warnings, errors


def test_audit_raises_on_an_output_outside_the_ball(monkeypatch):
    model = linear_model(3, PIXELS)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    real_step = ops.pgd_step

    def leaky_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        x_new, stats = out if kwargs.get("return_stats") else (out, None)
        x_new = x_new + 0.01 * (1 - 2 * x_new.round())  # 0.01 further out, still in [0, 1]
        return (x_new, stats) if kwargs.get("return_stats") else x_new

    monkeypatch.setattr(ops, "pgd_step", leaky_step)
    with pytest.raises(RuntimeError, match="within eps"):
        PGD(model, eps=0.05, steps=2)(x, y)


def test_probabilities_and_zero_gradients_warn():
    model = nn.Sequential(linear_model(3, PIXELS).float(), nn.Softmax(dim=1))
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="probabilities"):
        PGD(model, steps=1)(x, y)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        flat[1].weight.zero_()
    with pytest.warns(UserWarning, match="4 of 4 samples have an all-zero input gradient"):
        result = APGD(flat, steps=2)(x, y)
    assert torch.equal(result.x_adv, result.x_adv.clamp(0, 1))


def test_bad_arguments_raise_clear_errors():
    model = linear_model(3, PIXELS).float()
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="eps"):
        PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        TradesAttack(model, -1.0)
    with pytest.raises(ValueError, match="steps"):
        APGD(model, steps=0)
    with pytest.raises(ValueError, match="norm"):
        PGD(model, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        PGD(model, loss="dlr", targeted=True)
    with pytest.raises(ValueError, match="restarts"):
        PGD(model, restarts=2, random_start=False)
    with pytest.raises(ValueError, match="mode"):
        FGSM(model, mode="test")
    with pytest.raises(ValueError, match=r"y.*\[0, 3\)"):
        PGD(model, steps=1)(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="y"):
        PGD(model)(x, y.float())
    with pytest.raises(ValueError, match="y"):
        PGD(model)(x, None)
    with pytest.raises(ValueError, match="device"):
        PGD(linear_model(3, PIXELS).float().to("meta"))(x, y)
    with pytest.raises(ValueError, match="dlr"):
        APGD(linear_model(2, PIXELS).float(), loss="dlr")(x, torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match=r"x: expected finite values inside clip"):
        FGSM(model)(x + 1.5, y)
    with pytest.raises(ValueError, match=r"x: expected finite values inside clip"):
        DeepFool(model)(x.masked_fill(x > 0.5, float("nan")))


@pytest.mark.parametrize("real", [np.float64, np.float32, torch.tensor], ids=["np.float64", "np.float32", "tensor"])
def test_every_attack_accepts_any_real_where_a_number_is_meant(real):
    # ops.pgd_step takes a numpy eps; the attacks built on it must too (an ε read from a config
    # or computed with numpy), and give the same batch as with the Python float.
    model = linear_model(4, PIXELS)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    # Values exact in float32, so that every conversion gives the same float.
    for cls, kwargs in [
        (PGD, {"eps": 0.125, "step_size": 0.03125, "steps": 2}),
        (FGSM, {"eps": 0.125, "step_size": 0.15625}),
        (APGD, {"eps": 0.125, "steps": 3, "rho": 0.75}),
        (TradesAttack, {"eps": 0.125, "step_size": 0.03125, "steps": 2, "init_std": 2.0**-10}),
        (DeepFool, {"steps": 3, "overshoot": 2.0**-6}),
    ]:
        converted = {k: real(v) if isinstance(v, float) else v for k, v in kwargs.items()}
        converted["clip"] = (real(0.0), real(1.0))
        torch.manual_seed(1)
        expected = cls(model, **kwargs)(x, y)
        torch.manual_seed(1)
        attack = cls(model, **converted)
        assert all(type(v) is float for v in (attack.eps, *attack.clip) if v is not None), cls.__name__
        assert torch.equal(attack(x, y).x_adv, expected.x_adv), cls.__name__


def test_argument_errors_name_the_argument_and_the_kind():
    model = linear_model(3, PIXELS).float()
    with pytest.raises(TypeError, match="eps"):
        PGD(model, eps="0.1")
    with pytest.raises(TypeError, match="step_size"):
        PGD(model, step_size=True)
    with pytest.raises(ValueError, match="rho"):
        APGD(model, rho=1.5)
    with pytest.raises(ValueError, match="candidates"):
        DeepFool(model, candidates=1)
    with pytest.raises(ValueError, match=r"norm.*did you mean 'linf'"):
        PGD(model, norm="linfty")
    with pytest.raises(ValueError, match="backend"):
        APGD(model, backend="gpu")
    with pytest.raises(ValueError, match="clip"):
        PGD(model, clip=(1.0, 0.0))
    with pytest.raises(TypeError, match="backend"):
        DeepFool(model, backend="torch")  # DeepFool runs no fused op: no backend argument


@pytest.mark.parametrize("make", [
    lambda m: FGSM(m, eps=0.125),
    lambda m: PGD(m, eps=0.125, step_size=0.125, steps=1, random_start=False),
    lambda m: TradesAttack(m, eps=0.125, step_size=0.125, steps=1, init_std=0.0),
], ids=["fgsm", "pgd", "trades"])
def test_float16_step_uses_the_float32_gradient_unrounded(monkeypatch, make):
    # Input gradients come in float32 (InputGrad's contract). Entries below float16's smallest
    # subnormal (6e-8) must still give their sign to the step: a float16 x moves exactly as a
    # float32 x would on the same gradient, rounded once to float16. Rounding the gradient to
    # float16 first (the old code) flushed them to 0, and those pixels did not move.
    model = linear_model(3, PIXELS).half()
    x = (0.25 + 0.5 * torch.rand(4, 1, 4, 4)).half()
    y = torch.randint(0, 3, (4,))
    grad = torch.randn(4, 1, 4, 4)
    grad[:, :, :2] *= 1e-9
    assert (grad.half()[:, :, :2] == 0).all(), "the construction needs entries that flush in float16"
    real_input_grad = base.raw_input_grad

    def injected(*args, **kwargs):
        return real_input_grad(*args, **kwargs)._replace(grad=grad.clone())

    monkeypatch.setattr(base, "raw_input_grad", injected)
    x_adv = make(model)(x, y).x_adv
    expected = (x.float() + 0.125 * grad.sign()).clamp(0, 1).half()
    assert x_adv.dtype == torch.float16
    torch.testing.assert_close(x_adv, expected, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:.*all-zero input gradient")
def test_pgd_under_bf16_autocast_stays_valid_and_still_attacks(trained):
    model, x, y = trained
    torch.manual_seed(0)
    exact = PGD(model, eps=EPS, step_size=EPS / 4)(x, y)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = PGD(model, eps=EPS, step_size=EPS / 4)(x, y)
    assert low.x_adv.dtype == torch.float32 and low.stats.grad_norm.dtype == torch.float32
    _assert_in_ball_and_box(low, x, EPS, "linf")
    # bf16 logits round at 2^-9 relative: a few near-boundary samples may end up differently.
    changed = (low.success != exact.success).sum().item()
    assert changed <= 3, f"{changed} of 64 samples change outcome under bf16 autocast"


def test_functional_twins_match_the_classes(trained):
    model, x, y = trained
    for cls, fn, kwargs in [(PGD, pgd, {"steps": 3}), (APGD, apgd, {"steps": 5}), (FGSM, fgsm, {})]:
        torch.manual_seed(3)
        a = cls(model, **kwargs)(x, y).x_adv
        torch.manual_seed(3)
        b = fn(model, x, y, **kwargs).x_adv
        assert torch.equal(a, b), cls.__name__


def _project(v, x_nat, eps, norm):
    if norm == "linf":
        v = torch.min(torch.max(v, x_nat - eps), x_nat + eps)
    else:
        delta = v - x_nat
        d_norm = delta.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        v = x_nat + delta * torch.clamp(eps / d_norm, max=1.0)
    return v.clamp(0, 1)


def _reference_apgd(model, x, y, x_start, eps, steps, norm):
    """APGD-CE as the paper states it (Croce & Hein 2020, Alg. 1), one sample at a time in
    float64: checkpoints w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1}
    − 0.03, 0.06); at a checkpoint halve η and restart from x_max if f increased in at most 75%
    of the steps since the last checkpoint, or if η was not halved at the previous checkpoint and
    f_max has not changed since."""
    p = [Fraction(0), Fraction(22, 100)]  # exact: ⌈0.7·30⌉ must be 21, not 22
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    checkpoints = sorted({math.ceil(q * steps) for q in p[1:] if math.ceil(q * steps) <= steps})
    out = []
    for b in range(x.shape[0]):
        xb, yb, x_nat = None, y[b : b + 1], x[b : b + 1]

        def loss_grad(v, yb=yb):
            v = v.clone().requires_grad_(True)
            logits = model(v)
            loss = F.cross_entropy(logits, yb)
            (g,) = torch.autograd.grad(loss, v)
            return loss.item(), g, logits.argmax(1).item() != yb.item()

        def direction(g):
            return g.sign() if norm == "linf" else g / g.norm()

        eta = 2 * eps
        xb = x_start[b : b + 1].clone()
        f, g, adv = loss_grad(xb)
        history = [f]
        x_max, g_max, f_max = xb, g, f
        x_last_adv = xb if adv else None
        x_prev = xb
        reduced_before, f_max_at_check, last_check = True, f_max, 0
        for k in range(steps):
            z = _project(xb + eta * direction(g), x_nat, eps, norm)
            x_new = z if k == 0 else _project(xb + 0.75 * (z - xb) + 0.25 * (xb - x_prev), x_nat, eps, norm)
            x_prev, xb = xb, x_new
            f, g, adv = loss_grad(xb)
            history.append(f)
            if adv:
                x_last_adv = xb
            if f > f_max:
                x_max, g_max, f_max = xb, g, f
            if k + 1 in checkpoints:
                window = range(last_check, k + 1)
                increases = sum(history[i + 1] > history[i] for i in window)
                reduce = increases <= 0.75 * len(window) or (not reduced_before and f_max_at_check >= f_max)
                if reduce:
                    eta /= 2
                    xb, g = x_max, g_max
                reduced_before, f_max_at_check, last_check = reduce, f_max, k + 1
        out.append(x_last_adv if x_last_adv is not None else x_max)
    return torch.cat(out)


@pytest.mark.parametrize("norm, eps", [("linf", EPS), ("l2", 0.4)])
def test_apgd_follows_the_paper_schedule(trained, norm, eps):
    model, x, y = trained
    model64 = copy.deepcopy(model).double()
    x64 = x[:16].double()
    torch.manual_seed(11)
    start = ops.random_start(x64, eps=eps, norm=norm)
    torch.manual_seed(11)
    result = APGD(model64, eps=eps, steps=30, norm=norm, compact_every=None)(x64, y[:16])
    expected = _reference_apgd(model64, x64, y[:16], start, eps, 30, norm)
    # Same float64 arithmetic up to summation order (batched vs per-sample forward).
    worst = (result.x_adv - expected).abs().flatten(1).amax(1)
    assert (worst <= 1e-9).all(), f"samples {(worst > 1e-9).nonzero().flatten().tolist()} differ by {worst.max():.3g}"
    # Compacted (the default), the broken points stop early; the others follow the same schedule.
    torch.manual_seed(11)
    compacted = APGD(model64, eps=eps, steps=30, norm=norm)(x64, y[:16])
    robust = ~result.success
    assert robust.any() and (~robust).any(), "the test needs both kinds of points"
    assert torch.equal(compacted.success, result.success)
    assert (compacted.x_adv - expected)[robust].abs().max() <= 1e-9


def test_apgd_checkpoints_for_100_iterations_are_the_papers():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_halves_on_oscillation_at_exactly_rho_and_on_a_stalled_best_loss():
    # Window of 4 steps, ρ = 0.75: sample 0 rose 4 times and improved (keeps its step); sample 1
    # rose exactly 3 = ρ·4 times (halves: "at most ρ"); samples 2 and 3 rose 4 times but their best
    # loss did not improve since the last checkpoint: 2 was not halved there (halves), 3 was (keeps).
    rises = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 2.5], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    losses = [torch.tensor(col, dtype=torch.float64) for col in zip(*rises)]
    loss_best = torch.tensor([4.0, 3.0, 9.0, 9.0], dtype=torch.float64)
    loss_best_at_check = torch.tensor([1.0, 1.0, 9.0, 9.0], dtype=torch.float64)
    reduced_at_check = torch.tensor([False, False, False, True])
    reduce = halve_step(losses, loss_best, loss_best_at_check, reduced_at_check, 0.75)
    assert reduce.tolist() == [False, True, True, False]


def test_restart_merge_prefers_success_then_higher_loss_and_keeps_ties():
    # Per sample: 0 new success wins; 1 old success kept against a higher-loss failure; 2 both
    # failed, higher loss wins; 3 both failed with equal loss, the earlier run is kept.
    def candidate(fill, success, value):
        stats = ops.StepStats(*(torch.full((4,), fill) for _ in range(4)))
        return Candidate(torch.full((4, 1, 2, 2), fill), torch.tensor(success), torch.tensor(value), stats)

    old = candidate(0.0, [False, True, False, False], [5.0, 1.0, 1.0, 2.0])
    new = candidate(1.0, [True, False, False, False], [0.0, 9.0, 3.0, 2.0])
    merged = old.merge(new)
    took_new = [True, False, True, False]
    assert merged.x_adv.flatten(1).amax(1).tolist() == [float(t) for t in took_new]
    assert merged.success.tolist() == [True, True, False, False]
    assert merged.value.tolist() == [0.0, 1.0, 3.0, 2.0]
    assert merged.stats.delta_norm.tolist() == [float(t) for t in took_new]


def test_deepfool_flags_samples_it_cannot_move():
    # Constant logits: no gradient, no boundary. Every sample must come back failed with ρ = inf.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight.zero_()
    x = torch.rand(5, 1, 4, 4)
    with pytest.warns(UserWarning, match="all-zero input gradient"):
        result = DeepFool(model, steps=3)(x)
    assert not result.success.any()
    assert torch.isinf(result.delta_norm).all()
    assert (result.iterations == 0).all()
    assert torch.equal(result.x_adv, x)


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=0.1, step_size=0.03, steps=3),
    lambda m: FGSM(m, eps=0.1, step_size=0.125, random_start=True),
    lambda m: TradesAttack(m, eps=0.1, step_size=0.03, steps=3),
], ids=["pgd", "fgsm", "trades"])
def test_perturb_returns_the_call_batch_without_the_final_forward(make):
    """perturb (the training path) gives the same batch as a call from the same RNG state, with
    one forward pass fewer: the one that only the success flags need."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 4, (5,))
    attack = make(model)
    torch.manual_seed(7)
    full = attack(x, y)
    calls_full = len(forwards)
    forwards.clear()
    torch.manual_seed(7)
    x_adv = attack.perturb(x, y)
    assert torch.equal(x_adv, full.x_adv)
    assert len(forwards) == calls_full - 1
