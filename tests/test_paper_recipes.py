"""Recipe options the papers' runs need: the linear ε warm-up of every perturbation recipe and
GradNorm's default λ (Etmann et al.'s MNIST setting, per sample)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsat.train import RECIPES, TrainConfig, make_recipe
from fastsat.train.recipes import GradNorm, PerturbationRecipe


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 4, 4, generator=g) * 0.5 + 0.25  # away from the box edges: no clipping
    box = torch.tensor([[0, 0, 2, 2]] * 8)
    return {"image": x, "label": torch.randint(0, 3, (8,), generator=g), "box": box}


def test_eps_at_ramps_linearly_then_holds():
    recipe = make_recipe("pgd", eps=0.03, eps_warmup=2)
    assert [recipe.eps_at(e) for e in range(5)] == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03])
    assert make_recipe("pgd", eps=0.03).eps_at(0) == 0.03  # default: no warm-up
    with pytest.raises(ValueError, match="eps_warmup"):
        make_recipe("pgd", eps_warmup=-1)
    every = [name for name, cls in RECIPES.items() if issubclass(cls, PerturbationRecipe)]
    assert all(make_recipe(name, eps_warmup=3).eps_warmup == 3 for name in every)


@pytest.mark.parametrize("name", ["pgd", "fast", "sat"])
def test_the_training_input_stays_within_the_warmed_up_radius(name):
    """At epoch 0 of a 3-epoch warm-up the perturbation is at most ε/4 (and reaches it for SAT,
    whose every element moves by exactly ε)."""
    torch.manual_seed(2)
    eps = 0.08
    recipe = make_recipe(name, eps=eps, eps_warmup=3, **({"maps": "boxes"} if name == "sat" else {}))
    batch = _batch()
    if name == "sat":
        x_train = recipe.perturb(batch, epoch=0)
    else:  # the attack's output is what the loss is computed on: capture the model's input
        seen = []
        model = _model()
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        recipe.loss(model, batch, epoch=0)
        x_train = seen[-1]
    moved = (x_train - batch["image"]).abs().amax()
    assert moved <= eps / 4 + 1e-6
    if name == "sat":
        assert moved == pytest.approx(eps / 4)


def test_eps_warmup_is_a_run_setting():
    config = TrainConfig.from_settings({"recipe": "pgd", "eps_warmup": "2"})
    assert config.build_recipe().eps_warmup == 2
    assert TrainConfig.from_settings({"recipe": "pgd", "eps_warmup": 2}).settings()["eps_warmup"] == 2


def test_gradnorm_default_is_etmanns_mnist_setting():
    """Their penalty is λ‖∇ₓ mean_i CE_i‖² = (λ/B²)·Σ_i ‖∇ₓCE_i‖² with λ = 10, B = 100: per sample
    10/100² = 1e-3 (summed over the batch, then averaged: ×B/B), fastsat's default."""
    assert GradNorm().lam == pytest.approx(10 / 100**2)
    # The penalty term is lam · mean_i ‖∇ₓCE_i‖² (checked against autograd per sample).
    model, batch = _model(), _batch()
    lam = 0.5
    out = GradNorm(lam=lam).loss(model, batch)
    x = batch["image"].clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(model(x), batch["label"], reduction="none")
    grads = [torch.autograd.grad(ce[i], x, retain_graph=True)[0][i] for i in range(len(ce))]
    expected = ce.mean() + lam * torch.stack([g.pow(2).sum() for g in grads]).mean()
    torch.testing.assert_close(out.loss, expected)


def test_sat_plus_pgd_clips_the_start_once(monkeypatch):
    """clip(x₀ − ε·s) with x₀ = x + U(−ε, ε) unclipped (METHODS.md §2). At the top of the box
    (x = 1), a pixel with s = +1 lands at 1 + δ − ε, anywhere in [1 − 2ε, 1]; clipping x₀ first
    would put it at min(1, 1 + δ) − ε ≤ 1 − ε, and every s = −1 pixel at 1. So values strictly
    between 1 − ε and 1 appear only when the start is clipped once."""
    from fastsat.train import recipes

    monkeypatch.setattr(recipes, "_coin", lambda: True)  # the SAT side of SAT+PGD's coin
    eps = 0.1
    recipe = make_recipe("sat+pgd", eps=eps, maps="boxes")
    x = torch.ones(16, 3, 8, 8)
    batch = {"image": x, "label": torch.zeros(16, dtype=torch.int64), "box": torch.tensor([[0, 0, 8, 8]] * 16)}
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    recipe.loss(model, batch, epoch=0)
    x_train = seen[-1]
    assert x_train.amin() >= 1 - 2 * eps - 1e-6 and x_train.amax() <= 1
    between = ((x_train > 1 - eps + 1e-4) & (x_train < 1 - 1e-4)).double().mean().item()
    assert between > 0.15, f"only {between:.3f} of the pixels lie strictly between 1 − ε and 1: the start was clipped"
