"""fastsat.grad: input gradients against hand-computed answers on linear models, the model guard,
autocast, and the batched logit Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import linear_model
from torch import nn

from fastsat.grad import OBJECTIVES, frozen, input_grad, logit_jacobian

pytestmark = pytest.mark.usefixtures("one_thread")


# Float64 linear model: the library and the hand formulas do the same arithmetic up to summation
# order, so they agree to a few ulps of the values involved (|W|, |x| ~ 1, d = 32).
ATOL64 = 1e-12
PIXELS = 2 * 4 * 4  # the 2×4×4 inputs of the linear models, flattened


def _cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 7)
    )


def _rows(weight: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weight[idx].reshape(like.shape)


def _hand_gradient(objective, weight, z, x, y, target, other, clean):
    """∂ objective / ∂x for logits z = W x + b, written out per objective."""
    probs = F.softmax(z, dim=1)
    if objective == "logit":
        return _rows(weight, target, x)
    if objective == "logit_diff":
        return _rows(weight, target, x) - _rows(weight, other, x)
    if objective == "ce":
        return ((probs - F.one_hot(y, z.shape[1])) @ weight).reshape(x.shape)
    best_other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -torch.inf).argmax(dim=1)
    if objective == "cw":
        return _rows(weight, best_other, x) - _rows(weight, y, x)
    if objective == "dlr":
        # value = −m/d, m = z_y − z_j*, d = z_π1 − z_π3: quotient rule.
        order = z.argsort(dim=1, descending=True)
        m = (z.gather(1, y[:, None]) - z.gather(1, best_other[:, None])).squeeze(1)
        d = (z.gather(1, order[:, :1]) - z.gather(1, order[:, 2:3])).squeeze(1) + 1e-12  # the library's guard
        grad_m = (weight[y] - weight[best_other]).reshape(x.shape)
        grad_d = (weight[order[:, 0]] - weight[order[:, 2]]).reshape(x.shape)
        s = (-1,) + (1,) * (x.dim() - 1)
        return -(grad_m * d.reshape(s) - m.reshape(s) * grad_d) / d.square().reshape(s)
    if objective == "dlr_targeted":
        # value = −m/d, m = z_y − z_t, d = z_π1 − (z_π3 + z_π4)/2: quotient rule.
        order = z.argsort(dim=1, descending=True)
        m = (z.gather(1, y[:, None]) - z.gather(1, target[:, None])).squeeze(1)
        top = z.gather(1, order[:, :4])
        d = top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12
        grad_m = (weight[y] - weight[target]).reshape(x.shape)
        grad_d = (weight[order[:, 0]] - (weight[order[:, 2]] + weight[order[:, 3]]) / 2).reshape(x.shape)
        s = (-1,) + (1,) * (x.dim() - 1)
        return -(grad_m * d.reshape(s) - m.reshape(s) * grad_d) / d.square().reshape(s)
    # kl: ∂/∂z KL(p ‖ softmax z) = softmax(z) − p.
    return ((probs - F.softmax(clean, dim=1)) @ weight).reshape(x.shape)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_match_hand_gradients_on_a_linear_model(objective):
    model = linear_model(5, PIXELS)
    x = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    y = torch.randint(0, 5, (6,))
    target = torch.randint(0, 5, (6,))
    other = (target + 1 + torch.randint(0, 4, (6,))) % 5
    clean = torch.randn(6, 5, dtype=torch.float64)
    result = input_grad(model, x, objective=objective, target=target, other=other, y=y, clean_logits=clean)
    expected = _hand_gradient(objective, weight, z, x, y, target, other, clean)
    assert result.grad.dtype == torch.float64, "float64 inputs keep float64 gradients"
    torch.testing.assert_close(result.grad, expected, atol=ATOL64, rtol=0)
    assert result.grad.shape == x.shape and result.value.shape == (6,)
    torch.testing.assert_close(result.logits, z, atol=ATOL64, rtol=0)


def test_objective_values_match_hand_values():
    model = linear_model(5, PIXELS)
    x = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    with torch.no_grad():
        z = model(x)
    value = input_grad(model, x, objective="ce", y=y).value
    torch.testing.assert_close(value, F.cross_entropy(z, y, reduction="none"), atol=ATOL64, rtol=0)
    margin = input_grad(model, x, objective="cw", y=y).value
    z_other = z.masked_fill(F.one_hot(y, 5).bool(), -torch.inf).amax(dim=1)
    torch.testing.assert_close(margin, z_other - z.gather(1, y[:, None]).squeeze(1), atol=ATOL64, rtol=0)
    kl = input_grad(model, x, objective="kl", clean_logits=z).value
    torch.testing.assert_close(kl, torch.zeros(6, dtype=torch.float64), atol=ATOL64, rtol=0)


def test_defaults_use_predicted_class_and_runner_up():
    model = linear_model(5, PIXELS)
    x = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    top2 = z.topk(2, dim=1).indices
    grad = input_grad(model, x).grad
    torch.testing.assert_close(grad, _rows(weight, top2[:, 0], x), atol=0, rtol=0)
    diff = input_grad(model, x, objective="logit_diff").grad
    expected = _rows(weight, top2[:, 0], x) - _rows(weight, top2[:, 1], x)
    torch.testing.assert_close(diff, expected, atol=ATOL64, rtol=0)


class _ModeProbe(nn.Module):
    """Records the training flag seen during forward."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def _guarded_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), _ModeProbe(), nn.Dropout(0.5), nn.Linear(8, 4))
    model.train()
    model[3].eval()  # a mixed-mode model must come back mixed
    model[1].bias.requires_grad_(False)
    return model


def _flags(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("mode", [None, "eval", "train"])
def test_no_parameter_grad_and_flags_restored(mode):
    model = _guarded_model()
    before = _flags(model)
    x = torch.rand(3, 12)
    input_grad(model, x, objective="ce", y=torch.tensor([0, 1, 3]), mode=mode)
    logit_jacobian(model, x, mode=mode)
    assert _flags(model) == before
    assert all(p.grad is None for p in model.parameters()), "a parameter .grad was written"
    expected_seen = {None: True, "eval": False, "train": True}[mode]
    assert model[2].seen == [expected_seen] * 2


def test_flags_restored_when_the_call_raises():
    model = _guarded_model()
    before = _flags(model)
    with pytest.raises(ValueError, match="y"):
        input_grad(model, torch.rand(3, 12), objective="ce", y=torch.tensor([0, 1, 4]), mode="eval")
    assert _flags(model) == before
    with pytest.raises(RuntimeError, match="boom"), frozen(model, "eval"):
        raise RuntimeError("boom")
    assert _flags(model) == before


def test_create_graph_allows_double_backprop_to_the_weights():
    # Linear: ∇ₓ Ψ^t = W_t, so ∂‖∇ₓ Ψ^t‖²/∂W_t = 2 W_t and zero for the other rows.
    model = linear_model(5, PIXELS, bias=False)
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    target = torch.tensor([2])
    grad = input_grad(model, x, target=target, create_graph=True).grad
    (dw,) = torch.autograd.grad(grad.square().sum(), model[1].weight)
    weight = model[1].weight.detach()
    expected = torch.zeros_like(weight)
    expected[2] = 2 * weight[2]
    torch.testing.assert_close(dw, expected, atol=ATOL64, rtol=0)
    assert model[1].weight.grad is None


def test_autocast_bf16_returns_float32_close_to_float32_gradient():
    model = _cnn()
    x = torch.rand(4, 3, 8, 8)
    y = torch.randint(0, 7, (4,))
    assert input_grad(model, x, objective="ce", y=y).grad.dtype == torch.float32
    exact = input_grad(model, x, objective="ce", y=y).grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = input_grad(model, x, objective="ce", y=y)
    assert low.grad.dtype == torch.float32
    assert low.logits.dtype == torch.bfloat16, "autocast did not reach the model"
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per op); a handful of layers
    # forward and backward stay within a few percent of the float32 gradient in norm.
    rel = (low.grad - exact).norm() / exact.norm()
    assert rel < 0.05, f"bf16 gradient differs from float32 by {rel:.3g} (relative L2)"


def test_logit_jacobian_matches_per_class_loop_and_chunking_is_identical():
    model = _cnn()
    x = torch.rand(3, 3, 8, 8)
    jac = logit_jacobian(model, x)
    assert jac.shape == (3, 7, 3, 8, 8) and jac.dtype == torch.float32
    for k in range(7):
        loop = input_grad(model, x, target=torch.full((3,), k)).grad
        torch.testing.assert_close(jac[:, k], loop, atol=1e-6, rtol=1e-5, msg=f"class {k}")
    for chunk in (1, 3, 7):
        torch.testing.assert_close(logit_jacobian(model, x, chunk_size=chunk), jac, atol=0, rtol=0)
    picked = logit_jacobian(model, x, classes=[5, 1])
    torch.testing.assert_close(picked, jac[:, [5, 1]], atol=0, rtol=0)
    per_sample = torch.tensor([[0, 6], [2, 2], [4, 1]])
    rows = logit_jacobian(model, x, classes=per_sample, chunk_size=1)
    torch.testing.assert_close(rows, jac[torch.arange(3)[:, None], per_sample], atol=0, rtol=0)


def test_logit_jacobian_of_linear_model_is_the_weight():
    model = linear_model(5, PIXELS)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    jac = logit_jacobian(model, x)
    expected = model[1].weight.detach().reshape(1, 5, 2, 4, 4).expand(2, -1, -1, -1, -1)
    torch.testing.assert_close(jac, expected, atol=0, rtol=0)


def test_bad_arguments_raise_clear_errors():
    model = linear_model(5, PIXELS)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="objective"):
        input_grad(model, x, objective="hinge")
    with pytest.raises(ValueError, match="y"):
        input_grad(model, x, objective="ce")
    with pytest.raises(ValueError, match=r"target.*\[0, 5\)"):
        input_grad(model, x, target=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="target"):
        input_grad(model, x, target=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="clean_logits"):
        input_grad(model, x, objective="kl", clean_logits=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mode"):
        input_grad(model, x, mode="inference")
    with pytest.raises(ValueError, match="x"):
        input_grad(model, torch.ones(2, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="device"):
        input_grad(model.to("meta"), x)
    with pytest.raises(ValueError, match="chunk_size"):
        logit_jacobian(linear_model(5, PIXELS), x, chunk_size=0)
    with pytest.raises(ValueError, match="classes"):
        logit_jacobian(linear_model(5, PIXELS), x, classes=[0, 9])
    with pytest.raises(ValueError, match="dlr"):
        input_grad(nn.Sequential(nn.Flatten(), nn.Linear(32, 2)).double(), x, objective="dlr", y=torch.tensor([0, 1]))


@pytest.mark.parametrize("wrap", [np.int64, torch.tensor], ids=["numpy", "0-d tensor"])
def test_counts_may_be_numpy_scalars_or_0d_tensors(wrap):
    """Where a number is meant, any real is accepted (fastsat._checks): the same Jacobian."""
    model, x = _cnn(), torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(logit_jacobian(model, x, chunk_size=wrap(2)), logit_jacobian(model, x, chunk_size=2),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        logit_jacobian(model, x, chunk_size=wrap(0))
