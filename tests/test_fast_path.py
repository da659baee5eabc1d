"""The fast training path (issue 8): sync-free steps, NaN steps skipped on the device, the compiled
step and its fallback, the device defaults. Tests with ``cuda`` in their names need a GPU
(scripts/gpu_check.sh selects them with ``-k cuda``); they are skipped here."""

import logging

import pytest
import torch
from _compile import RecordingBackend, needs_traced_autograd
from _host_reads import HostReads
from _models import tiny_cnn
from torch import nn

import fastsat.train as T
from fastsat.attacks import base as attack_base
from fastsat.data import shapes
from fastsat.train import trainer as trainer_module
from fastsat.train.checkpoint import load_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


DATA = shapes(48, size=12, num_classes=3, seed=0, cache_dir=False)
# Cheap settings of the recipes whose defaults are slow (steps, replays); the rest take their defaults.
CHEAP = {"pgd": {"steps": 2}, "trades": {"steps": 2}, "free": {"replays": 2}, "sat+pgd": {"steps": 2},
         "sat+trades": {"steps": 2}, "mart": {"steps": 2}}
# Every recipe, and the options that change its step's code path (AWP's weight perturbation).
STEPS = [(name, CHEAP.get(name, {})) for name in sorted(T.RECIPES)] + [
    (name, {**CHEAP[name], "awp_gamma": 5e-3}) for name in ("pgd", "trades")]


@pytest.mark.parametrize("name, options", STEPS, ids=[f"{n}-awp" if "awp_gamma" in o else n for n, o in STEPS])
def test_a_steady_state_epoch_reads_the_device_at_most_four_times(name, options):
    # "Steady state": the second epoch, after its first batch (which the trainer checks on the host
    # with every check on: input range, labels, boxes). From there to the epoch's record, logging
    # included, a step must not wait for the device; the epoch-end read of the sums is one.
    config = T.TrainConfig(recipe=name, recipe_options=options, epochs=2, batch_size=8, progress=False,
                           ema=0.9, early_stop_drop=None)
    trainer = T.Trainer(tiny_cnn(), DATA, config)
    trainer.restore()
    trainer.train_epoch(0)
    reads = HostReads(armed=False)
    real_step = trainer.train_step

    def step(batch, epoch):
        out = real_step(batch, epoch)
        reads.armed = True  # from the end of the first (checked) batch on
        return out

    trainer.train_step = step
    with reads:
        record = trainer.train_epoch(1)
    assert trainer.steps_per_epoch == 6 and record["train_loss"] > 0
    print(f"{name}: {reads.count} host reads")
    # The budget is 4 per epoch; the design makes exactly one (the epoch-end read of the sums),
    # so any new read on the hot path fails here.
    assert reads.count <= 1, f"{name}: {reads.count} host reads in a steady-state epoch of 5 steps"


def test_the_sync_counter_sees_a_sync_per_step():
    # The counter can fail: without no_host_checks() every attack checks its input range (a sync).
    config = T.TrainConfig(recipe="pgd", recipe_options={"steps": 2}, epochs=1, batch_size=8, progress=False)
    trainer = T.Trainer(tiny_cnn(), DATA, config)
    trainer.restore()
    batch = next(iter(trainer.loader))
    with HostReads() as reads:
        trainer.train_step(batch, 0)
    assert reads.count >= 1


@pytest.mark.parametrize("read, name", [
    (lambda x: x.sum().item(), "aten::_local_scalar_dense"),
    (lambda x: (x > 0).nonzero(), "aten::nonzero"),
    (lambda x: x[x > 0], "aten::index.Tensor"),  # a boolean mask: a nonzero inside the op
    (lambda x: x.masked_select(x > 0), "aten::masked_select"),
    (lambda x: x.unique(), "aten::_unique2"),
    (lambda x: x.tolist(), "tolist"),
])
def test_the_sync_counter_sees_value_reads_and_value_dependent_sizes(read, name):
    x = torch.randn(8)
    with HostReads() as reads:
        x[torch.tensor([0, 2])]  # an integer index: no read
        read(x)
    assert reads.reads == [name]


class NaNAt(T.Standard):
    """standard, with a NaN loss at one batch (epoch 1 — the second —, batch 2)."""

    calls = 0

    def loss(self, model, batch, *, epoch=0):
        out = super().loss(model, batch, epoch=epoch)
        NaNAt.calls += 1
        return out._replace(loss=out.loss * float("nan")) if (epoch, NaNAt.calls) == (1, 9) else out


def test_a_nan_loss_skips_its_update_on_the_device_and_stops_at_the_epoch_end(tmp_path):
    NaNAt.calls = 0
    model = tiny_cnn()
    config = T.TrainConfig(recipe="standard", epochs=3, batch_size=8, lr=0.05, out_dir=str(tmp_path), progress=False)
    trainer = T.Trainer(model, DATA, config, recipe=NaNAt())
    real_step = trainer.train_step
    around = []

    def step(batch, epoch):
        before = [p.detach().clone() for p in model.parameters()]
        out = real_step(batch, epoch)
        around.append((before, [p.detach().clone() for p in model.parameters()], bool(torch.isfinite(out.loss))))
        return out

    trainer.train_step = step
    with pytest.raises(T.NonFiniteLossError, match=r"in epoch 2, batch 2 \(1 steps.*checkpoint.*after epoch 1\) is intact"):
        trainer.fit()
    # The run went on to the end of the epoch (12 steps), then stopped before checkpointing it.
    assert len(around) == 12
    bad = [i for i, (_, _, finite) in enumerate(around) if not finite]
    assert bad == [8]
    before, after, _ = around[8]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the NaN step changed the weights"
    assert not all(torch.equal(a, b) for a, b in zip(*around[9][:2])), "the steps after the NaN one were not taken"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_step_guard_skips_a_non_finite_loss_even_with_finite_gradients():
    # loss = inf·(nothing reaching the weights) + CE: the weights' gradients are finite, yet the
    # step must not be taken (the scaled loss is multiplied by NaN).
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    guard = T.StepGuard("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])) + torch.tensor(float("inf"))
    opt.zero_grad()
    guard.scale(loss).backward()
    guard.step(opt)
    guard.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(guard.skipped) == 1


@pytest.mark.parametrize("name", ["pgd", "sat"])
def test_a_compiled_epoch_gives_the_eager_losses(name):
    # The same seeds, the same batches: torch.compile (inductor on the CPU) may reorder float
    # sums, so the losses agree to 1e-4 relative, not bitwise.
    losses = {}
    for compiled in (False, True):
        config = T.TrainConfig(recipe=name, recipe_options=CHEAP.get(name, {}), epochs=1, batch_size=16,
                               compile=compiled, progress=False)
        trainer = T.Trainer(tiny_cnn(), DATA, config)
        trainer.restore()
        steps = []
        trainer.train_step = _recording(trainer.train_step, steps)
        trainer.train_epoch(0)
        assert (trainer.train_model is trainer.eager_model) is not compiled
        if compiled and name == "pgd" and hasattr(torch._dynamo.config, "trace_autograd_ops"):
            assert trainer.train_model in attack_base._COMPILED_STEPS  # the attack's steps ran compiled whole
        losses[compiled] = torch.tensor(steps)
    assert torch.allclose(losses[True], losses[False], rtol=1e-4, atol=1e-6), losses


@pytest.fixture
def fresh_dynamo():
    """Dynamo compiles a code object at most 8 times (its recompile limit): the compile tests
    before this one must not use up the attack step's."""
    torch._dynamo.reset()


@pytest.mark.parametrize("attack_name, backend, mode", [
    ("pgd", "cpp", "eval"), ("pgd", "torch", "train"), ("pgd", "triton", "eval"), ("trades", "cpp", "train"),
])
@needs_traced_autograd
def test_a_compiled_models_attack_step_is_one_graph_with_the_fused_step_inside(attack_name, backend, mode, fresh_dynamo):
    # Forward, input gradient (autograd.grad, traced) and the fused pgd_step in one graph, the same
    # graph for every step: one graph in all, no break (fullgraph). A recording backend runs the
    # traced graph eagerly, so the result is the eager attack's bit for bit — batch-norm statistics
    # updated in "train" mode included.
    from fastsat import ops
    from fastsat.attacks import PGD, TradesAttack

    if not ops.available_backends()[backend]:
        pytest.skip(f"backend {backend} not available")
    recording = RecordingBackend()
    graphs = recording.graphs
    make = {"pgd": lambda m: PGD(m, steps=3, mode=mode, backend=backend),
            "trades": lambda m: TradesAttack(m, steps=3, mode=mode, backend=backend)}[attack_name]
    # Triton runs on CUDA tensors where there is a GPU, under its interpreter on the CPU elsewhere.
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x, y = (DATA.images[:6].float() / 255).to(device), DATA.labels[:6].to(device)
    models, results = {}, {}
    for compiled in (False, True):
        model = models[compiled] = tiny_cnn().to(device)
        attacked = torch.compile(model, backend=recording, fullgraph=True) if compiled else model
        torch.manual_seed(1)
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):  # bitwise on a GPU too
            results[compiled] = make(attacked).perturb(x, y)
    assert torch.equal(results[True], results[False])
    assert torch.equal(models[True][1].running_mean, models[False][1].running_mean)
    assert not torch.equal(results[True], x)
    steps = [graph.code for graph in graphs if "autograd" in graph.code]
    clean_forwards = int(attack_name == "trades")  # TRADES' clean logits: the compiled model's own graph
    assert len(steps) == 1 and len(graphs) == 1 + clean_forwards, f"{len(graphs)} graphs: a break or a recompile"
    code = steps[0]
    assert "conv2d" in code, code
    assert ("fastsat" in code) is (backend != "torch"), code  # the kernel op; the reference inlines torch ops


@needs_traced_autograd
def test_the_compiled_attack_step_is_the_same_inside_the_trainers_unchecked_batches(fresh_dynamo):
    # The trainer checks an epoch's first batch and runs the others inside no_host_checks(), one
    # level deeper than perturb's own: the compiled step must not depend on that depth.
    from fastsat._checks import no_host_checks
    from fastsat.attacks import PGD

    recording = RecordingBackend()
    graphs = recording.graphs
    attack = PGD(torch.compile(tiny_cnn(), backend=recording), steps=2)
    x, y = DATA.images[:6].float() / 255, DATA.labels[:6]
    attack.perturb(x, y)
    with no_host_checks():
        attack.perturb(x, y)
    assert len(graphs) == 1, f"{len(graphs)} graphs"


@needs_traced_autograd
def test_a_new_radius_recompiles_the_compiled_attack_step_with_the_new_constant(fresh_dynamo):
    # An ε warm-up changes ε every epoch. Dynamo would turn a float that changes into a symbol,
    # which the ops' argument checks cannot take; the step keeps floats as constants instead, and
    # may compile more often than dynamo's default limit allows (fullgraph: that would raise).
    from fastsat.attacks import PGD

    model = tiny_cnn().eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, y = DATA.images[:6].float() / 255, DATA.labels[:6]
    for eps in [k / 255 for k in range(1, 11)]:  # more radii than dynamo's default recompile limit (8)
        runs = []
        for attacked in (compiled, model):
            torch.manual_seed(1)
            runs.append(PGD(attacked, eps=eps, step_size=eps / 2, steps=2).perturb(x, y))
        assert torch.equal(runs[0], runs[1])
        assert (runs[0] - x).abs().max() == pytest.approx(eps, abs=1e-6)  # float32 x: ulp 6e-8 near 1


def _recording(step, into):
    def run(batch, epoch):
        out = step(batch, epoch)
        into.append(out.loss.item())
        return out
    return run


def test_a_failing_compile_falls_back_to_eager_and_says_so_once(monkeypatch, caplog):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(trainer_module, "_compile", lambda module, device: torch.compile(module, backend=failing_backend))
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="fastsat.train"):
        result = T.fit(tiny_cnn(), DATA, recipe="pgd", recipe_options={"steps": 2}, epochs=2, batch_size=16,
                       compile=True, progress=False)
    assert len(result.history) == 2
    messages = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(messages) == 1 and "no compiler here" in messages[0], messages


def test_device_defaults_are_fp32_and_eager_on_the_cpu_and_fast_on_cuda():
    auto = T.TrainConfig()
    assert trainer_module.device_defaults(auto, torch.device("cpu")) == {
        "precision": "fp32", "channels_last": False, "compile": False}
    assert trainer_module.device_defaults(auto, torch.device("cuda")) == {
        "precision": "bf16", "channels_last": True, "compile": True}
    chosen = T.TrainConfig(precision="fp32", channels_last=False, compile=False)
    assert trainer_module.device_defaults(chosen, torch.device("cuda")) == {
        "precision": "fp32", "channels_last": False, "compile": False}
    trainer = T.Trainer(tiny_cnn(), DATA, T.TrainConfig(epochs=1, batch_size=8, progress=False))
    assert (trainer.precision, trainer.channels_last, trainer.compile) == ("fp32", False, False)
    assert trainer.run_config["precision"] == "fp32"  # the resolved value is what a resume compares
    assert all(group.get("fused") for group in trainer.optimizer.param_groups)


def test_training_attacks_leave_the_model_as_found_without_freezing_it():
    # perturb() keeps requires_grad (autocast's weight cache) and writes no parameter .grad.
    from fastsat.attacks import PGD

    model = tiny_cnn().train()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.requires_grad))
    x, y = DATA.images[:4].float() / 255, DATA.labels[:4]
    PGD(model, steps=2).perturb(x, y)
    assert seen == [True, True]
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_padded_crop_does_not_read_offsets_back():
    from fastsat.data import Augment

    batch = {"image": torch.rand(4, 3, 8, 8), "label": torch.zeros(4, dtype=torch.long),
             "box": torch.tensor([[1, 1, 5, 5]] * 4)}
    with HostReads() as reads:
        Augment(padding=2)(batch, torch.Generator().manual_seed(0))
    assert reads.count == 0


# --- CUDA only (scripts/gpu_check.sh: -k cuda) ---------------------------------------------------

def _cuda_trainer(name="pgd", **options):
    config = T.TrainConfig(recipe=name, recipe_options=CHEAP.get(name, {}), epochs=2, batch_size=16, progress=False,
                           **options)
    return T.Trainer(tiny_cnn().cuda(), DATA, config)


@cuda
@pytest.mark.parametrize("name", ["pgd", "sat", "standard"])
def test_cuda_steady_state_steps_do_not_sync(name):
    from fastsat._checks import no_host_checks

    trainer = _cuda_trainer(name)
    trainer.restore()
    trainer.train_epoch(0)  # compiles, captures and checks
    batches = list(trainer.loader)[1:-1] or list(trainer.loader)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with no_host_checks():
            for batch in batches:
                trainer.train_step(batch, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda
def test_cuda_compiled_step_is_captured_as_cuda_graphs():
    from torch._dynamo.utils import counters

    counters.clear()
    trainer = _cuda_trainer("pgd")
    assert trainer.compile and trainer.precision == "bf16" and trainer.channels_last
    trainer.restore()
    trainer.train_epoch(0)
    assert trainer.train_model is not trainer.eager_model, "compiling failed and the run fell back to eager"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@cuda
@needs_traced_autograd
def test_cuda_compiled_attack_step_replays_as_a_cuda_graph(fresh_dynamo):
    # The whole step (forward, traced input gradient, fused pgd_step) under "reduce-overhead":
    # captured without a skip, and the attack it gives is the eager attack's up to the signs of
    # gradient entries that compiled float sums move across zero.
    from torch._dynamo.utils import counters

    from fastsat.attacks import PGD

    counters.clear()
    model = tiny_cnn().cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead")
    x, y = (DATA.images[:16].float() / 255).cuda(), DATA.labels[:16].cuda()
    runs = []
    for attacked in (compiled, model):
        torch.manual_seed(1)
        for _ in range(3):  # warm-up, record, replay
            torch.compiler.cudagraph_mark_step_begin()
            result = PGD(attacked, steps=5).perturb(x, y)
        runs.append(result.clone())
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert compiled in attack_base._COMPILED_STEPS
    assert (runs[0] != runs[1]).float().mean() < 1e-3
