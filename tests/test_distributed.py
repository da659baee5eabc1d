"""Distributed data parallel training with 2 CPU processes over gloo, launched by torchrun
(``python -m torch.distributed.run --standalone``: localhost, a free port), each launch bounded by
a timeout. One launch runs every 2-process scenario of the module (a start costs seconds)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _compile import RecordingBackend, needs_traced_autograd

import fastsat.train as T
from fastsat._io import LOCK_NAME
from fastsat._random import mix_seed
from fastsat.train import distributed
from fastsat.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# Built identically by the 2-process run and the single-process references below.
SETUP = textwrap.dedent(
    """
    import torch
    from torch import nn
    from fastsat import models
    from fastsat.data import shapes

    def madry():  # no batch norm: one process and two see the same network function
        torch.manual_seed(0)
        return models.create("madrycnn", num_classes=3, width=4, hidden=16)

    def with_batchnorm():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))

    train = shapes(64, size=12, num_classes=3, seed=0, cache_dir=False)
    # A deterministic recipe (no random start) and no augmentation: the only difference between one
    # process and two is where the gradient's sum is split.
    SAME = dict(recipe="standard", epochs=2, batch_size=16, lr=0.05, augment=False, progress=False)
    # AWP (a large γ): its weight perturbation must come from the global batch's gradient. The attack's
    # radius is tiny, so that the ranks' own random starts change nothing measurable.
    AWP = dict(SAME, recipe="pgd", recipe_options={"steps": 1, "eps": 1e-7, "step_size": 1e-7, "awp_gamma": 0.1})
    """
)

WORKER = SETUP + textwrap.dedent(
    """
    import json, os, sys
    from collections import Counter
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    import fastsat.attacks
    import fastsat.train as T
    import fastsat.train.checkpoint as checkpoint_module  # it writes the run folder's files
    from fastsat.train import distributed

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    report = {}

    # 1. Same global batch as one process; count the checkpoint writes of each rank.
    saves = Counter()
    real_save = checkpoint_module.atomic_save
    def counting_save(obj, path):
        saves[Path(path).name] += 1
        return real_save(obj, path)
    checkpoint_module.atomic_save = counting_save
    model = madry()
    result = T.fit(model, train, out_dir=str(out / "same"), **SAME)
    report["saves"] = dict(saves)
    report["same_checkpoint"] = str(result.checkpoint)
    report["same_history"] = result.history
    checkpoint_module.atomic_save = real_save

    # 2. Resume 2 -> 1: two processes stop after epoch 1 (its checkpoint written), one process goes on.
    class Stop(Exception):
        pass

    class StopAfterFirstEpoch(T.Trainer):
        def log(self, record):
            super().log(record)
            if record["epoch"] == 1:
                raise Stop

    try:
        StopAfterFirstEpoch(madry(), train, T.TrainConfig(out_dir=str(out / "resume"), **SAME)).fit()
    except Stop:
        pass

    # 3. What the attack's forward passes communicate: counted while PGD.perturb runs, and overall.
    counts, during = Counter(), Counter()
    def count(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce_scatter", "barrier",
                 "_broadcast_coalesced"):
        setattr(dist, name, count(name, getattr(dist, name)))
    DistributedDataParallel._distributed_broadcast_coalesced = count(
        "buffer_broadcast", DistributedDataParallel._distributed_broadcast_coalesced)
    real_perturb = fastsat.attacks.PGD.perturb
    def watched_perturb(self, *args, **kwargs):
        before = Counter(counts)
        try:
            return real_perturb(self, *args, **kwargs)
        finally:
            during.update(Counter(counts) - before)
            during["attacks"] += 1
    fastsat.attacks.PGD.perturb = watched_perturb

    config = T.TrainConfig(recipe="pgd", recipe_options={"steps": 2, "attack_mode": "train"}, epochs=1,
                           batch_size=16, augment=False, progress=False)
    trainer = T.Trainer(with_batchnorm(), train, config)
    assert isinstance(trainer.train_model, DistributedDataParallel)
    def gradient_allreduce(state, bucket):
        counts["gradient_allreduce"] += 1
        return default_hooks.allreduce_hook(state, bucket)
    trainer.train_model.register_comm_hook(None, gradient_allreduce)
    trainer.train_model.register_forward_pre_hook(lambda module, args: counts.update(["ddp_forward"]))
    trainer.model.register_forward_pre_hook(lambda module, args: counts.update(["module_forward"]))
    trainer.fit()
    report["counts"], report["during_attack"] = dict(counts), dict(during)
    report["steps_per_epoch"] = trainer.steps_per_epoch

    # 4. Rank shares that differ by a sample (65 = 33 + 32): both ranks run the same number of steps.
    odd = T.Trainer(madry(), shapes(65, size=12, num_classes=3, seed=0, cache_dir=False), T.TrainConfig(**SAME))
    odd.fit()
    report["odd"] = {"batches": len(odd.loader), "steps": odd.steps_per_epoch}

    # 5. AWP: the same global batch as one process.
    T.fit(madry(), train, out_dir=str(out / "awp"), **AWP)

    # 5b. The catastrophic-overfitting guard: each rank attacks its share of the fixed batch, the counts summed.
    guarded = T.fit(madry(), train, **dict(SAME, recipe="fast", early_stop_drop=0.2))
    report["guard"] = [{k: row[k] for k in ("train_pgd_acc", "train_fgsm_acc")} for row in guarded.history]

    # 6. This rank's random streams in an epoch.
    distributed.seed_epoch(7, 3)
    report["stream"] = torch.rand(4).tolist()

    (out / f"rank{rank}.json").write_text(json.dumps(report))
    del trainer, odd  # no DDP module may outlive the group (distributed.teardown says why)
    distributed.teardown()
    """
)

namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102 — the same source the 2-process run executes
madry, train, SAME, AWP = namespace["madry"], namespace["train"], namespace["SAME"], namespace["AWP"]


def _torchrun(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run WORKER on 2 ranks once; the two ranks' reports and the run directory."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    _torchrun(str(script), str(out))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], out


def _single_process_reference(settings=SAME):
    model = madry()
    T.fit(model, train, **settings)
    return model.state_dict()


def _assert_close(actual: dict, expected: dict, where: str) -> None:
    # Tolerance: float32 training of 8 steps; DDP averages the two ranks' mean gradients, i.e. sums
    # the same 16 per-sample terms in another order, so results differ by rounding (~1e-7 relative
    # per step, measured max 2e-7 absolute on these weights). A rank training on its half alone, or
    # gradients summed instead of averaged, moves the weights by ~1e-2.
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{where}, {k}: {m}")


def test_two_processes_train_as_one_with_the_same_global_batch(two_ranks):
    reports, out = two_ranks
    state = load_checkpoint(out / "same" / T.trainer.CHECKPOINT_NAME)
    assert state["world_size"] == 2 and state["epoch"] == 2
    _assert_close(state["model"], _single_process_reference(), "2 processes vs 1")
    # The epoch metrics are summed over both ranks: both report the same numbers.
    strip = [[{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in r["same_history"]]
             for r in reports]
    assert strip[0] == strip[1]


def test_awp_on_two_processes_perturbs_the_weights_as_one_process(two_ranks):
    # Each rank's own gradient would give each its own v (the half batch's): the weights would then
    # differ by ~1e-3 after 8 steps; averaged over the ranks, by rounding only.
    _, out = two_ranks
    state = load_checkpoint(out / "awp" / T.trainer.CHECKPOINT_NAME)
    _assert_close(state["model"], _single_process_reference(AWP), "AWP, 2 processes vs 1")


def test_the_overfitting_guard_decides_alike_on_every_rank(two_ranks):
    reports, _ = two_ranks
    assert len(reports[0]["guard"]) == 2 and reports[0]["guard"] == reports[1]["guard"]
    # Counts summed over the two shares of a 16-sample batch: multiples of 1/16.
    assert all((16 * v) == round(16 * v) for row in reports[0]["guard"] for v in row.values())


def test_exactly_one_process_writes_the_checkpoints(two_ranks):
    reports, out = two_ranks
    assert reports[0]["saves"] == {T.trainer.CHECKPOINT_NAME: 2}  # one per epoch
    assert reports[1]["saves"] == {}
    written = sorted(p.name for p in (out / "same").iterdir())
    assert written == [LOCK_NAME, "checkpoint.pt", "metrics.csv", "metrics.jsonl"]


def test_resume_from_two_processes_on_one(two_ranks, tmp_path):
    _, out = two_ranks
    run = out / "resume"
    assert load_checkpoint(run / T.trainer.CHECKPOINT_NAME)["world_size"] == 2
    model = madry()
    result = T.fit(model, train, out_dir=str(run), resume=True, **SAME)
    assert [row["epoch"] for row in result.history] == [1, 2]  # epoch 1 came from the two processes
    state = load_checkpoint(run / T.trainer.CHECKPOINT_NAME)
    assert state["world_size"] == 1 and state["epoch"] == 2
    _assert_close(model.state_dict(), _single_process_reference(), "2 processes then 1 vs 1 throughout")


def test_attack_forward_passes_do_not_communicate(two_ranks):
    reports, _ = two_ranks
    for rank, report in enumerate(reports):
        counts, during = report["counts"], report["during_attack"]
        steps = report["steps_per_epoch"]
        assert during["attacks"] == steps, rank
        # The attack ran 2 forward passes per batch on the module, none through DDP, and nothing
        # communicated meanwhile: no gradient bucket, no buffer broadcast, no collective at all.
        assert {k: v for k, v in during.items() if k != "attacks"} == {"module_forward": 2 * steps}, (rank, during)
        # Positive controls: the same counters see the training passes.
        assert counts["ddp_forward"] == steps, (rank, counts)
        # 3 per step, and the trainer's one look at the model's logit count (Trainer.audit_batch).
        assert counts["module_forward"] == 3 * steps + 1
        assert counts["gradient_allreduce"] >= steps and counts["buffer_broadcast"] >= 1, (rank, counts)


def test_ranks_agree_on_the_steps_per_epoch(two_ranks):
    reports, _ = two_ranks
    # 16 per step = 8 per rank: rank 0's 33 samples make 5 batches, rank 1's 32 make 4; both run 4
    # (a fifth step on rank 0 alone would wait forever for rank 1's gradients).
    assert [r["odd"] for r in reports] == [{"batches": 5, "steps": 4}, {"batches": 4, "steps": 4}]


def test_random_streams_differ_across_ranks_and_follow_the_seed(two_ranks):
    reports, _ = two_ranks
    streams = [report["stream"] for report in reports]
    assert streams[0] != streams[1]
    for rank, stream in enumerate(streams):
        assert stream == torch.rand(4, generator=torch.Generator().manual_seed(mix_seed(7, 3, rank))).tolist()


def test_single_process_is_unchanged_by_the_distributed_hooks():
    model = madry()
    trainer = T.Trainer(model, train, T.TrainConfig(**SAME))
    assert trainer.train_model is model and trainer.world_size == 1
    assert distributed.unwrap(model) is model


@needs_traced_autograd
def test_attacks_on_a_compiled_ddp_model_run_compiled_on_the_module_inside(tmp_path):
    # torch.compile(DDP(module)), as the trainer builds it under torchrun with compile on: the
    # attacks must not go through DDP, and must not fall back to the eager module either.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fastsat.attacks import PGD
    from fastsat.attacks import base as attack_base

    recording = RecordingBackend()
    torch._dynamo.reset()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = madry()
        wrapped = torch.compile(DistributedDataParallel(model), backend=recording)
        attacked = distributed.unwrap(wrapped)
        assert attacked._orig_mod is model and distributed.unwrap(wrapped) is attacked
        x, y = train.images[:4].float() / 255, train.labels[:4]
        torch.manual_seed(1)
        got = PGD(attacked, steps=2).perturb(x, y)
        torch.manual_seed(1)
        want = PGD(model, steps=2).perturb(x, y)
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, want)
    graphs = recording.graphs
    assert attacked in attack_base._COMPILED_STEPS and len(graphs) == 1 and "autograd" in graphs[0].code


def test_sync_batchnorm_is_refused_off_cuda():
    with pytest.raises(ValueError, match="sync_batchnorm"):
        T.Trainer(madry(), train, T.TrainConfig(sync_batchnorm=True, **SAME))


def test_the_global_batch_must_split_over_the_ranks(monkeypatch):
    monkeypatch.setattr(distributed._dist, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="batch_size"):
        T.Trainer(madry(), train, T.TrainConfig(**SAME))


def test_cli_trains_on_two_processes(tmp_path):
    out = tmp_path / "run"
    done = _torchrun("-m", "fastsat", "train", "--dataset", "shapes", "--n-train", "64", "--n-test", "16",
                     "--image-size", "12", "--num-classes", "3", "--model", "madrycnn", "--width", "4",
                     "--recipe", "fast", "--epochs", "1", "--batch-size", "16", "--eval-steps", "1", "--device", "cpu",
                     "--out-dir", str(out))
    assert done.stdout.count('"checkpoint"') == 1  # rank 0 alone prints the summary
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["world_size"] == 2 and state["epoch"] == 1
    assert (out / "config.yaml").is_file()


def test_torchrun_environment_is_read(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    assert distributed.setup("cpu") == torch.device("cpu")


def test_a_user_dataloaders_distributed_sampler_follows_the_epoch():
    seen = []

    class Sampler(torch.utils.data.DistributedSampler):
        def set_epoch(self, epoch):
            seen.append(epoch)
            super().set_epoch(epoch)

    images = torch.rand(16, 3, 12, 12)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(16) % 3)
    sampler = Sampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=0)
    batches = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    T.fit(madry(), batches, recipe="standard", epochs=3, progress=False)
    assert seen == [0, 1, 2]


def test_each_rank_augments_with_its_own_stream():
    from fastsat.data import dataset_loader as loader

    def stream(rank, world_size):
        batches = loader(train, batch_size=8, augment=True, seed=3, rank=rank, world_size=world_size)
        return torch.rand(6, generator=batches._next_epoch()[2])

    assert torch.equal(stream(0, 2), stream(0, 1))  # rank 0 keeps the single-process stream
    assert not torch.equal(stream(1, 2), stream(0, 2))
    assert torch.equal(stream(1, 2), stream(1, 2))  # and every stream follows the seed


FAILING_RANK = SETUP + textwrap.dedent(
    """
    import os, sys
    import fastsat.train as T
    from fastsat.train import distributed

    rank = int(os.environ["RANK"])

    class Batches:
        # Each rank's own 8-image batches; rank 1's data breaks in the middle of epoch 2.
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 4

        def __iter__(self):
            for index in range(4):
                if (rank, self.epoch, index) == (1, 1, 2):
                    raise ValueError("corrupt sample in batch 2 on rank 1")
                start = 32 * rank + 8 * index
                yield train.images[start:start + 8].float() / 255, train.labels[start:start + 8]

    try:  # as `fastsat train` runs it
        T.fit(madry(), Batches(), out_dir=sys.argv[1], **{**SAME, "epochs": 3})
    finally:
        distributed.teardown()
    """
)


def test_an_error_on_one_rank_stops_both_without_hanging(tmp_path):
    # Before the fix, rank 1 waited at teardown's barrier and rank 0 inside DDP's backward: both
    # hung forever and the error was never printed. Both ranks run here as plain processes (no
    # torchrun, which would stop rank 0 for us); the collective timeout (300 s) is longer than the
    # bound (90 s), so only leaving without the barrier passes. Ranks that outlive the bound are killed.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(FAILING_RANK)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", distributed.TIMEOUT_VARIABLE: "300"}
    ranks = [subprocess.Popen([sys.executable, str(script), str(run)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = []
    try:
        for proc in ranks:
            outputs.append(proc.communicate(timeout=90))
    except subprocess.TimeoutExpired:
        pytest.fail("a rank still ran 90 s after the start: the run hangs on rank 1's error")
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in ranks]
    assert all(code != 0 for code in codes), (codes, outputs)
    assert "corrupt sample in batch 2 on rank 1" in outputs[1][1]
    state = load_checkpoint(run / T.trainer.CHECKPOINT_NAME)  # the last checkpoint is intact (checksum verified)
    assert state["epoch"] == 1 and state["world_size"] == 2


def test_the_collective_timeout_is_configurable_and_checked(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv(distributed.TIMEOUT_VARIABLE, raising=False)
    assert distributed.timeout().total_seconds() == 600
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    distributed.setup("cpu")
    assert joined["timeout"].total_seconds() == 600 and joined["backend"] == "gloo"
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "45")
    assert distributed.timeout().total_seconds() == 45
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, bad)
        with pytest.raises(ValueError, match=rf"{distributed.TIMEOUT_VARIABLE}: expected a positive number of seconds, "
                                             rf"got '{bad}'"):
            distributed.timeout()


def test_teardown_skips_the_barrier_only_while_an_error_propagates_and_keeps_that_error(monkeypatch, caplog):
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(distributed._dist, "initialized", lambda: True)
    monkeypatch.setattr(distributed._dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(ValueError, match="rank 1's data"):
        try:
            raise ValueError("rank 1's data")
        finally:
            distributed.teardown()
    assert calls == ["destroy"]

    def broken():
        raise RuntimeError("connection reset")

    monkeypatch.setattr(dist, "destroy_process_group", broken)
    with pytest.raises(ValueError, match="rank 1's data"):  # not the RuntimeError of leaving the group
        try:
            raise ValueError("rank 1's data")
        finally:
            distributed.teardown()
    assert "RuntimeError: connection reset" in caplog.text
