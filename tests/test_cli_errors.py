"""What the command line does with bad input: every mistake a clear error naming the option or
file and what was expected, before any long work, and nothing taken silently from a run's files."""

import contextlib
import io
import logging

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsat import cli, models

SMALL = ["--n-train", "8", "--n-test", "4", "--image-size", "8", "--num-classes", "3", "--model", "madrycnn",
         "--width", "2", "--device", "cpu"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\nrecipe: [pgd\nlr: 0.1\n")
    with pytest.raises(ValueError, match=r"config: .*run.yaml, line \d+ column \d+: not valid YAML"):
        cli.load_config("train", config)
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "run.yaml, line" in _error(capsys)


def test_a_config_that_is_not_utf8_or_not_a_mapping_is_named(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"epochs: 3\nrecipe: \xff\xfe\n")
    with pytest.raises(ValueError, match=r"config: .*run.yaml, line 2: not UTF-8 text \(invalid start byte b'\\xff'\)"):
        cli.load_config("train", config)
    config.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"config: .*run.yaml must hold a mapping of option: value, got list"):
        cli.load_config("train", config)
    config.write_text("checkpoint: 5\n")  # eval reads the checkpoint's path from the file before anything else
    assert cli.main(["eval", "--config", str(config)]) == 2
    assert "checkpoint (config" in _error(capsys)


def test_a_broken_run_config_next_to_a_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "config.yaml").write_bytes(b"dataset: \xff\n")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "checkpoint.pt")]) == 2
    assert "run config: " in _error(capsys)


def test_cuda_on_a_machine_without_one_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["eval", *SMALL[:-2], "--device", "cuda"]) == 2
    assert "device: expected a device this machine has (cpu, or auto), got 'cuda'" in _error(capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    from fastsat._checks import device

    with pytest.raises(ValueError, match=r"device: expected a device this machine has \(cpu, cuda:0 .. cuda:1, or "
                                         r"auto\), got 'cuda:2': 2 CUDA GPUs"):
        device("cuda:2")
    with pytest.raises(TypeError, match="device: expected a device name"):
        device(0)


def test_stem_on_a_model_without_one_is_named(capsys):
    with pytest.raises(TypeError, match=r"stem: model 'madrycnn' has no option 'stem'; expected one of width"):
        models.create("madrycnn", num_classes=3, stem="imagenet")
    with pytest.raises(TypeError, match=r"widht: .*\(did you mean 'width'\?\)"):
        models.create("resnet10", num_classes=3, widht=4)
    assert cli.main(["eval", *SMALL, "--stem", "imagenet", "--max-samples", "2"]) == 2
    assert "stem: model 'madrycnn' has no option 'stem'" in _error(capsys)


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_eval_out_that_cannot_be_written_fails_before_the_evaluation(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "file.txt").write_text("")
    out = {"under_a_file": tmp_path / "file.txt" / "eval.json", "a_folder": tmp_path}[where]
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    assert cli.main(["eval", *SMALL, "--out", str(out)]) == 2
    assert "out: " in _error(capsys)
    with pytest.raises(ValueError, match=r"out_dir: expected the path of a folder to write, got the existing file"):
        cli.SaliencyOptions(out_dir=str(tmp_path / "file.txt"))


def test_a_full_disk_is_an_error_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    def full(path, text):
        raise OSError(28, f"could not write {path} (No space left on device)")

    monkeypatch.setattr(cli, "atomic_write_text", full)
    assert cli.main(["eval", *SMALL, "--max-samples", "2", "--eps", "0", "--out", str(tmp_path / "eval.json")]) == 2
    assert "eval.json (No space left on device)" in _error(capsys)


def test_eval_takes_no_data_path_from_a_runs_config_and_says_what_it_took(tmp_path, caplog, capsys):
    marker = tmp_path / "ran"
    downloaded = tmp_path / "bundle"
    downloaded.mkdir()
    (downloaded / "config.yaml").write_text(yaml.safe_dump({"dataset": "cifar10", "data_dir": str(tmp_path / "data"),
                                                            "model": "madrycnn", "width": 2}))
    with caplog.at_level(logging.INFO, logger="fastsat"):
        assert cli.main(["eval", "--checkpoint", str(downloaded / "checkpoint.pt"), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert "data_dir: dataset 'cifar10' needs --data-dir" in err and "config.yaml never supplies it" in err
    taken = [r.getMessage() for r in caplog.records if "settings from the run's" in r.getMessage()]
    assert len(taken) == 1 and "dataset=cifar10" in taken[0] and "model=madrycnn" in taken[0]
    assert "data_dir" not in taken[0] and not marker.exists()


# ---------------------------------------------------------------------------------------------
# Every option of every command but `data pack` given a value of the wrong kind


_WRONG_TEXT = st.sampled_from(["", " ", "x", "none", "nan", "inf", "-inf", "-1", "0", "1.5", "2.0", "1/0", "8/", "1e999",
                               "0x10", "a,,b", ",", "1/0,2", "１", "cuda:99", "\x00"])
_WRONG = st.one_of(_WRONG_TEXT, st.text(max_size=12))
# Training, evaluation and the analyses are stubbed out: the property is about reading the options,
# and the shapes data and the model that the options build before them.
_TRAINED = ["--n-train", "8", "--n-test", "4", "--image-size", "8", "--num-classes", "3", "--model", "madrycnn",
            "--width", "2", "--device", "cpu"]
_BASE = {"train": [*_TRAINED, "--epochs", "1", "--batch-size", "4"], "eval": [*_TRAINED, "--max-samples", "2"],
         "saliency": [*_TRAINED, "--n-samples", "2"], "analyze": [*_TRAINED, "--n-samples", "2"],
         "demo": ["--quick", "--device", "cpu"]}


def _options(command):
    return [spec.name for spec in cli.command_specs(command)]


@pytest.mark.parametrize("command", list(_BASE))
def test_wrong_values_for_any_option_give_fastsats_own_errors(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an accepted --out-dir or --out lands here
    monkeypatch.setenv("FASTSAT_CACHE", str(tmp_path / "cache"))

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    for name in ("fit", "evaluate", "_first_images", "run_demo"):  # where each command's real work begins
        monkeypatch.setattr(cli, name, stop)

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.sampled_from(_options(command)), value=_WRONG)
    def check(name, value):
        argv = [command, *_BASE[command], f"--{name.replace('_', '-')}={value}"]  # "=": a value may start with "-"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exit:  # argparse: a usage error
                status = exit.code
            except Reached:  # the options were accepted
                return
        message = err.getvalue()
        assert "Traceback" not in message, message
        assert status in (0, 2), f"{argv}: exit status {status}: {message}"
        if status == 2:
            assert name in message or name.replace("_", "-") in message, f"{argv}: the error does not name {name}: {message}"

    check()


# --- a run's folder, data and weights through the command line -------------------------------------

_TRAIN = ["train", "--n-train", "32", "--n-test", "8", "--image-size", "12", "--num-classes", "3", "--model", "madrycnn",
          "--width", "4", "--batch-size", "16", "--device", "cpu", "--recipe", "standard", "--eval-steps", "1",
          "--no-augment", "--no-progress"]
_HOLD = ("import sys, time\nfrom fastsat._io import locked_folder\nwith locked_folder(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(60)")


def test_a_second_train_in_a_busy_out_dir_changes_nothing_of_the_first(tmp_path, capsys):
    """The folder is locked before config.yaml is written: the refused run leaves the first one's intact."""
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("first: run\n")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main([*_TRAIN, "--epochs", "1", "--out-dir", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert f"out_dir: {out} is in use by another fastsat run (pid {holder.pid}" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "first: run\n"


def test_a_resume_on_other_data_settings_names_the_setting(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*_TRAIN, "--epochs", "1", "--out-dir", str(out)]) == 0
    assert cli.main([*_TRAIN, "--epochs", "1", "--out-dir", str(out), "--resume", "--data-seed", "7"]) == 2
    assert "data_seed" in capsys.readouterr().err


def test_eval_of_a_checkpoint_for_another_class_count_names_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*_TRAIN, "--epochs", "1", "--out-dir", str(out)]) == 0
    checkpoint = out / "checkpoint.pt"
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--num-classes", "4", "--eps", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} does not fit the model" in err and "Traceback" not in err
