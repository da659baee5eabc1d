"""fastsat.evaluate's suites: the protocols' numbers, exact answers on linear models (the L∞ robust
accuracy, the minimal L2 perturbation and MALT's target scores are analytic there), the
gradient-masking flags on models that mask gradients and on one that does not, the rapid suite
against the standard one (robust accuracy and forward passes), a suite written outside the library,
and strength against torchattacks' AutoAttack where it is installed."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import linear_model, template_cnn
from torch import nn

from bench.eval_models import Quantised, Saturated  # the masked models the benchmarks' zoo also attacks
from fastsat import cli
from fastsat.attacks import APGD, APGDT, FAB, Square
from fastsat.evaluate import (
    ATTACKS,
    MEANINGS,
    SUITES,
    MaskingChecks,
    PaperSuite,
    RapidSuite,
    StandardSuite,
    Suite,
    evaluate,
)
from fastsat.evaluate.suites import malt_scores

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKS = MaskingChecks(subset=16, square_queries=100)
SMALL_STANDARD = StandardSuite(steps=10, fab_steps=10, square_queries=100, checks=CHECKS)
SMALL_PAPER = PaperSuite(cw_steps=100, cw_binary_search_steps=6, checks=CHECKS)
SMALL_RAPID = RapidSuite(steps=10, target_steps=10, square_queries=100, checks=CHECKS)
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
    # Rapid: APGD-CE 50, APGD-T 100 iterations on 3 of the 9 top-logit classes re-ranked by MALT's
    # score, Square (5000 queries) only where a masking check calls for it.
    rapid = RapidSuite()
    built = rapid.attacks(linear_model(5, PIXELS, bias=False), [8 / 255], "linf", (0.0, 1.0))
    apgd, apgdt = built[8 / 255]["apgd-ce"], built[8 / 255]["apgd-t"]
    assert (apgd.steps, apgd.restarts, apgd.loss) == (50, 1, "ce")
    assert (apgdt.steps, apgdt.n_target_classes, rapid.candidates) == (100, 3, 9) and apgdt.target_score is not None
    assert built[8 / 255]["square"].n_queries == 5000 and built["probe"].n_queries == MaskingChecks().square_queries


@pytest.mark.parametrize("suite", [SMALL_STANDARD, SMALL_RAPID], ids=["standard", "rapid"])
def test_suite_reaches_the_analytic_linf_robust_accuracy_of_a_linear_model(suite):
    # z = Wx, box out of reach: a correctly classified point is robust at ε iff
    # (z_y − z_j)/‖w_y − w_j‖₁ > ε for every j ≠ y.
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    eps = 0.02
    margin = _pairwise(model, x, y, dual=1)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=suite, eps=[0.0, eps])
    clean, row = report[suite.name]
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


@pytest.mark.parametrize("suite", [SMALL_STANDARD, SMALL_PAPER, SMALL_RAPID], ids=["standard", "paper", "rapid"])
def test_a_quantising_model_raises_the_masking_flags(suite):
    model, x = Quantised(linear_model(5, PIXELS, bias=False)), _points()
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=suite, eps=[0.02])
    masking = report["masking"]
    # Whether more random restarts get lucky on a model without gradients is up to chance: the
    # convergence flag is not asserted.
    assert {"gradient_free", "large_eps", "zero_gradients"} <= set(masking["flags"]), masking
    assert masking["checks"]["zero_gradients"]["share"] == 1.0
    for name, check in masking["checks"].items():
        assert check["meaning"] == MEANINGS[name] and check["meaning"].endswith(".")
    if suite is SMALL_RAPID:  # the flags call for Square on every point, and it breaks some
        (row,) = report["rapid"]
        assert row["square_on"] == "all" and row["acc"] < row["cumulative"]["apgd-t"], row


@pytest.mark.parametrize("suite", [SMALL_STANDARD, SMALL_RAPID], ids=["standard", "rapid"])
def test_a_saturated_model_raises_the_zero_gradient_and_large_eps_flags(suite):
    model, x = Saturated(linear_model(5, PIXELS, bias=False)), _points()
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=suite, eps=[0.02])
    assert {"zero_gradients", "large_eps"} <= set(report["masking"]["flags"]), report["masking"]
    if suite is SMALL_RAPID:
        assert report["rapid"][0]["square_on"] == "all"


def test_a_linear_model_raises_no_flag():
    # The paper suite's radii up to 2/255: 5 steps of 2/255 from a random start converge there (at
    # 8/255 they do not: the start can be 16/255 from the corner).
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    torch.manual_seed(0)
    report = _quiet(model, (x, y), suite=SMALL_STANDARD, eps=[8 / 255])
    assert report["masking"]["flags"] == [], report["masking"]
    # Rapid: no flag, so Square runs only as the probe on the check subset at the main ε.
    report = _quiet(model, (x, y), suite=SMALL_RAPID, eps=[0.0, 0.02, 8 / 255])
    assert report["masking"]["flags"] == [], report["masking"]
    assert [row["square_on"] for row in report["rapid"]] == ["none", "none", "subset"]
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


def test_convergence_restarts_count_the_suites_own_run():
    # With factor 1 the suite's own run of its main attack is the only restart: nothing more runs
    # and what it left robust stays so.
    model, x = linear_model(5, PIXELS, bias=False), _points()
    y = _labels(model, x)
    one = StandardSuite(steps=10, fab_steps=10, square_queries=100, checks=MaskingChecks(subset=16, factor=1))
    torch.manual_seed(0)
    check = _quiet(model, (x, y), suite=one, eps=[0.02])["masking"]["checks"]["convergence"]
    assert check["acc_more_restarts"] == check["acc"] and check["factor"] == 1


def test_malt_scores_are_the_exact_boundary_distances_of_a_linear_model():
    # z = Wx: (z_t − z_y)/‖w_t − w_y‖_* is the signed distance to the boundary between y and t (dual
    # norm L1 for L∞, L2 for L2); only the top `candidates` other logits get one.
    model, x = linear_model(6, PIXELS, bias=False), _points(10)
    y = _labels(model, x, wrong=0)
    weight = model[1].weight.detach()
    x_in = x.clone().requires_grad_(True)
    logits = model(x_in)  # APGD-T hands the score its own clean forward, with the graph
    z = logits.detach()
    for norm, dual in (("linf", 1), ("l2", 2)):
        scores = malt_scores(norm, candidates=3)(x_in, y, logits)
        expected = (z - z.gather(1, y[:, None])) / (weight[None] - weight[y][:, None, :]).norm(p=dual, dim=2)
        scored = torch.isfinite(scores)
        assert scored.sum(1).tolist() == [3] * len(y)
        others = z.scatter(1, y[:, None], -torch.inf)
        assert torch.equal(scored, others >= others.topk(3, dim=1).values[:, -1:])
        torch.testing.assert_close(scores[scored], expected[scored], rtol=1e-12, atol=0)


class Counting(nn.Module):
    """Counts the images of every forward pass (a gradient is one forward and one backward)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def test_rapid_matches_standard_with_a_fraction_of_its_forward_passes():
    # Both at their full defaults (masking checks included) on a small trained 10-class CNN at a
    # radius that leaves about half of the correct points robust. Measured: equal accuracies
    # (0.234), rapid at 0.22× standard's forward images. The accuracy may differ by one point of
    # 64 (the two protocols draw different random starts); the bound on the passes leaves room
    # for that point too.
    model, x, y = template_cnn(classes=10, held_out=64)
    counted = {}
    acc = {}
    for name in ("standard", "rapid"):
        wrapped = Counting(model)
        torch.manual_seed(0)
        report = _quiet(wrapped, (x, y), suite=name, eps=[0.02])
        counted[name], acc[name] = wrapped.images, report[name][0]["acc"]
        assert report["masking"]["flags"] == [], report["masking"]
    assert 0 < acc["standard"] < report["clean_acc"], "the test needs robust and broken points"
    assert abs(acc["rapid"] - acc["standard"]) <= 1 / len(y), acc
    assert counted["rapid"] <= 0.3 * counted["standard"], counted


def test_a_suite_is_one_class_and_evaluate_runs_a_new_one():
    # A suite from outside the library: one count per batch, its own part of the report, no checks.
    class Misclassified(Suite):
        name = "misclassified"

        def batch(self, run, x, y, logits, correct, offset, add):
            add("misclassified:n", ~correct)

        def keys(self, run):
            return ["misclassified:n"]

        def report(self, run, totals, n):
            return {"share": totals["misclassified:n"] / n}

    model, x = linear_model(5, PIXELS, bias=False), _points(16)
    y = _labels(model, x)
    report = evaluate(model, (x, y), suite=Misclassified(), eps=[0.0], batch_size=5)
    assert report["suite"] == "misclassified" and "masking" not in report
    assert report["misclassified"]["share"] == 1 - report["clean_acc"] == 4 / 16
    assert list(SUITES) == ["quick", "standard", "paper", "rapid"] and "rapid" in SUITES
    assert list(ATTACKS) == ["pgd", "apgd-ce", "apgd-dlr"]

    # Masking checks rerun the suite's main attack: a suite with checks but none is refused up front.
    class Checked(Misclassified):
        checks = MaskingChecks()

    with pytest.raises(TypeError, match="suite: Checked has masking checks but no main_attack"):
        evaluate(model, (x, y), suite=Checked(), eps=[0.0], batch_size=5)


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
    assert vars(cli.build_parser().parse_args(["eval", "--suite", "rapid"]))["suite"] == "rapid"
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


def test_a_suite_runs_alone_with_no_attacks_but_quick_needs_one():
    model, x = linear_model(5, PIXELS, bias=False), _points(16)
    y = _labels(model, x)
    report = _quiet(model, (x, y), suite=SMALL_STANDARD, eps=[0.02], attacks=())
    assert report["attacks"] == {} and len(report["standard"]) == 1
    with pytest.raises(ValueError, match="attacks: expected a non-empty list"):
        evaluate(model, (x, y), eps=[0.02], attacks=())
