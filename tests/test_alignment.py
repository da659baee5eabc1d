"""Tests of fastsat.alignment: Etmann et al.'s identities on tiny analytic models, the
correlation formulas and the per-sample table; the module's imports.

Models are float64 on 2×8×8 inputs. fastsat.grad returns input gradients and Jacobians in
float32, so quantities built from them carry float32 rounding (relative ≈ 6e-8 per element,
summed over 128 elements of either sign); the tolerances below state how much of it they allow.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastsat import alignment as al
from fastsat.grad import logit_jacobian

C, H, W, K = 2, 8, 8, 5
D = C * H * W


def images(batch: int = 6) -> torch.Tensor:
    return torch.rand(batch, C, H, W, dtype=torch.float64)


def relu_net(bias: bool) -> nn.Sequential:
    """conv → ReLU → max-pool → linear (no batch-norm): positively one-homogeneous iff bias=False."""
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (H // 2) * (W // 2), K, bias=bias),
    ).double()


def linear_binary(w: torch.Tensor) -> nn.Sequential:
    """Ψ(x) = (⟨w, x⟩, −⟨w, x⟩), no bias: Etmann's Lemma 1 model as a 2-class classifier."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([w, -w]))
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (actual.double() - expected.double()).abs() / expected.double().abs()


def reference_linearization(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 ρ̃, j*, α_bin, β, ‖∇Ψ^{i*j*}‖ by autograd, one sample and one class at a time;
    dot_scale = Σ|x|(|∇Ψ^{i*}| + |∇Ψ^{j*}|) bounds how rounding the two Jacobian rows moves
    ⟨x, ∇Ψ^{i*j*}⟩."""
    keys = ("rho_tilde", "j_star", "alpha_bin", "beta", "grad_norm", "dot_scale")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for xb in x:
        xb = xb[None].clone().requires_grad_(True)
        logits = model(xb)[0].detach()
        out_b = model(xb)[0]
        grads = [torch.autograd.grad(out_b[k], xb, retain_graph=True)[0][0] for k in range(logits.numel())]
        i = int(logits.argmax())
        best = None
        for j in range(logits.numel()):
            if j == i:
                continue
            g = grads[i] - grads[j]
            ratio = float(logits[i] - logits[j]) / float(g.norm())
            if best is None or ratio < best[0]:
                best = (ratio, j, g)
        ratio, j, g = best
        dot = float((xb[0].detach() * g).sum())
        out["rho_tilde"].append(ratio)
        out["j_star"].append(j)
        out["alpha_bin"].append(abs(dot) / float(g.norm()))
        out["beta"].append(float(logits[i] - logits[j]) - dot)
        out["grad_norm"].append(float(g.norm()))
        out["dot_scale"].append(float((xb[0].detach().abs() * (grads[i].abs() + grads[j].abs())).sum()))
    return {k: torch.tensor(v, dtype=torch.long if k == "j_star" else torch.float64) for k, v in out.items()}


def test_linear_binary_model_alpha_equals_rho_tilde_equals_distance() -> None:
    torch.manual_seed(0)
    w = torch.randn(D, dtype=torch.float64)
    x = images(8)
    model = linear_binary(w)
    distance = (x.flatten(1) @ w).abs() / w.norm()  # Lemma 1: |⟨w, x⟩| / ‖w‖
    stats = al.saliency_alignment(model, x)
    lin = al.linearization(model, x)
    for name, value in (("alpha", stats.alignment), ("rho_tilde", lin.rho_tilde), ("alpha_bin", lin.alpha_bin)):
        err = rel_err(value, distance)
        assert err.max() < 1e-5, f"{name} vs |<w,x>|/||w||: relative errors {err.tolist()}"
    assert torch.equal(lin.j_star, 1 - lin.prediction)


def test_linear_binary_model_boundary_distance() -> None:
    torch.manual_seed(1)
    w = torch.randn(D, dtype=torch.float64)
    # Inputs in [0.25, 0.75]: the minimal step (≈ 0.05 per element here) stays inside the [0, 1]
    # box, where Lemma 1's unconstrained distance is the constrained one.
    x = 0.25 + 0.5 * images(8)
    distance = (x.flatten(1) @ w).abs() / w.norm()
    rho = al.boundary_distance(linear_binary(w), x)
    assert torch.isfinite(rho).all(), f"DeepFool found no boundary for some samples: {rho.tolist()}"
    err = rel_err(rho, distance)
    assert err.max() < 1e-5, f"rho vs |<w,x>|/||w||: relative errors {err.tolist()}"


def jacobian_rounding() -> float:
    """Unit roundoff of the Jacobian fastsat.grad returns (float32 today, even for float64 models)."""
    return torch.finfo(logit_jacobian(linear_binary(torch.ones(D, dtype=torch.float64)), images(1)).dtype).eps / 2


def test_bias_free_relu_net_is_homogeneous_theorem_1() -> None:
    torch.manual_seed(2)
    model, x = relu_net(bias=False), images()
    lin = al.linearization(model, x)
    ref = reference_linearization(model, x)
    assert torch.equal(lin.j_star, ref["j_star"]), f"j*: {lin.j_star.tolist()} vs reference {ref['j_star'].tolist()}"
    # Exactly β = 0 and ρ̃ = α_bin in exact arithmetic. Rounding each Jacobian entry (unit roundoff
    # u) moves ⟨x, ∇Ψ^{i*j*}⟩ by at most u·dot_scale, so |β| ≤ u·dot_scale (×2 for the float64
    # logits and sums) and |ρ̃ − α_bin| ≤ |β|/‖g‖. On top, rel 1e-5 as asked. With float64 Jacobians
    # the floor vanishes (1e-16) and the test is the plain rel 1e-5; with float32 Jacobians a
    # sample whose margin is ~1e-4 of its logits needs the floor.
    floor = 2 * jacobian_rounding() * ref["dot_scale"]
    assert (lin.beta.abs() <= floor).all(), f"β = {lin.beta.tolist()} exceeds the rounding floor {floor.tolist()}"
    gap = (lin.rho_tilde - lin.alpha_bin).abs()
    allowed = 1e-5 * lin.rho_tilde + floor / lin.grad_norm
    assert (gap <= allowed).all(), f"|ρ̃ − α_bin| = {gap.tolist()} > allowed {allowed.tolist()}"
    err = (lin.rho_tilde - ref["rho_tilde"]).abs()
    assert (err <= allowed).all(), f"ρ̃ vs float64 reference: errors {err.tolist()} > {allowed.tolist()}"


def test_biased_relu_net_gap_is_bounded_by_beta_theorem_2() -> None:
    torch.manual_seed(3)
    model, x = relu_net(bias=True), images()
    with torch.no_grad():  # biases large enough that β is not negligible
        model[0].bias.uniform_(-0.5, 0.5)
        model[4].bias.uniform_(-0.5, 0.5)
    lin = al.linearization(model, x)
    ref = reference_linearization(model, x)
    assert torch.equal(lin.j_star, ref["j_star"])
    # Rounding floor of the Jacobian on ⟨x, ∇Ψ^{i*j*}⟩, as in the previous test.
    floor = 2 * jacobian_rounding() * ref["dot_scale"]
    assert ((lin.beta - ref["beta"]).abs() <= floor).all(), (
        f"β {lin.beta.tolist()} vs reference {ref['beta'].tolist()}"
    )
    assert rel_err(lin.grad_norm, ref["grad_norm"]).max() < 1e-5
    for name in ("rho_tilde", "alpha_bin"):
        err = (getattr(lin, name) - ref[name]).abs()
        allowed = 1e-5 * ref[name] + floor / ref["grad_norm"]
        assert (err <= allowed).all(), (
            f"{name} vs float64 reference: errors {err.tolist()} > {allowed.tolist()}"
        )
    gap = (lin.rho_tilde - lin.alpha_bin).abs()
    assert gap.max() > 0.1 * lin.rho_tilde.abs().max(), "with biases ρ̃ and α_bin should differ"
    # ρ̃‖g‖ = ⟨x, g⟩ + β and α_bin‖g‖ = |⟨x, g⟩| ⇒ |ρ̃ − α_bin| ≤ |β|/‖g‖ (reverse triangle
    # inequality), with equality when ⟨x, g⟩ and ⟨x, g⟩ + β have the same sign.
    bound = lin.beta.abs() / lin.grad_norm
    slack = 1e-5 * lin.rho_tilde.abs() + floor / lin.grad_norm
    assert (gap <= bound + slack).all(), f"|ρ̃ − α_bin| = {gap.tolist()} exceeds |β|/‖g‖ = {bound.tolist()}"
    dot = lin.rho_tilde * lin.grad_norm - lin.beta  # ⟨x, g⟩
    same_sign = dot > 0
    assert same_sign.any()
    assert ((gap - bound).abs() <= slack)[same_sign].all(), "the bound is an equality when ⟨x, g⟩ > 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_linearization_keeps_the_float32_jacobian(dtype) -> None:
    # A bias-free linear model in half precision: ∇Ψ^k = W[k] exactly (one-hot backward), so α_bin
    # and ρ̃ are exact functions of the half-precision x, W and logits. The row differences
    # W[i*] − W[j] must be taken in float32: rounded to float16/bfloat16 they are off by up to
    # 2^-11 / 2^-8 relative, which moved α_bin by 0.2% / 2% here. Allowed: float32 sums over 128
    # elements, 1e-5 relative.
    torch.manual_seed(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 3, bias=False)).to(dtype)
    x = torch.rand(6, C, H, W).to(dtype)
    lin = al.linearization(model, x)
    w, xd = model[1].weight.double(), x.double().flatten(1)
    logits = model(x).double()
    rows = torch.arange(6)
    diff = w[lin.prediction] - w[lin.j_star]
    alpha_bin = (xd * diff).sum(1).abs() / diff.norm(dim=1)
    rho_tilde = (logits[rows, lin.prediction] - logits[rows, lin.j_star]) / diff.norm(dim=1)
    assert torch.equal(lin.prediction, logits.argmax(1))
    assert rel_err(lin.alpha_bin, alpha_bin).max() < 1e-5, f"α_bin: relative errors {rel_err(lin.alpha_bin, alpha_bin)}"
    assert rel_err(lin.rho_tilde, rho_tilde).max() < 1e-5, f"ρ̃: relative errors {rel_err(lin.rho_tilde, rho_tilde)}"
    stats = al.saliency_alignment(model, x)
    g = w[lin.prediction]
    alpha = (xd * g).sum(1).abs() / g.norm(dim=1)
    assert rel_err(stats.alignment, alpha).max() < 1e-5


def test_alignment_targets_against_autograd() -> None:
    torch.manual_seed(4)
    model, x = relu_net(bias=True), images()
    y = torch.randint(0, K, (x.shape[0],))
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    grads = {
        "predicted": torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), xr, retain_graph=True)[0],
        "label": torch.autograd.grad(logits.gather(1, y[:, None]).sum(), xr, retain_graph=True)[0],
        "loss": torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), xr)[0],
    }
    for target, g in grads.items():
        stats = al.saliency_alignment(model, x, target=target, y=y)
        dot = (x * g).flatten(1).sum(1)
        alpha = dot.abs() / g.flatten(1).norm(dim=1)
        cosine = alpha / x.flatten(1).norm(dim=1)
        assert rel_err(stats.alignment, alpha).max() < 1e-5, f"alignment, target={target}"
        assert rel_err(stats.cosine, cosine).max() < 1e-5, f"cosine, target={target}"
    with pytest.raises(ValueError, match="y"):
        al.saliency_alignment(model, x, target="label")
    with pytest.raises(ValueError, match="target"):
        al.saliency_alignment(model, x, target="true")


def test_alignment_warns_on_all_zero_saliency_maps() -> None:
    model = linear_binary(torch.zeros(D, dtype=torch.float64))
    with pytest.warns(UserWarning, match="3 of 3 samples have an all-zero saliency map"):
        stats = al.saliency_alignment(model, images(3))
    assert torch.equal(stats.alignment, torch.zeros(3, dtype=torch.float64))


def test_thin_wrappers_agree_with_linearization_and_restore_the_model() -> None:
    torch.manual_seed(5)
    model, x = relu_net(bias=True).train(), images()
    lin = al.linearization(model, x, chunk_size=2)
    assert torch.equal(al.linearized_robustness(model, x).rho_tilde, lin.rho_tilde)
    assert torch.equal(al.binarized_alignment(model, x).alpha_bin, lin.alpha_bin)
    assert torch.equal(al.homogeneity_defect(model, x).beta, lin.beta)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# --- correlations against textbook formulas (no numpy / scipy) ------------------------------------

def pearson_textbook(xs: list[float], ys: list[float]) -> float:
    """r = (nΣxy − ΣxΣy) / sqrt((nΣx² − (Σx)²)(nΣy² − (Σy)²))."""
    n = len(xs)
    sx, sy = sum(xs), sum(ys)
    sxy = sum(a * b for a, b in zip(xs, ys, strict=True))
    sxx, syy = sum(a * a for a in xs), sum(b * b for b in ys)
    return (n * sxy - sx * sy) / math.sqrt((n * sxx - sx * sx) * (n * syy - sy * sy))


def test_pearson_and_spearman_against_reference_formulas() -> None:
    rng = random.Random(6)
    xs = [rng.gauss(0, 1) for _ in range(40)]
    ys = [0.5 * a + rng.gauss(0, 1) for a in xs]
    assert al.pearson(xs, ys) == pytest.approx(pearson_textbook(xs, ys), rel=1e-12)
    # No ties: ρ_s = 1 − 6 Σ d² / (n (n² − 1)).
    rank_x = {v: r + 1 for r, v in enumerate(sorted(xs))}
    rank_y = {v: r + 1 for r, v in enumerate(sorted(ys))}
    d2 = sum((rank_x[a] - rank_y[b]) ** 2 for a, b in zip(xs, ys, strict=True))
    n = len(xs)
    assert al.spearman(xs, ys) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), rel=1e-12)
    # Monotone but non-linear: Spearman 1, Pearson below 1.
    cubes = [a**3 for a in xs]
    assert al.spearman(xs, cubes) == pytest.approx(1.0, rel=1e-12)
    assert al.pearson(xs, cubes) < 0.99


def test_spearman_with_ties_and_non_finite_values() -> None:
    # Average ranks: a = [1, 2, 2, 3] → [1, 2.5, 2.5, 4]; b = [10, 20, 30, 40] → [1, 2, 3, 4].
    a, b = [1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0]
    assert al.spearman(a, b) == pytest.approx(pearson_textbook([1, 2.5, 2.5, 4], [1, 2, 3, 4]), rel=1e-12)
    # Non-finite pairs are dropped, not propagated.
    assert al.pearson(a + [math.nan], b + [1.0]) == pytest.approx(pearson_textbook(a, b), rel=1e-12)
    assert al.spearman(a + [3.0], b + [math.inf]) == pytest.approx(al.spearman(a, b), rel=1e-12)
    assert math.isnan(al.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])), "constant input has no correlation"
    assert math.isnan(al.spearman([1.0], [2.0]))




# --- the table -----------------------------------------------------------------------------------

def test_analysis_rows_of_the_linear_binary_model_are_lemma_1() -> None:
    torch.manual_seed(10)
    w = torch.randn(D, dtype=torch.float64)
    x = 0.25 + 0.5 * images(4)  # the minimal step stays inside the [0, 1] box (see above)
    y = torch.tensor([0, 1, 1, 0])
    rows = al.analysis_rows(linear_binary(w), x, y, start=7)
    assert [list(r) for r in rows] == [list(al.TABLE_COLUMNS)] * 4
    assert [r["index"] for r in rows] == [7, 8, 9, 10] and [r["label"] for r in rows] == y.tolist()
    score = x.flatten(1) @ w
    distance = score.abs() / w.norm()
    cosine = distance / x.flatten(1).norm(dim=1)
    assert [r["prediction"] for r in rows] == (score < 0).long().tolist()
    assert [r["j_star"] for r in rows] == (score >= 0).long().tolist()
    for name, want in (("alpha", distance), ("alpha_bin", distance), ("rho_tilde", distance), ("rho", distance),
                       ("cosine", cosine)):
        err = rel_err(torch.tensor([r[name] for r in rows]), want)
        assert err.max() < 1e-5, f"{name} vs Lemma 1: relative errors {err.tolist()}"
    summary = al.analysis_summary(rows)
    assert summary["n"] == 4 and summary["accuracy"] == (y == (score < 0).long()).double().mean().item()
    assert summary["n_pairs_alpha_rho"] == 4
    with pytest.raises(TypeError, match="y: expected"):
        al.analysis_rows(linear_binary(w), x, y.double())
    with pytest.raises(ValueError, match="y: expected"):
        al.analysis_rows(linear_binary(w), x, y[:3])
    with pytest.raises(ValueError, match="rows"):
        al.analysis_summary([])


def test_importing_the_metrics_does_not_import_matplotlib() -> None:
    # Plotting is the report layer's job; the metrics (and evaluation) must import without it.
    code = "import sys, fastsat.alignment, fastsat.evaluate; print(sorted(m for m in sys.modules if 'matplotlib' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"matplotlib modules imported: {out.stdout.strip()}"
