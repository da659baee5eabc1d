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
    extra = {"free": {"replays": 2}, "gradalign": {"lam": 1.0}}.get(name, {})  # gradalign: ε beyond λ's rule
    recipe = T.make_recipe(name, eps=eps, clip=(lo, hi), **extra)
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


# --- N-FGSM, GradAlign, MART, AWP (METHODS.md §3) -------------------------------------------------

class _Forwards(nn.Module):
    """Records the input of every forward, in every mode."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def _linear_ce_grad(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇ₓCE of a linear classifier by hand: Wᵀ(softmax(Wx + b) − e_y), per sample."""
    flat = x.flatten(1)
    p = torch.softmax(flat @ linear.weight.T + linear.bias, 1)
    return ((p - F.one_hot(y, p.shape[1]).to(p)) @ linear.weight).view_as(x)


def test_nfgsm_is_one_unprojected_sign_step_from_the_noisy_point_on_a_linear_model():
    from _models import linear_model

    torch.manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(6, 1, 4, 4, dtype=torch.float64)  # 0.3..0.7: the box never clips at 3ε = 0.15
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _Forwards(linear_model(3, 16))
    eps, k = 0.05, 2.0
    T.NFGSM(eps=eps).loss(model, (x, y))
    noisy, trained = model.seen[0], model.seen[-1]  # the gradient's point, the training input
    assert (noisy - x).abs().max() <= k * eps + 1e-15
    assert (noisy - x).abs().max() > eps, "the noise never left the ε-ball: it is not U(−2ε, 2ε)"
    want = (noisy + eps * torch.sign(_linear_ce_grad(model.model[1], noisy, y))).clamp(0, 1)
    assert torch.equal(trained, want), f"max |diff| {(trained - want).abs().max()}"  # the same float64 sum and clip
    delta = (trained - x).abs().max()
    assert delta <= (k + 1) * eps + 1e-15 and delta > 2 * eps, f"‖δ‖∞ = {delta}: projected back, or no step"


def test_gradalign_lambda_follows_the_authors_rule():
    # Their scripts: 0.027 at 1/255, 0.2 at 8/255, 2.0 at 16/255 (log-linear in ε).
    assert T.gradalign_lambda(8 / 255) == pytest.approx(0.2, rel=1e-12)
    assert T.gradalign_lambda(16 / 255) == pytest.approx(2.0, rel=1e-12)
    assert T.gradalign_lambda(1 / 255) == pytest.approx(0.027, abs=5e-4)
    # Beyond their range the rule explodes (2e7 at 0.3): refused, naming lam, when the recipe is built.
    with pytest.raises(ValueError, match="lam"):
        T.GradAlign(eps=0.3)
    assert T.GradAlign(eps=0.3, lam=1.0).lam == 1.0


def test_gradalign_regulariser_vanishes_on_a_binary_linear_model():
    # K = 2: ∇ₓCE = (p₁ − [y = 1])·(w₁ − w₀), a multiple of one direction with the sign fixed by y, so
    # every cosine is 1. With K = 3 the gradient's direction depends on x: the test can tell.
    from _models import linear_model

    torch.manual_seed(0)
    x, noisy = torch.rand(8, 1, 3, 3, dtype=torch.float64), torch.rand(8, 1, 3, 3, dtype=torch.float64)
    binary = linear_model(2, 9)
    penalty = T.gradient_misalignment(binary, x, noisy, torch.randint(0, 2, (8,)))
    assert abs(penalty.item()) < 1e-14
    (grad,) = torch.autograd.grad(penalty, binary[1].weight)
    assert grad.abs().max() < 1e-12
    assert T.gradient_misalignment(linear_model(3, 9), x, noisy, torch.randint(0, 3, (8,))).item() > 1e-4  # ten orders above


def test_gradalign_regulariser_against_per_sample_cosines_and_gradcheck():
    model = _smooth_model()
    torch.manual_seed(2)
    x, noisy, y = torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    got = T.gradient_misalignment(model, x, noisy, y)
    cosines = []
    for i in range(5):
        pair = []
        for point in (x[i : i + 1], noisy[i : i + 1]):
            point = point.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(point), y[i : i + 1]), point)
            pair.append(g.flatten())
        cosines.append(F.cosine_similarity(*pair, dim=0))
    want = (1 - torch.stack(cosines)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10)  # float64; cosine_similarity divides differently
    # The double backprop through both gradients is the regulariser's true derivative in the weights
    # (the inputs are data: it detaches them).
    conv, head = model[0], model[3]

    def regulariser(weight, bias):
        def net(z):
            return F.linear(F.softplus(F.conv2d(z, weight, conv.bias, padding=1)).flatten(1), head.weight, bias)
        return T.gradient_misalignment(net, x[:2], noisy[:2], y[:2])

    args = (conv.weight.detach().clone().requires_grad_(True), head.bias.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(regulariser, args)


def test_gradalign_loss_is_ce_at_the_fgsm_point_plus_lambda_times_the_regulariser():
    from fastsat.attacks import FGSM
    from fastsat.ops import random_start

    model = tiny_cnn().eval()  # eval: batch norm does not couple the forwards
    batch = tiny_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(3)
    got = T.GradAlign(eps=4 / 255).loss(model, batch).loss
    torch.manual_seed(3)
    x_fgsm = FGSM(model, eps=4 / 255, step_size=4 / 255)(x, y).x_adv
    noisy = random_start(x, eps=4 / 255)
    want = F.cross_entropy(model(x_fgsm), y) + T.gradalign_lambda(4 / 255) * T.gradient_misalignment(model, x, noisy, y)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), f"{got.item()} vs {want.item()}"


def _mart_reference(logits_nat, logits_adv, labels, beta):
    """MART's loss sample by sample in float64 from the paper's formula."""
    terms = []
    for z_nat, z_adv, y in zip(logits_nat.tolist(), logits_adv.tolist(), labels.tolist()):
        p_nat = [math.exp(v) / sum(math.exp(u) for u in z_nat) for v in z_nat]
        p_adv = [math.exp(v) / sum(math.exp(u) for u in z_adv) for v in z_adv]
        bce = -math.log(p_adv[y]) - math.log(1 - max(p for k, p in enumerate(p_adv) if k != y))
        kl = sum(p * math.log(p / q) for p, q in zip(p_nat, p_adv))
        terms.append(bce + beta * kl * (1 - p_nat[y]))
    return sum(terms) / len(terms)


def test_mart_loss_against_the_formula_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits_nat, logits_adv = 3 * torch.randn(9, 5, generator=gen, dtype=torch.float64), 3 * torch.randn(9, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (9,), generator=gen)
    labels[0] = logits_adv[0].argmax()  # the true class ranks first at x' for one sample, last for another
    labels[1] = logits_adv[1].argmin()
    got = T.mart_loss(logits_nat, logits_adv, labels, beta=6.0)
    assert got.item() == pytest.approx(_mart_reference(logits_nat, logits_adv, labels, 6.0), rel=1e-12)
    # Hand case: p(x) = p(x') = (1/2, 1/4, 1/4), y = 0: BCE = log 2 − log(3/4), KL = 0.
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    assert T.mart_loss(z, z, torch.tensor([0]), 6.0).item() == pytest.approx(math.log(2) - math.log(0.75), rel=1e-14)


def test_mart_recipe_uses_pgd_on_ce():
    from fastsat.attacks import PGD

    model = tiny_cnn().eval()
    batch = tiny_batch()
    x, y = batch["image"], batch["label"]
    torch.manual_seed(4)
    got = T.MART(steps=2).loss(model, batch)
    torch.manual_seed(4)
    x_adv = PGD(model, eps=8 / 255, step_size=2 / 255, steps=2)(x, y).x_adv
    logits_adv = model(x_adv)
    assert torch.equal(got.loss, T.mart_loss(model(x), logits_adv, y, 6.0))
    assert torch.equal(got.logits, logits_adv.detach())


class _Recording(torch.optim.SGD):
    """SGD that records the parameters and their gradients at the moment it steps."""

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.seen = ([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params])
        return super().step(closure)


@pytest.mark.parametrize("name", ["pgd", "trades"])
def test_awp_takes_the_gradient_at_w_plus_v_and_steps_from_the_restored_w(name):
    import copy

    gamma = 0.05  # large, so that the gradient at w + v is far from the one at w
    model = tiny_cnn()  # train mode, batch norm: the ascent's forward must not move its statistics
    batch = tiny_batch()
    x, y = batch["image"], batch["label"]
    recipe = T.make_recipe(name, steps=2, awp_gamma=gamma)
    original = copy.deepcopy(model)
    opt = _Recording(model.parameters(), lr=0.1)
    torch.manual_seed(6)
    recipe.train_step(model, batch, opt)

    # Independent reference: the same attack, then v by hand, then the gradient at w + v on a copy.
    torch.manual_seed(6)
    x_adv = recipe.adversarial(copy.deepcopy(original), x, y, 0)
    at_w = copy.deepcopy(original)
    names = [n for n, p in at_w.named_parameters() if p.dim() > 1]
    grads = torch.autograd.grad(recipe.objective(at_w, x, x_adv, y).loss, [at_w.get_parameter(n) for n in names])
    moved = copy.deepcopy(original)
    with torch.no_grad():
        for n, g in zip(names, grads):
            w = moved.get_parameter(n)
            w += gamma * w.norm() * g / g.norm()
    loss = recipe.objective(moved, x, x_adv, y).loss
    want = torch.autograd.grad(loss, list(moved.parameters()))
    at_step, got = opt.seen
    for before, weights in zip(original.parameters(), at_step):
        assert torch.equal(before, weights), "the weights were not restored bit for bit before the step"
    still = copy.deepcopy(original)
    plain = torch.autograd.grad(recipe.objective(still, x, x_adv, y).loss, list(still.parameters()))
    for g, w, p in zip(got, want, plain):
        # float32: v by foreach norms vs by hand differs by rounding (~1e-7 relative).
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert max((g - p).abs().max() for g, p in zip(got, plain)) > 1e-3, "the gradient at w + v is the one at w"
    # Batch-norm statistics: those of the one training forward at w + v, not of the ascent's forward too.
    torch.testing.assert_close(model[1].running_mean, moved[1].running_mean, rtol=1e-5, atol=1e-7)
    assert torch.equal(model[1].num_batches_tracked, moved[1].num_batches_tracked)  # pgd: 1 forward, trades: 2


def test_awp_with_the_fused_optimiser_and_step_guard_matches_plain_sgd():
    import copy

    batch = tiny_batch()
    recipe = T.PGDTraining(steps=2, awp_gamma=5e-3)
    runs = []
    for fused in (False, True):
        model = tiny_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
        torch.manual_seed(7)
        for _ in range(2):
            recipe.train_step(model, batch, opt, scaler=T.StepGuard("cpu") if fused else None)
        runs.append(copy.deepcopy(model.state_dict()))
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], rtol=1e-5, atol=1e-7, msg=key)


def test_awp_refuses_the_single_loss_helper():
    with pytest.raises(TypeError, match="train_step"):
        T.recipe_loss(tiny_cnn(), tiny_batch(), recipe="pgd", awp_gamma=5e-3)
    with pytest.raises(ValueError, match="awp_gamma"):
        T.make_recipe("trades", awp_gamma=-1.0)
