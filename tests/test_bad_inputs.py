"""Bad models and bad inputs in attacks, saliency and evaluation: each an error naming the argument
and what was expected, never a traceback from inside torch and never a made-up number."""

import warnings

import pytest
import torch
from _models import tiny_cnn
from torch import nn

from fastsat import models, saliency
from fastsat.attacks import APGD, PGD, Square
from fastsat.evaluate import evaluate


def _zoo(dtype=torch.float32):
    torch.manual_seed(0)
    return models.create("madrycnn", num_classes=3, width=2).to(dtype).eval()


def _batch(n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


class _Returns(nn.Module):
    """A CNN whose forward returns what ``shape`` says instead of (B, 3) logits."""

    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = tiny_cnn(3), kind

    def forward(self, x):
        logits = self.net(x)
        return {"tuple": (logits, x), "one_logit": logits[:, :1], "nan": logits * float("nan")}[self.kind]


ATTACKS = {
    "pgd": lambda m: PGD(m, eps=8 / 255, steps=2),
    "apgd": lambda m: APGD(m, eps=8 / 255, steps=2),
    "square": lambda m: Square(m, eps=8 / 255, n_queries=2),
}


@pytest.mark.parametrize("run", [
    lambda m, x, y: m(x),
    lambda m, x, y: PGD(m, eps=0.03, steps=2)(x, y),
    lambda m, x, y: saliency.gradient(m, x),
    lambda m, x, y: evaluate(m, (x, y), eps=[0.0]),
], ids=["forward", "pgd", "gradient", "evaluate"])
def test_a_float64_input_to_a_float32_model_is_named(run):
    x, y = _batch(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x: expected torch.float32 input \(the dtype of the model's weights\), got "
                                         r"torch.float64"):
        run(_zoo(), x, y)


def test_a_float64_input_to_any_float32_model_is_named():
    x, y = _batch(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"x: expected torch.float32 input"):
        PGD(tiny_cnn(3), eps=0.03, steps=2)(x, y)
    assert PGD(_zoo(torch.float64), eps=0.03, steps=2)(x, y).x_adv.dtype == torch.float64  # matching dtypes pass


@pytest.mark.parametrize("run", [
    lambda m, x, y: m(x),
    lambda m, x, y: PGD(m, eps=0.03, steps=2)(x, y),
    lambda m, x, y: saliency.smoothgrad(m, x, n_samples=2),
], ids=["forward", "pgd", "smoothgrad"])
def test_a_missing_batch_dimension_blames_x_not_y(run):
    x, y = _batch(n=1)
    with pytest.raises(ValueError, match=r"x: expected a batch of images \(B, 3, H, W\), got shape \(3, 8, 8\); a "
                                         r"single image needs its batch dimension: x\[None\]"):
        run(_zoo(), x[0], y)


@pytest.mark.parametrize("where", ["pgd", "apgd", "square", "gradient", "gradcam_pp", "evaluate"])
def test_a_model_returning_a_tuple_is_named(where):
    x, y = _batch()
    model = _Returns("tuple").eval()
    with pytest.raises(TypeError, match=r"model output: expected a \(4, K\) logits tensor, got a tuple of 2 \(a "
                                        r"torch.float32 tensor of shape \(4, 3\) on cpu, .*\); return the "
                                        r"logits alone"):
        if where == "gradient":
            saliency.gradient(model, x)
        elif where == "gradcam_pp":
            saliency.gradcam_pp(model, x, layer=model.net[0])
        elif where == "evaluate":
            evaluate(model, (x, y), eps=[0.0])
        else:
            ATTACKS[where](model)(x, y)


@pytest.mark.parametrize("where", ["pgd", "apgd", "square", "evaluate"])
def test_one_logit_per_sample_is_refused(where):
    x, y = _batch()
    y = torch.zeros_like(y)  # a valid label for K = 1, so the logits' shape is what must be refused
    model = _Returns("one_logit").eval()
    with pytest.raises(ValueError, match=r"model output: .*K >= 2 classes, got (shape \(4, 1\)|K = 1)"):
        if where == "evaluate":
            evaluate(model, (x, y), eps=[0.0])
        else:
            ATTACKS[where](model)(x, y)


@pytest.mark.parametrize("where", ["pgd", "apgd", "square", "evaluate"])
def test_nan_logits_are_refused_not_counted(where):
    x, y = _batch()
    model = _Returns("nan").eval()
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"model output: expected finite logits .*got 12 "
                                                                       r"NaN and 0 inf of 12 values"):
        warnings.simplefilter("ignore")
        if where == "evaluate":
            evaluate(model, (x, y), eps=[0.0, 8 / 255])
        else:
            ATTACKS[where](model)(x, y)


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "integrated_gradients", "gradcam_pp"])
def test_saliency_of_a_model_with_nan_logits_is_refused(method):
    x, _ = _batch()
    model = _Returns("nan").eval()
    kwargs = {"layer": model.net[0]} if method == "gradcam_pp" else {}
    with pytest.raises(ValueError, match=r"model output: expected finite logits"):
        saliency.compute(method, model, x, **kwargs)


def test_a_model_with_nan_weights_does_not_evaluate_to_numbers():
    x, y = _batch()
    model = _zoo()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"model output: expected finite logits \(are the model's weights finite\?\)"):
        evaluate(model, (x, y), eps=[0.0, 8 / 255], steps=2)


@pytest.mark.parametrize("method", ["gradient", "gradient_x_input", "smoothgrad", "integrated_gradients",
                                    "guided_backprop", "gradcam_pp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_saliency_refuses_non_finite_pixels(method, bad):
    x, _ = _batch()
    x[1, 2, 3, 4] = bad
    model = _zoo()
    kwargs = {"layer": models.default_cam_layer(model)} if method == "gradcam_pp" else {}
    with pytest.raises(ValueError, match=r"x: expected finite input values \(pixel space\), got [01] NaN and [01] inf "
                                         r"of 768 values"):
        saliency.compute(method, model, x, **kwargs)


def test_attacks_and_evaluate_refuse_non_finite_pixels():
    x, y = _batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x: expected finite values inside clip"):
        PGD(_zoo(), eps=0.03, steps=2)(x, y)
    with pytest.raises(ValueError, match=r"data: expected finite pixel values in the images, got 1 NaN"):
        evaluate(_zoo(), (x, y), eps=[0.0])
