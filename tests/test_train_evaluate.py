"""fastsat.evaluate: clean and robust accuracy at a list of ε, alignment from the attack's own statistics."""

import pytest
import torch
from test_train_recipes import tiny_data, tiny_model

from fastsat.attacks import PGD
from fastsat.evaluate import evaluate


def test_evaluate_against_a_direct_computation():
    model = tiny_model().eval()
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
    assert apgd[1]["alignment"] is None
    # Same seed, same attack: the robust accuracy and the mean alignment/cosine of its last step.
    torch.manual_seed(3)
    result = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, random_start=True)(x, y)
    assert pgd[1]["acc"] == (correct & ~result.success).float().mean().item()
    # float64 sums of float32 values vs a float32 mean: ~1e-7 relative.
    assert pgd[1]["alignment"] == pytest.approx(result.stats.alignment.mean().item(), rel=1e-6)
    assert pgd[1]["cosine"] == pytest.approx(result.stats.cosine.mean().item(), rel=1e-6)


def test_evaluate_batches_and_max_samples_agree():
    model = tiny_model().eval()
    data = tiny_data(24)
    whole = evaluate(model, data, eps=[0.0], batch_size=24)
    split = evaluate(model, data, eps=[0.0], batch_size=5)
    assert whole["clean_acc"] == split["clean_acc"]
    assert evaluate(model, data, eps=[0.0], batch_size=5, max_samples=7)["n"] == 7


def test_evaluate_bad_arguments():
    model = tiny_model()
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
