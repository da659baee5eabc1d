"""The trainer (fastsat.train.fit): bit-exact resume, NaN stop, SIGKILL + resume, atomic checkpoints, logs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastsat.train as T
from fastsat._io import atomic_save
from fastsat.train.checkpoint import load_checkpoint

# The child process of the SIGKILL test runs this same set-up; the parent execs it too, so both
# sides build identical models and data.
SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn
    import fastsat.train as T
    from fastsat.data import shapes

    def tiny_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    train = shapes(48, size=12, num_classes=3, seed=0, cache_dir=False)
    test = shapes(16, size=12, num_classes=3, seed=1, cache_dir=False)
    FIT = dict(recipe_options={"steps": 1}, epochs=3, batch_size=16, lr=0.05, eval_data=test, eval_steps=2, progress=False)
    """
)
namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102 — the same source the SIGKILL test's child process runs
tiny_model, train, test, FIT = namespace["tiny_model"], namespace["train"], namespace["test"], namespace["FIT"]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b, where):
    for key in a:
        assert torch.equal(a[key], b[key]), f"{where}: {key} differs by {(a[key].float() - b[key].float()).abs().max()}"


def _strip_times(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history]


class CrashAt(T.SATPlusPGD):
    """sat+pgd that dies at the start of a given epoch (a simulated crash)."""

    crash_epoch = 2

    def train_step(self, model, batch, optimizer, *, epoch=0, **kw):
        if epoch == self.crash_epoch:
            raise KeyboardInterrupt
        return super().train_step(model, batch, optimizer, epoch=epoch, **kw)


def _user_loader():
    # A user's own DataLoader of (x, y) tuples, shuffled by torch's global generator.
    xs, ys = train.images.float() / 255, train.labels
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16, shuffle=True)


@pytest.mark.parametrize("source", ["dataset", "user_loader"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, source):
    recipe = "sat+pgd" if source == "dataset" else "pgd"
    data = train if source == "dataset" else _user_loader()
    model = tiny_model()
    full = T.fit(model, data, recipe=recipe, out_dir=tmp_path / "full", **FIT)
    want = _weights(model)

    interrupted = tiny_model()
    crash = CrashAt(steps=1) if recipe == "sat+pgd" else None
    if crash is None:
        class Crash(T.PGDTraining):
            def train_step(self, model, batch, optimizer, *, epoch=0, **kw):
                if epoch == 2:
                    raise KeyboardInterrupt
                return super().train_step(model, batch, optimizer, epoch=epoch, **kw)
        crash = Crash(steps=1)
    options = {k: v for k, v in FIT.items() if k != "recipe_options"}
    with pytest.raises(KeyboardInterrupt):
        T.fit(interrupted, data, recipe=crash, out_dir=tmp_path / "resumed", **options)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 2
    # A fresh process would start from a freshly initialised model and a different RNG state.
    torch.manual_seed(999)
    resumed_model = tiny_model()
    data = train if source == "dataset" else _user_loader()
    resumed = T.fit(resumed_model, data, recipe=recipe, out_dir=tmp_path / "resumed", resume=True, **FIT)
    _assert_same_weights(want, _weights(resumed_model), f"{source}: resumed vs uninterrupted")
    assert _strip_times(resumed.history) == _strip_times(full.history)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_resume_refuses_other_settings(tmp_path):
    T.fit(tiny_model(), train, recipe="standard", out_dir=tmp_path, **{**FIT, "epochs": 1, "recipe_options": None})
    with pytest.raises(ValueError, match="lr"):
        T.fit(tiny_model(), train, recipe="standard", out_dir=tmp_path, resume=True, **{**FIT, "epochs": 1, "lr": 0.1, "recipe_options": None})


class NaNAt(T.Standard):
    def loss(self, model, batch, *, epoch=0):
        out = super().loss(model, batch, epoch=epoch)
        return out._replace(loss=out.loss * float("nan")) if epoch == 1 else out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    with pytest.raises(T.NonFiniteLossError, match=r"in epoch 2, batch 0.*checkpoint.*after epoch 1\) is intact"):
        T.fit(model, train, recipe=NaNAt(), out_dir=tmp_path, **{k: v for k, v in FIT.items() if k != "recipe_options"})
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The step was not taken: the parameters are still epoch 1's (batch-norm buffers saw one more forward).
    params = {name: p.detach() for name, p in model.named_parameters()}
    _assert_same_weights(params, {k: state["model"][k] for k in params}, "parameters after the NaN vs checkpoint")


def test_sigkill_mid_epoch_then_resume(tmp_path):
    marker = tmp_path / "mid-epoch"
    child = SETUP + textwrap.dedent(
        f"""
        import pathlib, time

        class Slow(T.SATPlusPGD):
            def train_step(self, model, batch, optimizer, *, epoch=0, **kw):
                out = super().train_step(model, batch, optimizer, epoch=epoch, **kw)
                if epoch == 1:
                    pathlib.Path({str(marker)!r}).touch()
                    time.sleep(120)
                return out

        T.fit(tiny_model(), train, recipe=Slow(steps=1), out_dir={str(tmp_path / "run")!r},
              **{{k: v for k, v in FIT.items() if k != "recipe_options"}})
        """
    )
    # The child must reduce with the parent's thread count, or float sums differ in the last bit.
    child = f"import torch; torch.set_num_threads({torch.get_num_threads()})\n" + child
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"child exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "child never reached epoch 2"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    resumed_model = tiny_model()
    resumed = T.fit(resumed_model, train, recipe="sat+pgd", out_dir=tmp_path / "run", resume=True, **FIT)
    uninterrupted = tiny_model()
    full = T.fit(uninterrupted, train, recipe="sat+pgd", **FIT)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    _assert_same_weights(_weights(uninterrupted), _weights(resumed_model), "killed+resumed vs uninterrupted")
    assert _strip_times(resumed.history) == _strip_times(full.history)


def test_atomic_save_survives_a_crash_during_save(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    first = {"w": torch.randn(5)}
    atomic_save(first, path)

    def torn_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.randn(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], first["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"], "temporary file left behind"


def test_fit_logs_metrics_every_epoch(tmp_path):
    result = T.fit(tiny_model(), _user_loader(), recipe="standard", out_dir=tmp_path, **{**FIT, "epochs": 2, "recipe_options": None})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("train_loss", "train_acc", "clean_acc", "robust_acc", "alignment", "cosine"):
            assert isinstance(row[key], float) and row[key] == row[key], f"{key} = {row[key]}"
        assert 0 <= row["robust_acc"] <= row["clean_acc"] + 1e-9 <= 1 + 1e-9
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 3
    assert result.checkpoint == tmp_path / "checkpoint.pt"


def test_lr_schedules():
    f = T.lr_factor
    assert [f("piecewise", s, 40, 4) for s in (0, 19, 20, 31, 32, 39)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert f("cosine", 0, 10, 1) == 1.0 and f("cosine", 5, 10, 1) == pytest.approx(0.5, abs=1e-12)
    assert f("onecycle", 3, 10, 1) == pytest.approx(1.0) and f("onecycle", 9, 10, 1) == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        T.fit(tiny_model(), train, recipe="standard", epochs=0)
    with pytest.raises(ValueError, match="precision"):
        T.fit(tiny_model(), train, recipe="standard", precision="fp8")
    with pytest.raises(ValueError, match="schedule"):
        T.fit(tiny_model(), train, recipe="standard", schedule="linear")
    with pytest.raises(TypeError, match="data"):
        T.fit(tiny_model(), object(), recipe="standard")


def test_fast_early_stop_restores_the_best_epoch(tmp_path, monkeypatch):
    # Script the per-epoch PGD accuracy: it peaks at epoch 2 and collapses at epoch 3 (catastrophic
    # overfitting); training must stop there with epoch 2's weights back in the model.
    import fastsat.evaluate

    accuracies = iter([0.30, 0.40, 0.05, 0.05])

    def scripted(model, data, **kw):
        return {"n": 16, "clean_acc": 0.5, "alignment": 1.0, "cosine": 0.1,
                "attacks": {"pgd": [{"eps": 8 / 255, "acc": next(accuracies), "last_iterate_alignment": 1.0,
                                     "last_iterate_cosine": 0.1}]}}

    monkeypatch.setattr(fastsat.evaluate, "evaluate", scripted)
    model = tiny_model()
    result = T.fit(model, train, recipe="fast", out_dir=tmp_path, **{**FIT, "epochs": 4, "recipe_options": None})
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.stopped is not None and "catastrophic overfitting" in result.stopped
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    _assert_same_weights(best["model"], _weights(model), "model after early stop vs best epoch")


@pytest.mark.parametrize("accuracies, stop_at", [
    ([0.04, 0.08, 0.02, 0.02], 3),   # a quarter of a low peak: the relative rule stops it
    ([0.04, 0.08, 0.03, 0.03], None),  # 0.03 > 0.08 / 4: not a collapse
    ([0.02, 0.04, 0.00, 0.00], None),  # a best under early_stop_drop / 4 is noise: no stop
    ([0.60, 0.70, 0.45, 0.45], 3),   # more than 0.2 below the best: the absolute rule, as before
])
def test_the_guard_catches_a_collapse_from_a_low_peak_on_eval_data(accuracies, stop_at, monkeypatch):
    import fastsat.evaluate

    scripted_accuracies = iter(accuracies)

    def scripted(model, data, **kw):
        return {"n": 16, "clean_acc": 0.9, "alignment": 1.0, "cosine": 0.1,
                "attacks": {"pgd": [{"eps": 8 / 255, "acc": next(scripted_accuracies)}]}}

    monkeypatch.setattr(fastsat.evaluate, "evaluate", scripted)
    result = T.fit(tiny_model(), train, recipe="fast", **{**FIT, "epochs": 4, "recipe_options": None})
    if stop_at is None:
        assert result.stopped is None and len(result.history) == 4
    else:
        assert len(result.history) == stop_at and "fell from" in result.stopped and "restored epoch 2" in result.stopped


def _scripted_guard(monkeypatch, pgd, fgsm):
    rows = iter(zip(pgd, fgsm))
    monkeypatch.setattr(T.Trainer, "check_overfitting", lambda self: dict(zip(("train_pgd_acc", "train_fgsm_acc"), next(rows))))


@pytest.mark.parametrize("recipe", ["fast", "nfgsm", "gradalign"])
def test_the_guard_stops_a_collapse_without_eval_data_and_restores_the_best_epoch(recipe, tmp_path, monkeypatch, caplog):
    # The guard's training-batch accuracies: PGD peaks at epoch 2, then falls by 0.3 while FGSM rises
    # (catastrophic overfitting's signature): stop at epoch 3 with epoch 2's weights back.
    import logging

    _scripted_guard(monkeypatch, pgd=[0.30, 0.40, 0.10, 0.10], fgsm=[0.40, 0.45, 0.80, 0.80])
    model = tiny_model()
    fit = {**FIT, "epochs": 4, "recipe_options": None, "eval_data": None}
    with caplog.at_level(logging.WARNING, logger="fastsat.train"):
        result = T.fit(model, train, recipe=recipe, out_dir=tmp_path, **fit)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert "catastrophic overfitting" in result.stopped and "FGSM accuracy rose from 0.450 to 0.800" in result.stopped
    assert any("restored epoch 2's weights" in r.getMessage() for r in caplog.records)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    _assert_same_weights(best["model"], _weights(model), "model after the guard's stop vs best epoch")


def test_the_guard_catches_a_low_peak_collapse_on_its_training_batch(monkeypatch):
    # PGD accuracy on the guard's batch peaks at 0.08 and falls to 0.01 while FGSM accuracy rises:
    # no 0.2 drop is possible from there, the relative rule stops it.
    _scripted_guard(monkeypatch, pgd=[0.06, 0.08, 0.01, 0.01], fgsm=[0.20, 0.30, 0.70, 0.70])
    result = T.fit(tiny_model(), train, recipe="fast", **{**FIT, "epochs": 4, "recipe_options": None, "eval_data": None})
    assert len(result.history) == 3 and "from 0.080 (epoch 2) to 0.010" in result.stopped


def test_the_guard_does_not_stop_when_single_step_accuracy_falls_too(monkeypatch):
    # PGD and FGSM accuracy falling together is not the collapse (a diverging run, say): no stop. Nor
    # does anything stop with early_stop_drop=None (the guard is off: no training-batch metrics).
    _scripted_guard(monkeypatch, pgd=[0.40, 0.10, 0.10], fgsm=[0.50, 0.20, 0.20])
    result = T.fit(tiny_model(), train, recipe="fast", **{**FIT, "recipe_options": None, "eval_data": None})
    assert result.stopped is None and len(result.history) == 3
    monkeypatch.undo()
    result = T.fit(tiny_model(), train, recipe="fast", early_stop_drop=None, **{**FIT, "recipe_options": None, "eval_data": None})
    assert result.stopped is None and "train_pgd_acc" not in result.history[-1]


def test_the_guard_measures_pgd_and_fgsm_accuracy_on_the_first_training_samples():
    from fastsat.attacks import FGSM, PGD

    config = T.TrainConfig(recipe="fast", epochs=1, batch_size=16, eval_steps=3, progress=False)
    model = tiny_model()
    trainer = T.Trainer(model, train, config)
    trainer.restore()
    torch.manual_seed(9)
    got = trainer.check_overfitting()
    assert model.training, "the guard left the model in eval mode"
    x, y = train.images[:16].float() / 255, train.labels[:16]
    assert torch.equal(trainer.guard_batch[0], x) and torch.equal(trainer.guard_batch[1], y)  # in order, unaugmented
    torch.manual_seed(9)
    model.eval()
    x_pgd = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3).perturb(x, y)
    x_fgsm = FGSM(model, eps=8 / 255).perturb(x, y)
    with torch.no_grad():
        clean, pgd, fgsm = ((model(z).argmax(1) == y) for z in (x, x_pgd, x_fgsm))
    assert got == {"train_pgd_acc": (clean & pgd).float().mean().item(), "train_fgsm_acc": (clean & fgsm).float().mean().item()}


def test_the_guard_leaves_a_user_loaders_shuffling_alone():
    # Drawing the fixed batch from a shuffling DataLoader must not move its generator: the epoch's
    # order is the one a run without the guard sees.
    x, y = train.images.float() / 255, train.labels
    orders = []
    for drop in (None, 0.2):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                             generator=torch.Generator())
        seen = []
        trainer = T.Trainer(tiny_model(), loader, T.TrainConfig(recipe="fast", epochs=2, batch_size=16,
                                                                 early_stop_drop=drop, progress=False))
        trainer.train_step = lambda batch, epoch, seen=seen, real=trainer.train_step: (
            seen.append(batch["label"].clone()) or real(batch, epoch))
        trainer.fit()
        orders.append(torch.cat(seen))
    assert torch.equal(orders[0], orders[1])


def test_ema_best_checkpoint_holds_the_evaluated_weights(tmp_path, monkeypatch):
    # With EMA the averaged weights are evaluated, so best.pt (and an early stop's restore) must hold
    # those, not the raw weights whose robustness was never measured.
    import fastsat.evaluate

    accuracies = iter([0.30, 0.40, 0.05])
    evaluated = []

    def scripted(model, data, **kw):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"n": 16, "clean_acc": 0.5, "alignment": 1.0, "cosine": 0.1,
                "attacks": {"pgd": [{"eps": 8 / 255, "acc": next(accuracies), "last_iterate_alignment": 1.0,
                                     "last_iterate_cosine": 0.1}]}}

    monkeypatch.setattr(fastsat.evaluate, "evaluate", scripted)
    model = tiny_model()
    result = T.fit(model, train, recipe="fast", out_dir=tmp_path, ema=0.5, **{**FIT, "recipe_options": None})
    assert result.stopped is not None and len(evaluated) == 3
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    _assert_same_weights(evaluated[1], best["model"], "best.pt vs the EMA weights evaluated at epoch 2")
    _assert_same_weights(evaluated[1], _weights(model), "model after early stop vs the EMA weights evaluated at epoch 2")


def test_a_format_1_checkpoint_still_resumes(tmp_path):
    # Checkpoints written before TrainConfig (format 1) recorded fewer settings, Fast's early_stop among
    # the recipe options and no clip. Converted back to that form, one must resume bit-exactly.
    options = {k: v for k, v in FIT.items() if k != "recipe_options"}
    full_model = tiny_model()
    full = T.fit(full_model, train, recipe="fast", **options)

    class CrashFast(T.Fast):
        def train_step(self, model, batch, optimizer, *, epoch=0, **kw):
            if epoch == 1:
                raise KeyboardInterrupt
            return super().train_step(model, batch, optimizer, epoch=epoch, **kw)

    with pytest.raises(KeyboardInterrupt):
        T.fit(tiny_model(), train, recipe=CrashFast(), out_dir=tmp_path, **options)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    old = {k: state["config"][k] for k in ("recipe", "epochs", "optimizer", "lr", "schedule", "precision", "seed",
                                           "steps_per_epoch", "ema")}
    old["recipe_options"] = {"early_stop": True, **{k: v for k, v in state["config"]["recipe_options"].items() if k != "clip"}}
    atomic_save({**state, "format": 1, "config": old}, path)
    resumed_model = tiny_model()
    resumed = T.fit(resumed_model, train, recipe="fast", out_dir=tmp_path, resume=True, **options)
    _assert_same_weights(_weights(full_model), _weights(resumed_model), "resumed from format 1 vs uninterrupted")
    assert _strip_times(resumed.history) == _strip_times(full.history)
    atomic_save({**state, "format": 3}, path)
    with pytest.raises(ValueError, match="format 3"):
        T.fit(tiny_model(), train, recipe="fast", out_dir=tmp_path, resume=True, **options)


def test_the_trained_module_may_differ_from_the_saved_one(tmp_path):
    # Distributed training wraps the model (DDP) for the steps and saves the bare module: the Trainer
    # keeps the two apart (train_model vs model), so a wrapper never leaks into the checkpoint.
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, x):
            self.calls += 1
            return self.module(x)

    model = tiny_model()
    config = T.TrainConfig(recipe="standard", epochs=1, batch_size=16, out_dir=str(tmp_path), progress=False)
    trainer = T.Trainer(model, train, config)
    trainer.train_model = Wrapper(model)
    trainer.fit()
    assert trainer.train_model.calls == trainer.steps_per_epoch
    assert set(load_checkpoint(tmp_path / "checkpoint.pt")["model"]) == set(model.state_dict())


def test_the_epoch_record_holds_the_clean_input_alignment(monkeypatch):
    # evaluate() reports Etmann's alignment at the clean input (top level) apart from the attack's
    # last-iterate statistics; the trainer logs the former.
    import fastsat.evaluate

    def scripted(model, data, **kw):
        return {"n": 16, "clean_acc": 0.5, "alignment": 0.25, "cosine": 0.125,
                "attacks": {"pgd": [{"eps": 8 / 255, "acc": 0.3, "last_iterate_alignment": 0.75, "last_iterate_cosine": 0.5}]}}

    monkeypatch.setattr(fastsat.evaluate, "evaluate", scripted)
    result = T.fit(tiny_model(), train, recipe="standard", **{**FIT, "epochs": 1, "recipe_options": None})
    assert {k: result.history[0][k] for k in ("clean_acc", "robust_acc", "alignment", "cosine")} == {
        "clean_acc": 0.5, "robust_acc": 0.3, "alignment": 0.25, "cosine": 0.125}


def test_data_without_the_recipes_batch_entries_is_refused_before_training():
    model = tiny_model()
    before = _weights(model)
    xs, ys = train.images.float() / 255, train.labels
    with pytest.raises(ValueError, match=r"train_data: recipe 'sat' reads .*'box'"):
        T.fit(model, torch.utils.data.TensorDataset(xs, ys), recipe="sat", epochs=1, progress=False)
    _assert_same_weights(before, _weights(model), "weights after the refused run")


def test_num_workers_decode_file_data_without_changing_the_run(tmp_path):
    """File data is decoded by `num_workers` loader processes; per-sample seeding makes the run's
    weights independent of how many there are."""
    from PIL import Image

    from fastsat.data import image_folder

    gen = torch.Generator().manual_seed(3)
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(6):
            pixels = (torch.rand(12, 12, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    files = image_folder(tmp_path, size=12)
    options = {"recipe": "standard", "epochs": 2, "batch_size": 8, "lr": 0.05, "progress": False}
    runs = {}
    for workers in (0, 2):
        model = tiny_model()
        trainer = T.Trainer(model, files, T.TrainConfig(num_workers=workers, **options))
        assert getattr(trainer.loader, "num_workers", 0) == workers
        trainer.fit()
        runs[workers] = _weights(model)
    _assert_same_weights(runs[0], runs[2], "0 vs 2 loader workers")


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_default(tmp_path):
    # pgd gained awp_gamma (default 0: what older runs ran with); their checkpoints lack it.
    options = {**{k: v for k, v in FIT.items() if k != "recipe_options"}, "epochs": 1}
    T.fit(tiny_model(), train, recipe="pgd", recipe_options={"steps": 1}, out_dir=tmp_path, **options)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    older = {k: v for k, v in state["config"]["recipe_options"].items() if k != "awp_gamma"}
    atomic_save({**state, "config": {**state["config"], "recipe_options": older}}, path)
    resumed = T.fit(tiny_model(), train, recipe="pgd", recipe_options={"steps": 1}, out_dir=tmp_path, resume=True,
                    **options)
    assert [row["epoch"] for row in resumed.history] == [1]
    with pytest.raises(ValueError, match=r"different settings \['recipe_options'\]"):  # recorded options still count
        T.fit(tiny_model(), train, recipe="pgd", recipe_options={"steps": 2}, out_dir=tmp_path, resume=True, **options)
