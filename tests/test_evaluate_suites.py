"""fastsat.evaluate's suites: the protocols' numbers, exact answers on linear models (the L∞ robust
accuracy and the minimal L2 perturbation are analytic there), the gradient-masking flags on models
that mask gradients and on one that does not, and strength against torchattacks' AutoAttack where
it is installed."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import linear_model, template_cnn
from torch import nn

from fastsat import cli
from fastsat.attacks import APGD, APGDT, FAB, Square
from fastsat.evaluate import MEANINGS, MaskingChecks, PaperSuite, StandardSuite, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = MaskingChecks(subset=16, square_queries=100)
SMALL_STANDARD = StandardSuite(steps=10, fab_steps=10, square_queries=100, checks=CHECKS)
SMALL_PAPER = PaperSuite(cw_steps=100, cw_binary_search_steps=6, checks=CHECKS)
PIXELS = 64  # the 1×8×8 images of _points, flattened


def _points(n: int = 48, seed: int = 2) -> torch.Tensor:
    """1×8×8 images in [0.3, 0.7]: the box [0, 1] is out of reach of every radius used here."""
    gen = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64)


def _labels(model: nn.Module, x: torch.Tensor, wrong: int = 4) -> torch.Tensor:
    """The model's predictions with the first ``wrong`` changed: some points start misclassified."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % 5
    return y


def _pairwise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dual: float) -> torch.Tensor:
    """(B,) min_{j≠y} (z_y − z_j)/‖w_y − w_j‖_dual: the smallest perturbation (L∞ for dual 1, L2 for
    dual 2) that makes some class score as high as y; ≤ 0 for misclassified points."""
    weight = model[1].weight.detach()
    with torch.no_grad():
        z = model(x)
    gaps = (z.gather(1, y[:, None]) - z) / (weight[y][:, None, :] - weight[None]).norm(p=dual, dim=2).clamp_min(1e-300)
    return gaps.masked_fill(F.one_hot(y, z.shape[1]).bool(), torch.inf).amin(1)


def _quiet(*args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the masking models warn about their zero gradients
        return evaluate(*args, **kwargs)


def test_defaults_are_the_protocols_numbers():
    # AutoAttack standard: APGD-CE 100 iterations 1 restart, APGD-T 9 targets 100 iterations 1
    # restart, FAB-T 9 targets 1 restart, Square 5000 queries (p_init 0.8).
    chain = StandardSuite().attacks(linear_model(5, PIXELS, bias=False), [8 / 255], "linf", (0.0, 1.0))[8 / 255]
    assert list(chain) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd, apgdt, fab, square = chain.values()
    assert isinstance(apgd, APGD) and (apgd.steps, apgd.restarts, apgd.loss) == (100, 1, "ce")
    assert isinstance(apgdt, APGDT) and (apgdt.steps, apgdt.restarts, apgdt.n_target_classes) == (100, 1, 9)
    assert isinstance(fab, FAB) and (fab.steps, fab.restarts, fab.n_target_classes) == (100, 1, 9)
    assert isinstance(square, Square) and (square.n_queries, square.p_init, square.restarts) == (5000, 0.8, 1)
    assert all(a.eps == 8 / 255 for a in chain.values())
    # SAT authors: PGD-5, fixed step 2/255, ε ∈ {1..8}/255; CW L2.
    paper = PaperSuite()
    assert paper.eps == tuple(k / 255 for k in range(1, 9))
    assert (paper.steps, paper.step_size) == (5, 2 / 255)
    assert (paper.cw_steps, paper.cw_binary_search_steps) == (1000, 9)


def test_standard_suite_reaches_the_analytic_linf_robust_accuracy_of_a_linear_model():
    # z = Wx, box out of reach: a correctly classified point is robust at ε iff
    # (z_y − z_j)/‖w_y − w_j‖₁ > ε for every j ≠ y.
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    eps = 0.02
    margin = _pairwise(model, x, y, dual=1)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=SMALL_STANDARD, eps=[0.0, eps])
    clean, row = report["standard"]
    assert clean["acc"] == report["clean_acc"] == (margin > 0).double().mean().item()
    n = x.shape[0]
    surely_robust = (margin > eps * (1 + 1e-6)).sum().item()
    maybe_robust = (margin > eps * (1 - 1e-6)).sum().item()
    assert surely_robust / n <= row["acc"] <= maybe_robust / n
    assert 0 < surely_robust < (margin > 0).sum().item(), "the test needs robust and breakable points"
    steps = list(row["cumulative"].values())
    assert steps == sorted(steps, reverse=True) and steps[-1] == row["acc"], "each attack runs on the points left"
    assert report["masking"]["flags"] == [], report["masking"]


def test_paper_suite_pgd_is_sound_and_cw_norms_are_never_below_the_analytic_minimum():
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=SMALL_PAPER, eps=[0.0])
    linf = _pairwise(model, x, y, dual=1)
    for row in report["paper"]["pgd"]:
        assert row["acc"] >= (linf > row["eps"] * (1 + 1e-6)).double().mean().item()
    l2 = _pairwise(model, x, y, dual=2)
    correct = l2 > 0
    cw = report["paper"]["cw"]
    # The norms are over the correctly classified points only: a misclassified one is no distance.
    assert 0 < correct.sum().item() < len(y), "the test needs misclassified points"
    assert cw["points"] == correct.sum().item()
    analytic = l2[correct].median().item()
    # CW's minimal norms are each ≥ the analytic ones (any adversarial point is at least that far),
    # so their median is too; and CW gets close to the minimum on a linear model.
    assert analytic * (1 - 1e-9) <= cw["median_l2"] <= analytic * 1.1
    assert cw["mean_l2"] >= l2[correct].mean().item() * (1 - 1e-9)
    assert cw["found"] == 1.0
    assert cw["acc"] >= (l2.clamp_min(0) > cw["eps"]).double().mean().item()


class Quantised(nn.Module):
    """A linear model of the input rounded to 1/64: its input gradient is zero everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 64) / 64)


class Saturated(nn.Module):
    """softmax(10⁴·Wx) as the output: saturated, its gradient vanishes on most points."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x) * 1e4, dim=1)


@pytest.mark.parametrize("suite", [SMALL_STANDARD, SMALL_PAPER], ids=["standard", "paper"])
def test_a_quantising_model_raises_the_masking_flags(suite):
    model, x = Quantised(linear_model(5, PIXELS, bias=False)), _points()
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    masking = _quiet(model, (x, y), suite=suite, eps=[0.02])["masking"]
    # Whether more random restarts get lucky on a model without gradients is up to chance: the
    # convergence flag is not asserted.
    assert {"gradient_free", "large_eps", "zero_gradients"} <= set(masking["flags"]), masking
    assert masking["checks"]["zero_gradients"]["share"] == 1.0
    for name, check in masking["checks"].items():
        assert check["meaning"] == MEANINGS[name] and check["meaning"].endswith(".")


def test_a_saturated_model_raises_the_zero_gradient_and_large_eps_flags():
    model, x = Saturated(linear_model(5, PIXELS, bias=False)), _points()
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    masking = _quiet(model, (x, y), suite=SMALL_STANDARD, eps=[0.02])["masking"]
    assert {"zero_gradients", "large_eps"} <= set(masking["flags"]), masking


def test_a_linear_model_raises_no_flag():
    # The paper suite's radii up to 2/255: 5 steps of 2/255 from a random start converge there (at
    # 8/255 they do not: the start can be 16/255 from the corner).
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=SMALL_STANDARD, eps=[8 / 255])
    assert report["masking"]["flags"] == [], report["masking"]
    # With two classes the CE gradient points along w₁ − w₀ everywhere, so PGD-5 reaches the
    # corner that breaks a point whenever one exists (with more classes CE-PGD may aim at the
    # wrong class, which Square's margin loss does not: a weaker attack, not masking).
    model = linear_model(2, PIXELS, bias=False)
    with torch.no_grad():
        y = model(x).argmax(1)
    paper = PaperSuite(eps=(1 / 255, 2 / 255), cw_steps=20, cw_binary_search_steps=2, checks=CHECKS)
    report = _quiet(model, (x, y), suite=paper)
    assert report["masking"]["flags"] == [], report["masking"]


def test_quick_keeps_the_trainers_contract_and_reports_speed():
    model, x = linear_model(5, PIXELS, bias=False), _points(16)
    y = _labels(model, x)
    report = evaluate(model, (x, y), eps=[8 / 255], steps=2)
    assert report["suite"] == "quick" and "masking" not in report and "standard" not in report
    assert set(report["attacks"]["pgd"][0]) == {"eps", "acc", "last_iterate_alignment", "last_iterate_cosine"}
    assert report["points_per_s"] == pytest.approx(report["n"] / report["seconds"])


def test_suite_arguments_are_checked():
    model, x = linear_model(5, PIXELS, bias=False), _points(8)
    y = _labels(model, x)
    with pytest.raises(ValueError, match="suite"):
        evaluate(model, (x, y), suite="standrad")
    with pytest.raises(TypeError, match="suite"):
        evaluate(model, (x, y), suite=3)
    with pytest.raises(ValueError, match="square_queries"):
        StandardSuite(square_queries=0)
    with pytest.raises(ValueError, match="eps"):
        PaperSuite(eps=(0.0,))
    with pytest.raises(ValueError, match="tolerance"):
        MaskingChecks(tolerance=2)
    with pytest.raises(TypeError, match="checks"):
        StandardSuite(checks={"subset": 3})
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        evaluate(three, (x.float(), y % 3), suite=SMALL_STANDARD, eps=[0.02])


# ---------------------------------------------------------------------------------------------
# Against torchattacks' AutoAttack, where it is installed


@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="torchattacks is not installed")
def test_standard_suite_is_at_least_as_strong_as_torchattacks_autoattack():
    import torchattacks

    model, x, y = template_cnn(classes=5, held_out=48)
    eps = 0.06
    torch.manual_seed(0)
    ours = _quiet(model, (x, y), suite=StandardSuite(steps=20, fab_steps=20, square_queries=300, checks=CHECKS),
                  eps=[eps])["standard"][0]["acc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=5, seed=0)
        x_adv = attack(x, y)
    with torch.no_grad():
        theirs = (model(x_adv).argmax(1) == y).double().mean().item()
    assert ours <= theirs, f"fastsat standard suite {ours:.4f} vs torchattacks AutoAttack {theirs:.4f}"


# ---------------------------------------------------------------------------------------------
# fastsat eval --suite


def test_cli_eval_suite_option_reaches_evaluate_and_prints_the_flags(tmp_path, monkeypatch, capsys):
    assert vars(cli.build_parser().parse_args(["eval", "--suite", "standard"]))["suite"] == "standard"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--suite", "standrad"])
    seen = []

    def small(model, data, *, suite, **kwargs):  # the protocol's budgets would take minutes here
        seen.append(suite)
        return _quiet(model, data, suite=SMALL_PAPER if suite == "paper" else suite, **kwargs)

    monkeypatch.setattr(cli, "evaluate", small)
    out = tmp_path / "eval.json"
    status = cli.main(["eval", "--suite", "paper", "--n-train", "16", "--n-test", "8", "--image-size", "12",
                       "--num-classes", "4", "--model", "madrycnn", "--width", "4", "--device", "cpu",
                       "--eps", "8/255", "--steps", "2", "--out", str(out)])
    assert status == 0 and seen == ["paper"]
    report = json.loads(out.read_text())
    assert report["suite"] == "paper" and len(report["paper"]["pgd"]) == 8
    printed = capsys.readouterr().out
    assert "paper-pgd5" in printed and "gradient-masking flags:" in printed and "cw-l2" in printed
