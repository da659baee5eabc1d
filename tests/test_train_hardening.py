"""The trainer's answers to bad runs, files and data (issue 16, part A): the run-folder lock, the
sweep of a killed run's temporary files, the checkpoint checksum, resuming on other data, every
batch checked on the device, and clear errors instead of torch's."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastsat.train as T
from fastsat import _io
from fastsat._io import atomic_save
from fastsat.data import shapes
from fastsat.train.checkpoint import load_checkpoint

train = shapes(48, size=12, num_classes=3, seed=0, cache_dir=False)
test = shapes(16, size=12, num_classes=3, seed=1, cache_dir=False)
RUN = {"recipe": "standard", "epochs": 1, "batch_size": 16, "lr": 0.05, "progress": False}


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes))


class Stop(Exception):
    pass


class StopAfterEpoch1(T.Trainer):
    def log(self, record):
        super().log(record)
        raise Stop


def _first_of_two_epochs(out_dir, data=train, **options):
    """Run epoch 1 of a 2-epoch run into ``out_dir`` and stop, as a killed run would."""
    with pytest.raises(Stop):
        StopAfterEpoch1(tiny_model(), data, T.TrainConfig(out_dir=str(out_dir), **{**RUN, "epochs": 2}), **options).fit()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the run folder ------------------------------------------------------------------------------

HOLD = "import sys, time\nfrom fastsat._io import locked_folder\nwith locked_folder(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(60)"


def test_a_second_run_in_a_busy_out_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        model = tiny_model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"out_dir: {tmp_path} is in use by another fastsat run \(pid {holder.pid}"):
            T.fit(model, train, out_dir=tmp_path, **RUN)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the refused run trained"
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_killed_runs_lock_and_temporary_files_do_not_block_its_resume(tmp_path):
    _first_of_two_epochs(tmp_path)
    dead = _dead_pid()
    (tmp_path / _io.LOCK_NAME).write_text(f"{dead}\n")  # the lock file a killed run leaves (its flock is gone)
    litter = [tmp_path / f".checkpoint.pt.{dead}.tmp", tmp_path / f".checkpoint.pt.{dead}.x1y2z3.tmp"]
    for path in litter:
        path.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".metrics.csv.{os.getpid()}.abc.tmp"  # a running writer's: kept
    alive.write_bytes(b"")
    result = T.fit(tiny_model(), train, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert not any(path.exists() for path in litter) and alive.exists()


def test_an_out_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"out_dir: cannot write in {blocker / 'run'} .*expected a writable folder"):
        T.fit(model, train, out_dir=blocker / "run", **RUN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- checkpoint files ----------------------------------------------------------------------------

def _flip_weight_bytes(path, tensor: torch.Tensor) -> None:
    """Flip 8 bytes inside ``tensor``'s storage in the saved file (found by its bytes)."""
    raw = bytearray(path.read_bytes())
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(data)
    assert at >= 0 and raw.find(data, at + 1) < 0, "the tensor's bytes are not unique in the file"
    for i in range(at + 4, at + 12):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt"])
def test_flipped_bytes_in_the_weights_are_a_clear_error_naming_the_file(tmp_path, name):
    _first_of_two_epochs(tmp_path, eval_data=test)
    path = tmp_path / name
    saved = load_checkpoint(path)["model"]["5.weight"]
    _flip_weight_bytes(path, saved)
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["5.weight"], saved)  # the flip hit the weights
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt: its weights do not match the checksum"):
        load_checkpoint(path)
    if name == "checkpoint.pt":
        with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt"):
            T.fit(tiny_model(), train, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})


def test_a_checkpoint_without_a_checksum_still_resumes(tmp_path):
    _first_of_two_epochs(tmp_path)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert len(state.pop("checksum")) == 64
    atomic_save(state, path)  # as fastsat wrote it before checksums
    result = T.fit(tiny_model(), train, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_resuming_from_best_pt_or_a_bare_state_dict_says_what_the_file_is(tmp_path):
    _first_of_two_epochs(tmp_path, eval_data=test)
    best = tmp_path / "best.pt"
    with pytest.raises(ValueError, match=rf"resume: {best} is best.pt \(the best epoch's weights alone\); expected a "
                                         "checkpoint.pt"):
        T.fit(tiny_model(), train, out_dir=tmp_path / "next", resume=str(best), **{**RUN, "epochs": 2})
    bare = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), bare)
    with pytest.raises(ValueError, match=rf"checkpoint {bare} is a bare state dict \(9 tensors such as '0.weight'\); "
                                         "expected a file written by fastsat's trainer"):
        T.fit(tiny_model(), train, out_dir=tmp_path / "next", resume=str(bare), **{**RUN, "epochs": 2})
    other = tmp_path / "list.pt"
    torch.save([1, 2], other)
    with pytest.raises(ValueError, match=rf"checkpoint {other} holds list .*expected a file written by fastsat's trainer"):
        load_checkpoint(other)


def test_resuming_with_another_model_names_the_file_and_the_mismatching_weights(tmp_path):
    _first_of_two_epochs(tmp_path)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError, match=rf"checkpoint {path} does not fit the model \(shape saved vs model's: "
                                         r"5.weight \(3, 16\) vs \(4, 16\), 5.bias \(3,\) vs \(4,\)\); expected the "
                                         "architecture and class count"):
        T.fit(tiny_model(num_classes=4), train, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})
    without_batchnorm = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                      nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"\(missing: 3.weight, 3.bias; unexpected: 1.weight, 1.bias, 1.running_mean, "
                                         r"1.running_var, 1.num_batches_tracked, 5.weight ...\)"):
        T.fit(without_batchnorm, train, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})


# --- resuming on other data -----------------------------------------------------------------------

@pytest.mark.parametrize("other, named", [
    (shapes(48, size=12, num_classes=3, seed=5, cache_dir=False),
     r"train_data.sample_digest: '[0-9a-f]{64}' then, '[0-9a-f]{64}' now"),
    (shapes(48, size=16, num_classes=3, seed=0, cache_dir=False),
     (r"train_data.image_size: \[12, 12\] then, \[16, 16\] now; .*train_data.sample_shape: \[3, 12, 12\] then, "
      r"\[3, 16, 16\] now")),
])
def test_resuming_on_other_data_is_refused_naming_the_difference(tmp_path, other, named):
    _first_of_two_epochs(tmp_path)
    with pytest.raises(ValueError, match=rf"resume: {tmp_path / 'checkpoint.pt'} was written for other training data "
                                         rf"\(.*{named}"):
        T.fit(tiny_model(), other, out_dir=tmp_path, resume=True, **{**RUN, "epochs": 2})


def test_resuming_with_other_data_settings_names_the_setting_and_both_values(tmp_path):
    _first_of_two_epochs(tmp_path, data_settings={"dataset": "shapes", "data_seed": 0})
    assert load_checkpoint(tmp_path / "checkpoint.pt")["data"]["data_seed"] == 0
    with pytest.raises(ValueError, match=r"other training data \(data_seed: 0 then, 1 now\)"):
        T.fit(tiny_model(), train, out_dir=tmp_path, resume=True, data_settings={"dataset": "shapes", "data_seed": 1},
              **{**RUN, "epochs": 2})
    result = T.fit(tiny_model(), train, out_dir=tmp_path, resume=True, data_settings={"dataset": "shapes", "data_seed": 0},
                   **{**RUN, "epochs": 2})
    assert [row["epoch"] for row in result.history] == [1, 2]


# --- every batch checked on the device ------------------------------------------------------------

class Batches:
    """A user's loader of three 16-image batches (dicts with the shapes' boxes and masks, which SAT
    reads); ``spoil(epoch, index, x, y)`` may change one's images and labels."""

    def __init__(self, spoil=None, indices=(0, 1, 2)):
        self.epoch, self.spoil, self.indices = 0, spoil, indices

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        for index in self.indices:
            part = slice(16 * index, 16 * (index + 1))
            x, y = train.images[part].float() / 255, train.labels[part].clone()
            x, y = self.spoil(self.epoch, index, x, y) if self.spoil else (x, y)
            yield {"image": x, "label": y, "box": train.boxes[part], "mask": train.masks[part]}


def _bytes_in_batch_1(epoch, index, x, y):
    return (x * 255, y) if (epoch, index) == (1, 1) else (x, y)


# Cheap settings of the recipes whose defaults are slow; the rest take their defaults.
CHEAP = {"pgd": {"steps": 1}, "trades": {"steps": 1}, "free": {"replays": 2}, "sat+pgd": {"steps": 1},
         "sat+trades": {"steps": 1}}


@pytest.mark.parametrize("recipe", sorted(T.RECIPES))
def test_images_in_0_255_after_the_first_batch_stop_every_recipe_at_the_epoch_end(tmp_path, recipe):
    run = {**RUN, "recipe": recipe, "recipe_options": CHEAP.get(recipe, {}), "epochs": 3, "early_stop_drop": None}
    with pytest.raises(ValueError, match=r"train_data: invalid batches in epoch 2 \(the first: batch 1\): "
                                         r"1 with images outside the input box clip=\(0, 1\) or not finite .*not \[0, 255\]"
                                         r"\); their updates were skipped; training stopped, the last good checkpoint "
                                         r".*after epoch 1\) is intact"):
        T.fit(tiny_model(), Batches(_bytes_in_batch_1), out_dir=tmp_path, **run)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_bad_batchs_update_is_skipped_on_the_device(tmp_path):
    # Bytes in batch 1 give a finite loss: only the audit's refusal keeps the step from being taken.
    spoiled, reference = tiny_model(), tiny_model()
    run = {**RUN, "schedule": "constant"}
    with pytest.raises(ValueError, match=r"batch 1\): 1 with images outside the input box clip=\(0, 1\) "
                                         "or not finite"):
        T.fit(spoiled, Batches(lambda epoch, index, x, y: (x * 255 if index == 1 else x, y)), **run)
    trainer = T.Trainer(reference, Batches(indices=(0, 2)), T.TrainConfig(**run))
    trainer.fit()
    for (name, a), b in zip(spoiled.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name}: the bad batch changed the weights"


def test_a_nan_pixel_in_a_later_batch_is_named_as_such():
    def nan_pixel(epoch, index, x, y):
        if index == 2:
            x[0, 0, 0, 0] = float("nan")
        return x, y

    with pytest.raises(ValueError, match=r"invalid batches in epoch 1 \(the first: batch 2\): 1 with images outside "
                                         r"the input box clip=\(0, 1\) or not finite"):
        T.fit(tiny_model(), Batches(nan_pixel), **RUN)


def test_bad_labels_in_the_first_batch_are_refused_at_once_naming_num_classes():
    model = tiny_model(num_classes=2)  # the data has 3 classes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"train_data: batch 0 of epoch 1 is invalid: labels outside \[0, 2\) \(expected "
                                         r"class indices below num_classes = 2, the model's logit count\): labels from 0 to 2"):
        T.fit(model, train, **RUN)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_labels_in_a_later_batch_stop_the_epoch_without_torchs_index_error():
    def label_7(epoch, index, x, y):
        if index == 2:
            y[3] = 7
        return x, y

    with pytest.raises(ValueError, match=r"invalid batches in epoch 1 \(the first: batch 2\): 1 with labels "
                                         r"outside \[0, 3\) .*num_classes = 3"):
        T.fit(tiny_model(), Batches(label_7), **RUN)


def test_images_in_0_255_in_the_first_batch_are_refused_at_once():
    with pytest.raises(ValueError, match=r"train_data: batch 0 of epoch 1 is invalid: images outside the input box "
                                         r"clip=\(0, 1\) .*: values from .* to 255"):
        T.fit(tiny_model(), Batches(lambda epoch, index, x, y: (x * 255, y)), **RUN)


def test_a_model_without_2d_logits_is_named():
    with pytest.raises(TypeError, match=r"model: expected \(B, K\) logits"):
        T.fit(nn.Sequential(nn.Conv2d(3, 3, 3)), train, **RUN)
