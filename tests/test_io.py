"""fastsat._io: atomic writes that never follow a planted link, the sweep of a killed writer's
temporary files, and the run-folder lock (issue 16, part A)."""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from fastsat import _io


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_planted_link_at_a_predictable_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "checkpoint.pt"
    # The name fastsat's writer used to open with open(..., "wb"), and a range of pids around ours.
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (tmp_path / f".checkpoint.pt.{pid}.tmp").symlink_to(victim)
    _io.atomic_save({"w": torch.ones(3)}, target)
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and torch.equal(torch.load(target)["w"], torch.ones(3))


def test_the_temporary_file_is_created_exclusively(tmp_path, monkeypatch):
    # Even a link planted at the very name the writer draws first is not opened: the writer takes
    # the next name (O_EXCL | O_NOFOLLOW), and the link and what it points to stay as they were.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    (tmp_path / f".out.bin.{os.getpid()}.planted.tmp").symlink_to(victim)
    _io.atomic_write(tmp_path / "out.bin", lambda handle: handle.write(b"new"))
    assert victim.read_bytes() == b"precious" and (tmp_path / "out.bin").read_bytes() == b"new"
    assert (tmp_path / f".out.bin.{os.getpid()}.planted.tmp").is_symlink()


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "metrics.csv").symlink_to(victim)
    _io.atomic_write_text(tmp_path / "metrics.csv", "epoch\n")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "metrics.csv").is_symlink() and (tmp_path / "metrics.csv").read_text() == "epoch\n"


def test_stale_temporaries_of_dead_writers_are_swept_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = [f".checkpoint.pt.{dead}.tmp", f".checkpoint.pt.{dead}.k2j_x9q1.tmp", f".best.pt.{dead}.abc.tmp"]
    kept = [f".checkpoint.pt.{alive}.abc.tmp", "checkpoint.pt", "notes.tmp", f"checkpoint.pt.{dead}.tmp",
            _io.LOCK_NAME]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    removed = _io.sweep_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    _io.atomic_save({"w": torch.zeros(2)}, path)

    def full_disk(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write {path} \(No space left on device\)") as caught:
        _io.atomic_save({"w": torch.ones(2)}, path)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


HOLD = textwrap.dedent(
    """
    import sys, time
    from fastsat._io import locked_folder
    with locked_folder(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_a_folder_locked_by_another_process_is_refused_naming_it_until_that_process_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with (pytest.raises(ValueError, match=rf"out_dir: {tmp_path} is in use by another fastsat run \(pid {holder.pid}"),
              _io.locked_folder(tmp_path, "out_dir")):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The kernel released the killed holder's lock: its stale lock file blocks nothing.
    assert (tmp_path / _io.LOCK_NAME).read_text().strip() == str(holder.pid)
    with _io.locked_folder(tmp_path, "out_dir"):
        assert (tmp_path / _io.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_the_lock_is_re_entrant_in_its_process_and_released_by_the_outermost_holder(tmp_path):
    def locked_by_another_process() -> bool:
        probe = "import sys\nfrom fastsat._io import locked_folder\ntry:\n    with locked_folder(sys.argv[1]): pass\n" \
                "except ValueError: sys.exit(3)"
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], timeout=60, check=False).returncode == 3

    with _io.locked_folder(tmp_path, "out_dir"):
        with _io.locked_folder(tmp_path / "." , "out_dir"):  # e.g. the CLI holding it, then the trainer
            pass
        assert locked_by_another_process(), "leaving the inner holder released the lock"
    assert not locked_by_another_process()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with (pytest.raises(ValueError, match=rf"out_dir: cannot write in {folder} .*expected a writable folder"),
              _io.locked_folder(folder, "out_dir")):
            pass
    finally:
        folder.chmod(0o700)
