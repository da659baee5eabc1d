"""fastsat.evaluate: clean and robust accuracy at a list of ε, Etmann's alignment at the clean input,
and the last-iterate alignment from the attack's own statistics."""

import pytest
import torch
from _models import tiny_cnn
from test_train_recipes import tiny_data
from torch import nn

import fastsat.train as T
from fastsat.alignment import saliency_alignment
from fastsat.attacks import APGD, PGD
from fastsat.evaluate import evaluate


def test_evaluate_against_a_direct_computation():
    model = tiny_cnn().eval()
    data = tiny_data(16)
    x, y = data.images.float() / 255, data.labels
    torch.manual_seed(3)
    report = evaluate(model, (x, y), eps=[0.0, 8 / 255], attacks=["pgd", "apgd-ce"], steps=3)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert report["n"] == 16
    assert report["clean_acc"] == correct.float().mean().item()
    pgd, apgd = report["attacks"]["pgd"], report["attacks"]["apgd-ce"]
    assert pgd[0]["acc"] == report["clean_acc"] and apgd[0]["acc"] == report["clean_acc"]
    assert pgd[1]["acc"] <= report["clean_acc"] and apgd[1]["acc"] <= report["clean_acc"]
    assert pgd[0]["last_iterate_alignment"] is None and apgd[0]["last_iterate_cosine"] is None, (
        "ε = 0 runs no attack, so it has no last iterate"
    )
    # Same seed, same attacks in the same order: the robust accuracy and the mean alignment/cosine
    # of each attack's last step (APGD reports them too).
    torch.manual_seed(3)
    result = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, random_start=True)(x, y)
    apgd_result = APGD(model, eps=8 / 255, steps=3)(x, y)
    assert apgd[1]["acc"] == (correct & ~apgd_result.success).float().mean().item()
    assert apgd[1]["last_iterate_alignment"] == pytest.approx(apgd_result.stats.alignment.mean().item(), rel=1e-6)
    assert apgd[1]["last_iterate_cosine"] == pytest.approx(apgd_result.stats.cosine.mean().item(), rel=1e-6)
    assert pgd[1]["acc"] == (correct & ~result.success).float().mean().item()
    # float64 sums of float32 values vs a float32 mean: ~1e-7 relative.
    assert pgd[1]["last_iterate_alignment"] == pytest.approx(result.stats.alignment.mean().item(), rel=1e-6)
    assert pgd[1]["last_iterate_cosine"] == pytest.approx(result.stats.cosine.mean().item(), rel=1e-6)
    # The clean-input alignment is the predicted logit's saliency map at x.
    clean = saliency_alignment(model, x)
    assert report["alignment"] == pytest.approx(clean.alignment.mean().item(), rel=1e-6)
    assert report["cosine"] == pytest.approx(clean.cosine.mean().item(), rel=1e-6)


def test_evaluate_alignment_is_at_the_clean_input_for_a_linear_model():
    # Ψ(x) = Wx + b: the predicted logit's gradient at x is W[i*], so α = |⟨x, W[i*]⟩| / ‖W[i*]‖
    # exactly. With 3 classes the loss gradient at PGD's last iterate, Σ_k (p_k − y_k) W[k], points
    # elsewhere, so the last-iterate alignment is a different number, reported separately.
    torch.manual_seed(4)
    d = 3 * 6 * 6
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 3)).double()
    x = torch.rand(20, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    w = model[1].weight.detach()
    w_star = w[model(x).argmax(1)]
    alpha = (x.flatten(1) * w_star).sum(1).abs() / w_star.norm(dim=1)
    cosine = alpha / x.flatten(1).norm(dim=1)
    torch.manual_seed(5)
    report = evaluate(model, (x, y), eps=[8 / 255], steps=3)
    assert report["alignment"] == pytest.approx(alpha.mean().item(), rel=1e-9)
    assert report["cosine"] == pytest.approx(cosine.mean().item(), rel=1e-9)
    torch.manual_seed(5)
    stats = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, random_start=True)(x, y).stats
    row = report["attacks"]["pgd"][0]
    assert row["last_iterate_alignment"] == pytest.approx(stats.alignment.mean().item(), rel=1e-9)
    assert row["last_iterate_cosine"] == pytest.approx(stats.cosine.mean().item(), rel=1e-9)
    assert abs(row["last_iterate_alignment"] - report["alignment"]) > 0.05 * report["alignment"], (
        "the test needs the two alignments to differ"
    )
    assert set(row) == {"eps", "acc", "last_iterate_alignment", "last_iterate_cosine"}


def test_evaluate_batches_and_max_samples_agree():
    model = tiny_cnn().eval()
    data = tiny_data(24)
    whole = evaluate(model, data, eps=[0.0], batch_size=24)
    split = evaluate(model, data, eps=[0.0], batch_size=5)
    assert whole["clean_acc"] == split["clean_acc"]
    assert evaluate(model, data, eps=[0.0], batch_size=5, max_samples=7)["n"] == 7


def test_evaluate_bad_arguments():
    model = tiny_cnn()
    data = tiny_data(4)
    with pytest.raises(ValueError, match="attacks"):
        evaluate(model, data, attacks=["cw"])
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, data, eps=[-1.0])
    with pytest.raises(ValueError, match="steps"):
        evaluate(model, data, steps=0)
    # A fractional count would otherwise surface as a slicing TypeError deep in the loop.
    with pytest.raises(ValueError, match="max_samples"):
        evaluate(model, data, max_samples=2.5)
    with pytest.raises(ValueError, match="norm"):
        evaluate(model, data, norm="l3")
    with pytest.raises(ValueError, match="step_size"):
        evaluate(model, data, step_size=0.0)
    with pytest.raises(TypeError, match="attacks"):
        evaluate(model, data, attacks="pgd")
    with pytest.raises(TypeError, match="eps"):
        evaluate(model, data, eps=8 / 255)


def test_evaluate_rejects_repeated_radii_and_attacks():
    # A repeat used to be summed twice into the same row (robust accuracy up to 2).
    model = tiny_cnn()
    data = tiny_data(4)
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, data, eps=[8 / 255, 8 / 255], steps=1)
    with pytest.raises(ValueError, match="attacks"):
        evaluate(model, data, eps=[0.0], attacks=["pgd", "pgd"])
    # Radii are compared as numbers, whatever real type they come in.
    with pytest.raises(ValueError, match="distinct"):
        evaluate(model, data, eps=[torch.tensor(8 / 255, dtype=torch.float64), 8 / 255], steps=1)


def test_a_run_with_another_input_box_is_evaluated_in_that_box():
    # Images in [-1, 1]: the per-epoch evaluation's attack must use the run's clip, not [0, 1]
    # (it refused the clean inputs as outside its box).
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    y = torch.randint(0, 3, (16,))
    result = T.fit(tiny_cnn(), (x, y), recipe="pgd", recipe_options={"steps": 2}, clip=(-1.0, 1.0), eval_data=(x, y),
                   epochs=1, batch_size=8, eval_steps=2, progress=False)
    assert 0 <= result.history[0]["robust_acc"] <= result.history[0]["clean_acc"]
    report = evaluate(tiny_cnn(), (x, y), eps=[8 / 255], steps=2, clip=(-1.0, 1.0))
    assert 0 <= report["attacks"]["pgd"][0]["acc"] <= report["clean_acc"]
    with pytest.raises(ValueError, match="clip"):
        evaluate(tiny_cnn(), (x, y), eps=[8 / 255], steps=2)
