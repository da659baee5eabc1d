"""Recipes (fastsat.train.recipes): each loss on a tiny model, against the formulas of METHODS.md §2–3."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from _models import tiny_cnn
from torch import nn

import fastsat.train as T
from fastsat.data import as_batch, shapes
from fastsat.ops import sat_perturb


def tiny_data(n: int = 32, size: int = 12, seed: int = 0):
    return shapes(n, size=size, num_classes=3, seed=seed, cache_dir=False)


def tiny_batch(n: int = 8) -> dict:
    data = tiny_data(n)
    return {"image": data.images.float() / 255, "label": data.labels, "box": data.boxes, "mask": data.masks}


@pytest.mark.parametrize("name", sorted(T.RECIPES))
def test_recipe_loss_is_finite_and_reaches_every_parameter(name):
    model = tiny_cnn()
    batch = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    if name == "free":
        # Free AT owns the optimizer step (m replays); check it moved every parameter instead.
        out = T.make_recipe(name, replays=2).train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1))
        assert torch.isfinite(out.loss)
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        assert all(moved), f"free: parameters not updated: {[i for i, m in enumerate(moved) if not m]}"
        return
    loss = T.recipe_loss(model, batch, recipe=name, epoch=5)
    assert loss.dim() == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no finite non-zero gradient for {missing}"


@pytest.mark.parametrize("maps,key", [("boxes", "box"), ("masks", "mask")])
def test_sat_input_is_sat_perturb_with_the_same_seed(maps, key):
    batch = tiny_batch()
    recipe = T.SAT(maps=maps, eps=8 / 255)
    torch.manual_seed(123)
    got = recipe.perturb(batch, epoch=7)
    torch.manual_seed(123)
    want = sat_perturb(batch["image"], eps=8 / 255, p=1 - 0.6 ** 0.7, **{maps: batch[key]})
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max()}"


def test_sat_curriculum():
    # p_e = 1 − 0.6^(e/10): exact hand values at e = 0, 10, 20 (float64 arithmetic, rounding only).
    assert T.sat_probability(0) == 0.0
    assert T.sat_probability(10) == pytest.approx(0.4, abs=1e-15)
    assert T.sat_probability(20) == pytest.approx(0.64, abs=1e-15)
    assert T.sat_probability(5, a=0.25) == pytest.approx(0.5, abs=1e-15)
    # At the first epoch the input is pure random-sign noise: boxes and masks give the same input.
    batch = tiny_batch()
    torch.manual_seed(1)
    with_boxes = T.SAT(maps="boxes").perturb(batch, epoch=0)
    torch.manual_seed(1)
    with_masks = T.SAT(maps="masks").perturb(batch, epoch=0)
    assert torch.equal(with_boxes, with_masks)
    # Late in training p_e rounds to 1: the input is x − ε·S exactly (S = +1 in the box, −1 outside).
    x, box = batch["image"], batch["box"]
    rows, cols = torch.arange(12).view(1, 12, 1), torch.arange(12).view(1, 1, 12)
    inside = (cols >= box[:, 0, None, None]) & (cols < box[:, 2, None, None]) & (rows >= box[:, 1, None, None]) & (rows < box[:, 3, None, None])
    s = torch.where(inside, 1.0, -1.0).unsqueeze(1)
    want = (x - 8 / 255 * s).clamp(0, 1)
    got = T.SAT(maps="boxes").perturb(batch, epoch=100_000)
    assert torch.allclose(got, want, rtol=0, atol=1e-7), f"max |diff| {(got - want).abs().max()}"  # one float32 rounding


def test_trades_loss_hand_case():
    # p = softmax(1, 0), q = softmax(0, 1): KL(p‖q) = p0·1 + p1·(−1) = (e − 1)/(e + 1); CE = log(1 + 1/e).
    e = math.e
    want = math.log(1 + 1 / e) + 6 * (e - 1) / (e + 1)
    got = T.trades_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]), beta=6.0)
    assert got.item() == pytest.approx(want, rel=1e-6)  # float32 softmax/log: ~1e-7 relative


def test_trades_recipe_uses_the_kl_attack():
    model = tiny_cnn().eval()  # eval: batch norm does not couple the two forwards
    batch = tiny_batch()
    recipe = T.Trades(steps=2)
    torch.manual_seed(5)
    got = recipe.loss(model, batch).loss
    torch.manual_seed(5)
    from fastsat.attacks import TradesAttack

    x_adv = TradesAttack(model, eps=0.031, step_size=0.007, steps=2)(batch["image"], batch["label"]).x_adv
    want = T.trades_loss(model(batch["image"]), model(x_adv), batch["label"], 6.0)
    assert torch.equal(got, want), f"{got.item()} vs {want.item()}"


def _smooth_model() -> nn.Module:
    # Softplus keeps the double-backprop penalty smooth, so finite differences are meaningful.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double()


def test_gradnorm_equals_explicit_double_backprop():
    model = _smooth_model()
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    lam = 0.7
    got = T.recipe_loss(model, (x, y), recipe="gradnorm", lam=lam)
    # Explicit: one sample at a time, its own ∇ₓCE.
    terms = []
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        ce = F.cross_entropy(model(xi), y[i : i + 1])
        (g,) = torch.autograd.grad(ce, xi, create_graph=True)
        terms.append(ce + lam * g.pow(2).sum())
    want = torch.stack(terms).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)  # float64, same ops up to summation order
    # Its parameter gradient (through the double backprop) matches central finite differences.
    weight = model[3].weight
    (grad,) = torch.autograd.grad(got, weight)
    direction = torch.randn_like(weight)
    h = 1e-5
    original = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(original + h * direction)
    plus = T.recipe_loss(model, (x, y), recipe="gradnorm", lam=lam).item()
    with torch.no_grad():
        weight.copy_(original - h * direction)
    minus = T.recipe_loss(model, (x, y), recipe="gradnorm", lam=lam).item()
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum().item()
    # Central differences in float64: truncation O(h²) ≈ 1e-10 relative, rounding ≈ 1e-16/h.
    assert analytic == pytest.approx(numeric, rel=1e-6), f"analytic {analytic} vs numeric {numeric}"


def test_free_replays_advance_delta_inside_the_ball():
    model = tiny_cnn()
    batch = tiny_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    recipe = T.Free(replays=3, eps=4 / 255)
    recipe.train_step(model, batch, opt)
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3}, f"optimizer steps per parameter {steps}, expected 3 replays"
    delta = recipe.state_dict()["delta"]
    x = batch["image"]
    assert delta.abs().max() <= 4 / 255 + 1e-7 and delta.abs().max() > 0
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()


def test_free_resumed_delta_follows_the_batch():
    # Checkpoints load on the CPU in float32; a restored δ must follow the batch to its device and
    # dtype (here float64: adding a float32 δ would be fine, but a float64 δ to a float32 batch
    # would turn the model's input float64 and fail).
    model = tiny_cnn()
    batch = tiny_batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    recipe = T.Free(replays=1, eps=4 / 255)
    restored = (torch.rand_like(batch["image"], dtype=torch.float64) * 2 - 1) * 4 / 255
    recipe.load_state_dict({"delta": restored})
    recipe.train_step(model, batch, opt)
    delta = recipe.state_dict()["delta"]
    assert delta.dtype == batch["image"].dtype and delta.device == batch["image"].device


def test_sat_plus_pgd_takes_both_branches():
    model = tiny_cnn()
    batch = tiny_batch()
    recipe = T.SATPlusPGD(steps=1)
    seen = set()
    for seed in range(8):
        # The coin is Python's (drawn on the host: no device value read back).
        random.seed(seed)
        coin = random.random() < 0.5
        random.seed(seed)
        loss = recipe.loss(model, batch, epoch=3).loss
        assert torch.isfinite(loss)
        seen.add(coin)
    assert seen == {True, False}


def test_bad_arguments():
    with pytest.raises(ValueError, match="recipe"):
        T.make_recipe("madry")
    with pytest.raises(ValueError, match="unknown options"):
        T.make_recipe("sat", lam=1.0)
    with pytest.raises(ValueError, match="maps"):
        T.SAT(maps="teacher")
    with pytest.raises(ValueError, match="eps"):
        T.PGDTraining(eps=-1.0)
    with pytest.raises(ValueError, match="'box'"):
        T.recipe_loss(tiny_cnn(), (torch.rand(2, 3, 12, 12), torch.tensor([0, 1])), recipe="sat")
    with pytest.raises(TypeError, match="label"):
        as_batch({"image": torch.rand(2, 3, 8, 8), "label": torch.rand(2)})
    with pytest.raises(ValueError, match="epoch"):
        T.sat_probability(-1)


class _Inputs(nn.Module):
    """Wraps a model and records the inputs it is trained on (its train-mode forwards; the recipes'
    attacks run it in eval mode, and their outputs are audited by the attacks themselves)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.model(x)


def test_free_delta_carries_over_a_smaller_last_batch():
    # An epoch of 8 + 5 samples, then the next epoch's first batch of 8: δ must not reset. It is kept
    # at the largest batch; the batch of 5 starts from (and advances) its first 5 rows only.
    torch.manual_seed(0)
    model = _Inputs(tiny_cnn())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: only δ moves
    recipe = T.Free(replays=1, eps=4 / 255)
    full, last = tiny_batch(8), tiny_batch(13)
    last = {k: v[8:] for k, v in last.items()}
    recipe.train_step(model, full, opt)
    after_full = recipe.state_dict()["delta"].clone()
    assert after_full.abs().max() > 0
    model.seen.clear()
    recipe.train_step(model, last, opt)
    assert torch.equal(model.seen[0], (last["image"] + after_full[:5]).clamp(0, 1)), "the small batch did not start from δ"
    kept = recipe.state_dict()["delta"]
    assert kept.shape == after_full.shape, f"δ shrank to {tuple(kept.shape)}"
    assert torch.equal(kept[5:], after_full[5:]) and not torch.equal(kept[:5], after_full[:5])
    model.seen.clear()
    recipe.train_step(model, full, opt)
    assert torch.equal(model.seen[0], (full["image"] + kept).clamp(0, 1)), "δ was reset at the next epoch"


@pytest.mark.parametrize("name", [name for name, cls in sorted(T.RECIPES.items()) if issubclass(cls, T.PerturbationRecipe)])
def test_perturbing_recipes_keep_every_input_in_the_run_box(name):
    # Images in the box (3/8, 5/8) (exact in binary), ε = 32/255 > its half-width: every input the model
    # is trained on must stay in the box. Free-AT clipped to (0, 1) whatever the run's box was.
    lo, hi, eps = 0.375, 0.625, 32 / 255
    batch = tiny_batch()
    batch["image"] = lo + (hi - lo) * torch.rand(batch["image"].shape, generator=torch.Generator().manual_seed(0))
    model = _Inputs(tiny_cnn())
    recipe = T.make_recipe(name, eps=eps, clip=(lo, hi), **({"replays": 2} if name == "free" else {}))
    for seed in range(2):  # both branches of the sat+* coin
        torch.manual_seed(seed)
        if name == "free":
            recipe.train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1))
        else:
            recipe.loss(model, batch, epoch=30).loss.backward()
    inputs = torch.stack(model.seen)
    assert inputs.min() >= lo and inputs.max() <= hi, f"{name}: inputs in [{inputs.min():.4f}, {inputs.max():.4f}]"
    assert (inputs == lo).any() or (inputs == hi).any(), f"{name}: no input reached the box's edge; the test cannot tell"


def test_fit_gives_the_run_box_to_the_recipe():
    lo, hi = 0.375, 0.625
    data = tiny_data(16)
    x, y = lo + (hi - lo) * data.images.float() / 255, data.labels
    model = _Inputs(tiny_cnn())
    T.fit(model, [(x[:8], y[:8]), (x[8:], y[8:])], recipe="free", recipe_options={"replays": 2}, epochs=1,
          clip=(lo, hi), progress=False)
    inputs = torch.stack(model.seen)
    assert inputs.min() >= lo and inputs.max() <= hi
    with pytest.raises(ValueError, match="clip"):
        T.fit(model, [(x, y)], recipe=T.Free(clip=(0.0, 1.0)), clip=(lo, hi), epochs=1, progress=False)
