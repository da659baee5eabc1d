"""Tests of fastsat.saliency against analytic answers and hand-written references.

Tiny float64 models on 2×8×8 inputs keep this file to a few seconds. fastsat.grad returns input
gradients in float32, so every map carries float32 rounding (relative 2^-24 ≈ 6e-8 per element);
tolerances below are stated relative to that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsat import saliency

C, H, W, K = 2, 8, 8, 5


def _seed(n: int) -> None:
    torch.manual_seed(n)


def relu_net(bias: bool = True, inplace: bool = False) -> nn.Sequential:
    """conv → ReLU → max-pool → linear: positively one-homogeneous when bias=False."""
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1, bias=bias),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (H // 2) * (W // 2), K, bias=bias),
    ).double()


def smooth_net() -> nn.Sequential:
    """Smooth (tanh / softplus) net with biases: the IG path integrand is smooth, so the
    trapezoid rule converges as 1/steps² and completeness is limited only by rounding."""
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * H * W, 16), nn.Softplus(),
        nn.Linear(16, K),
    ).double()


def images(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, C, H, W, dtype=torch.float64)


def reference_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64 ∇ₓ Ψ^target by plain autograd (the model must be in eval mode already)."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return g


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Relative error measured against the largest reference magnitude (maps have zeros)."""
    expected = expected.to(actual.dtype)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} × max |expected| {scale:.3e}"


def test_gradient_matches_autograd_for_predicted_and_given_targets() -> None:
    _seed(0)
    model, x = relu_net().eval(), images()
    predicted = model(x).argmax(dim=1)
    g = saliency.gradient(model, x)
    assert g.dtype == torch.float32 and g.shape == x.shape
    # Only the float32 rounding of the returned gradient: 1e-6 ≫ 6e-8.
    assert_close(g, reference_grad(model, x, predicted), 1e-6, "gradient, predicted class")
    given = torch.tensor([3, 0, 4, 1])
    assert_close(saliency.gradient(model, x, given), reference_grad(model, x, given), 1e-6, "gradient, tensor target")
    twos = torch.full((4,), 2)
    assert_close(saliency.gradient(model, x, 2), reference_grad(model, x, twos), 1e-6, "gradient, int target")


def test_gradient_x_input_sums_to_the_logit_for_a_homogeneous_net() -> None:
    _seed(1)
    model, x = relu_net(bias=False), images()
    logits = model(x).detach()
    target = logits.argmax(dim=1)
    totals = saliency.gradient_x_input(model, x).double().sum(dim=(1, 2, 3))
    expected = logits.gather(1, target[:, None]).squeeze(1)
    # Euler: Σ x ⊙ ∇Ψ = Ψ exactly; only the float32 gradient (rel 6e-8 per term, C·H·W = 128 terms
    # of either sign) separates them — 1e-5 of the logit leaves room for cancellation.
    err = (totals - expected).abs() / expected.abs()
    assert err.max() < 1e-5, f"Euler identity off by relative {err.tolist()}"


@pytest.mark.parametrize("baseline", [None, "random"])
def test_integrated_gradients_completeness(baseline: str | None) -> None:
    _seed(2)
    model, x = smooth_net().eval(), images()
    base = None if baseline is None else torch.rand_like(x)
    ig = saliency.integrated_gradients(model, x, baseline=base, steps=256)
    target = model(x).argmax(dim=1)
    x0 = torch.zeros_like(x) if base is None else base
    with torch.no_grad():
        gap = (model(x) - model(x0)).gather(1, target[:, None]).squeeze(1)
    rel = (ig.double().sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()
    assert rel.max() < 0.01, f"completeness: relative gaps {rel.tolist()} (≥ 1%), F(x)−F(x') = {gap.tolist()}"


@pytest.mark.parametrize("method", ["trapezoid", "left", "right", "midpoint"])
def test_integrated_gradients_is_exact_for_a_linear_model(method: str) -> None:
    _seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).double().eval()
    x, base = images(), torch.rand(1, C, H, W, dtype=torch.float64)  # baseline broadcast over the batch
    target = torch.tensor([0, 1, 2, 3])
    ig = saliency.integrated_gradients(model, x, target, baseline=base, steps=3, method=method)
    # Constant gradient: every quadrature rule integrates it exactly, IG = (x − x') ⊙ w_target.
    expected = (x - base) * model[1].weight[target].reshape(4, C, H, W)
    assert_close(ig, expected.detach(), 1e-6, f"IG ({method}) on a linear model")


def test_integrated_gradients_chunked_equals_unchunked() -> None:
    _seed(4)
    model, x = relu_net(), images()
    full = saliency.integrated_gradients(model, x, steps=30)
    for chunk in (1, 7, 30, 100):
        chunked = saliency.integrated_gradients(model, x, steps=30, chunk_size=chunk)
        assert torch.equal(chunked, full), f"chunk_size={chunk}: max diff {(chunked - full).abs().max():.3e}"


@pytest.mark.parametrize("variant", ["mean", "squared", "vargrad"])
def test_smoothgrad_chunked_equals_unchunked(variant: str) -> None:
    _seed(5)
    model, x = relu_net(), images()
    full = saliency.smoothgrad(model, x, n_samples=12, variant=variant, seed=11)
    for chunk in (1, 5, 12):
        chunked = saliency.smoothgrad(model, x, n_samples=12, variant=variant, seed=11, chunk_size=chunk)
        assert torch.equal(chunked, full), f"chunk_size={chunk}: max diff {(chunked - full).abs().max():.3e}"
    other_seed = saliency.smoothgrad(model, x, n_samples=12, variant=variant, seed=12)
    assert not torch.equal(other_seed, full), "a different seed drew the same noise"


def test_smoothgrad_without_seed_follows_the_global_rng() -> None:
    _seed(6)
    model, x = relu_net(), images()
    torch.manual_seed(123)
    first = saliency.smoothgrad(model, x, n_samples=4)
    torch.manual_seed(123)
    assert torch.equal(saliency.smoothgrad(model, x, n_samples=4), first)


def test_smoothgrad_with_tiny_sigma_is_the_gradient() -> None:
    _seed(7)
    model, x = relu_net(), images()
    # σ = 1e-9 pixel cannot cross a ReLU kink at these random inputs, so every noisy gradient is
    # the gradient up to float32 rounding of the mean of 8 equal values.
    smooth = saliency.smoothgrad(model, x, n_samples=8, sigma=1e-9, sigma_units="pixel", seed=0)
    assert_close(smooth, saliency.gradient(model, x), 1e-6, "SmoothGrad(σ→0) vs gradient")


class Quadratic(nn.Module):
    """Ψ^0 = Σ a ⊙ x², Ψ^1 = 0: ∇Ψ^0 = 2 a ⊙ x is linear in x, so SmoothGrad statistics over
    x + σ·n are closed-form functions of the noise."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = (self.a * x * x).flatten(1).sum(dim=1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


def test_smoothgrad_variants_and_range_units_in_closed_form() -> None:
    _seed(8)
    x = images(3)
    model = Quadratic(torch.randn(1, C, H, W, dtype=torch.float64))
    target = torch.zeros(3, dtype=torch.long)
    n, sigma, seed = 6, 0.2, 5
    # The documented noise: one draw of x's shape per sample, in order, from a generator seeded with seed.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.stack([torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(n)])
    std = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).reshape(3, 1, 1, 1)
    grads = 2 * model.a.detach() * (x + std * noise)  # (n, B, C, H, W)
    expected = {
        "mean": grads.mean(dim=0),
        "squared": (grads * grads).mean(dim=0),
        "vargrad": grads.var(dim=0, unbiased=False),
    }
    for variant, want in expected.items():
        got = saliency.smoothgrad(model, x, target, n_samples=n, sigma=sigma, variant=variant, seed=seed)
        # float32 gradients; VarGrad is a difference of two float32 means of squares (cancellation
        # of at most mean²/var ≈ 50 here), hence 1e-4 for it and 1e-6 for the others.
        assert_close(got, want, 1e-4 if variant == "vargrad" else 1e-6, f"SmoothGrad {variant}")


def guided_reference(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Guided backprop of x → relu(W1 x) → W2 by hand: W1ᵀ [(W1x > 0) ⊙ relu(W2[target])]."""
    flat = x.flatten(1)
    hidden_on = (flat @ w1.T) > 0
    back = hidden_on * w2[target].clamp(min=0)
    return (back @ w1).reshape(x.shape)


@pytest.mark.parametrize("inplace", [False, True])
def test_guided_backprop_matches_hand_formula(inplace: bool) -> None:
    _seed(9)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(C * H * W, 12, bias=False), nn.ReLU(inplace=inplace), nn.Linear(12, K, bias=False)
    ).double()
    x = images()
    target = model(x).argmax(dim=1)
    got = saliency.guided_backprop(model, x)
    want = guided_reference(model[1].weight.detach(), model[3].weight.detach(), x, target)
    assert_close(got, want, 1e-6, f"guided backprop (inplace={inplace})")
    plain = saliency.gradient(model, x)
    assert not torch.allclose(got, plain), "guided backprop equals the plain gradient: hooks had no effect"
    assert all(not m._forward_hooks for m in model.modules()), "hooks left on the model"


class RaisesAfterRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 6), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.body(x)
        raise RuntimeError("forward failed on purpose")


def test_guided_backprop_removes_hooks_on_error_and_rejects_models_without_relu_modules() -> None:
    model = RaisesAfterRelu().double()
    with pytest.raises(RuntimeError, match="on purpose"):
        saliency.guided_backprop(model, images())
    assert not model.body[2]._forward_hooks, "guided backprop left its hook after the forward raised"
    with pytest.raises(ValueError, match="nn.ReLU"):
        saliency.guided_backprop(nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K)).double(), images())


class CamNet(nn.Module):
    """features = relu(conv(x)) of shape (B, 3, h, w); logits = V · features (no bias):
    ∂Ψ^t/∂A = V[t], a constant, so the Grad-CAM++ weights follow by hand."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 3, 3, padding=1, stride=stride)
        self.features = nn.ReLU()
        hw = H // stride
        self.head = nn.Linear(3 * hw * hw, K, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.conv(x)).flatten(1))


def gradcam_pp_by_hand(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chattopadhyay et al. eq. 19 with exp scores, element by element: (h, w) map of one image."""
    channels, h, w = act.shape
    cam = torch.zeros(h, w, dtype=torch.float64)
    for k in range(channels):
        total = sum(float(act[k, i, j]) for i in range(h) for j in range(w))
        weight = 0.0
        for i in range(h):
            for j in range(w):
                g = float(grad[k, i, j])
                if g != 0.0:
                    alpha = g**2 / (2 * g**2 + total * g**3)
                    weight += alpha * max(g, 0.0)
        cam += weight * act[k]
    return cam.clamp(min=0)


def test_gradcam_pp_tiny_case_by_hand() -> None:
    # One channel, A = [[1, 2], [3, 4]], G = 0.5 everywhere: α = 0.25 / (0.5 + 10 · 0.125) = 1/7,
    # w = 4 · (1/7) · 0.5 = 2/7, map = (2/7)·A.
    act = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    cam = gradcam_pp_by_hand(act, torch.full_like(act, 0.5))
    assert torch.allclose(cam, 2 / 7 * act[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcam_pp_matches_hand_computation(stride: int) -> None:
    _seed(10)
    model = CamNet(stride).double()
    x = images(3)
    target = model(x).argmax(dim=1)
    got = saliency.gradcam_pp(model, x, layer=model.features)
    assert got.shape == (3, 1, H, W) and got.dtype == torch.float32
    hw = H // stride
    act = model.features(model.conv(x)).detach()
    cams = []
    for b in range(3):
        grad = model.head.weight[target[b]].detach().reshape(3, hw, hw)
        cams.append(gradcam_pp_by_hand(act[b], grad))
    want = torch.stack(cams)[:, None]
    if stride == 2:
        want = F.interpolate(want, size=(H, W), mode="bilinear", align_corners=False)
    # The map is computed in float32 from float32 activations: rel 1e-5.
    assert_close(got, want, 1e-5, f"Grad-CAM++ (stride {stride})")
    assert not model.features._forward_hooks, "Grad-CAM++ left its hook on the layer"


def test_gradcam_pp_rejects_a_layer_outside_the_model() -> None:
    model = CamNet(1).double()
    with pytest.raises(ValueError, match="layer"):
        saliency.gradcam_pp(model, images(), layer=nn.ReLU())


def test_minmax_scale_per_sample() -> None:
    _seed(11)
    maps = torch.randn(3, C, H, W, dtype=torch.float64)
    maps[2] = 0.7  # constant map
    scaled = saliency.minmax_scale(maps)
    assert scaled.dtype == torch.float32 and scaled.shape == maps.shape
    for b in range(2):
        lo, hi = maps[b].min(), maps[b].max()
        assert_close(scaled[b], (maps[b] - lo) / (hi - lo), 1e-6, f"sample {b}")
        assert scaled[b].min() == 0 and scaled[b].max() == 1
    assert torch.equal(scaled[2], torch.zeros(C, H, W)), "a constant map must scale to zeros"
    # Invariant to a positive affine change of each sample.
    assert_close(saliency.minmax_scale(3 * maps[:2] - 1), scaled[:2], 1e-6, "affine invariance")


def test_compute_dispatches_by_name() -> None:
    _seed(12)
    model, x = relu_net(), images()
    assert torch.equal(saliency.compute("gradient", model, x), saliency.gradient(model, x))
    assert torch.equal(
        saliency.compute("integrated_gradients", model, x, steps=5),
        saliency.integrated_gradients(model, x, steps=5),
    )
    assert torch.equal(
        saliency.compute("smoothgrad", model, x, n_samples=3, seed=1),
        saliency.smoothgrad(model, x, n_samples=3, seed=1),
    )
    cam = CamNet(1).double()
    assert torch.equal(
        saliency.compute("gradcam_pp", cam, x, layer=cam.features), saliency.gradcam_pp(cam, x, layer=cam.features)
    )
    with pytest.raises(ValueError, match="method"):
        saliency.compute("lime", model, x)


@pytest.mark.parametrize("method", sorted(saliency.METHODS))
def test_every_method_leaves_the_model_as_found(method: str) -> None:
    _seed(13)
    model = relu_net().train()
    model[0].weight.requires_grad_(False)
    kwargs = {"layer": model[1]} if method == "gradcam_pp" else {}
    if method in ("smoothgrad", "integrated_gradients"):
        kwargs["chunk_size"] = 2
        kwargs["n_samples" if method == "smoothgrad" else "steps"] = 3
    maps = saliency.compute(method, model, images(), **kwargs)
    assert torch.isfinite(maps).all()
    assert all(m.training for m in model.modules()), "train mode not restored"
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert all(p.grad is None for p in model.parameters()), "a parameter .grad was written"


def test_bad_arguments_raise_before_work() -> None:
    model, x = relu_net(), images()
    cases = [
        (lambda: saliency.gradient(model, x, torch.zeros(3, dtype=torch.long)), ValueError, "target"),
        (lambda: saliency.gradient(model, x, torch.full((4,), K)), ValueError, "target"),
        (lambda: saliency.gradient(model, x, "cat"), TypeError, "target"),
        (lambda: saliency.gradient(model, x.long()), ValueError, "x"),
        (lambda: saliency.smoothgrad(model, x, chunk_size=0), ValueError, "chunk_size"),
        (lambda: saliency.smoothgrad(model, x, sigma=-0.1), ValueError, "sigma"),
        (lambda: saliency.smoothgrad(model, x, variant="max"), ValueError, "variant"),
        (lambda: saliency.smoothgrad(model, x, sigma_units="percent"), ValueError, "sigma_units"),
        (lambda: saliency.smoothgrad(model, x, n_samples=0), ValueError, "n_samples"),
        (lambda: saliency.integrated_gradients(model, x, steps=1), ValueError, "steps"),
        (lambda: saliency.integrated_gradients(model, x, method="simpson"), ValueError, "method"),
        (lambda: saliency.integrated_gradients(model, x, baseline=torch.zeros(3, 3)), ValueError, "baseline"),
        (lambda: saliency.minmax_scale(torch.zeros(4)), ValueError, "maps"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


@pytest.mark.parametrize("kind", ["numpy", "0-d tensor"])
def test_numbers_may_be_numpy_scalars_or_0d_tensors(kind: str) -> None:
    """Where a number is meant (target class, counts, σ, seed, baseline), numpy scalars and 0-d
    CPU tensors give the same maps as Python numbers. The values are exact in float32."""
    _seed(14)
    model, x = relu_net(), images()

    def wrap(value):
        if kind == "numpy":
            return np.int64(value) if isinstance(value, int) else np.float32(value)
        return torch.tensor(value)

    assert torch.equal(saliency.gradient(model, x, wrap(2)), saliency.gradient(model, x, 2))
    smooth = {"n_samples": 3, "sigma": 0.125, "seed": 7, "chunk_size": 2}
    assert torch.equal(saliency.smoothgrad(model, x, **{k: wrap(v) for k, v in smooth.items()}),
                       saliency.smoothgrad(model, x, **smooth))
    integrated = {"steps": 5, "chunk_size": 2, "baseline": 0.25}
    assert torch.equal(saliency.integrated_gradients(model, x, **{k: wrap(v) for k, v in integrated.items()}),
                       saliency.integrated_gradients(model, x, **integrated))
    with pytest.raises(ValueError, match="n_samples"):
        saliency.smoothgrad(model, x, n_samples=wrap(0))
    with pytest.raises(ValueError, match="target"):
        saliency.gradient(model, x, wrap(-1))


# ---------------------------------------------------------------------- the SAT authors' variants


def test_gradient_sign_is_the_sign_of_the_input_gradient() -> None:
    _seed(20)
    model, x = relu_net().eval(), images()
    target = torch.tensor([1, 0, 4, 2])
    signs = saliency.gradient_sign(model, x, target)
    assert signs.dtype == torch.float32 and signs.shape == x.shape
    assert torch.equal(signs, reference_grad(model, x, target).sign().float())
    assert set(signs.unique().tolist()) <= {-1.0, 0.0, 1.0}
    predicted = model(x).argmax(dim=1)
    assert torch.equal(saliency.compute("gradient_sign", model, x), reference_grad(model, x, predicted).sign().float())


def test_guided_backprop_is_not_the_gradient_sign_with_relu_modules() -> None:
    """The authors' hook never fired, so their 'guided backprop' was gradient_sign; fastsat's
    guided backprop does fire on nn.ReLU modules and gives a different map."""
    _seed(21)
    model, x = relu_net().eval(), images()
    assert not torch.equal(saliency.guided_backprop(model, x).sign(), saliency.gradient_sign(model, x))


def test_integrated_gradients_of_the_true_label_loss_is_complete() -> None:
    """objective="loss" integrates ∇CE(Ψ(·), y): the attributions sum to CE(x, y) − CE(x', y)."""
    _seed(22)
    model, x = smooth_net().eval(), images()
    labels = torch.tensor([2, 0, 1, 4])
    base = torch.rand_like(x)
    ig = saliency.integrated_gradients(model, x, labels, baseline=base, steps=256, objective="loss")
    with torch.no_grad():
        gap = F.cross_entropy(model(x), labels, reduction="none") - F.cross_entropy(model(base), labels, reduction="none")
    rel = (ig.double().sum(dim=(1, 2, 3)) - gap).abs() / gap.abs()
    assert rel.max() < 0.01, f"completeness of the loss IG: relative gaps {rel.tolist()}"
    # Not the logit's IG: the loss integrates −Ψ^y + logsumexp Ψ.
    logit_ig = saliency.integrated_gradients(model, x, labels, baseline=base, steps=256)
    assert not torch.allclose(ig, logit_ig, atol=1e-3)
    with pytest.raises(ValueError, match="objective"):
        saliency.integrated_gradients(model, x, labels, objective="ce")


def test_gradcam_pp_without_relu_keeps_negative_evidence() -> None:
    _seed(23)
    model = CamNet(1).double()
    x = images(3)
    # At the convolution (before its ReLU) activations have both signs, so Σ_k w_k A_k can be negative.
    raw = saliency.gradcam_pp(model, x, layer=model.conv, relu=False)
    published = saliency.gradcam_pp(model, x, layer=model.conv)
    assert torch.equal(raw.clamp(min=0), published)
    assert (raw < 0).any(), "the test needs a map with negative values to tell the two apart"
    with pytest.raises(TypeError, match="relu"):
        saliency.gradcam_pp(model, x, layer=model.features, relu="no")


def test_loss_objective_without_labels_is_refused_before_any_forward():
    class NeverCalled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise AssertionError("the model ran before the arguments were checked")

    with pytest.raises(ValueError, match="target"):
        saliency.integrated_gradients(NeverCalled(), torch.rand(2, 1, 4, 4), objective="loss")
