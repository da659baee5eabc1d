"""The one atomic file writer every layer uses (data caches, checkpoints, logs, reports, figures),
and the lock of a run's folder.

A file is written to a temporary file in its own folder, flushed to disk and renamed over the
target with ``os.replace``, so a reader — or a run resumed after a crash at any moment — sees either
the previous file or the complete new one, never a torn one. The temporary file is created
exclusively under an unpredictable name (``tempfile.mkstemp``: ``O_CREAT | O_EXCL | O_NOFOLLOW``),
so a file or symbolic link planted in the folder is never written through; ``os.replace`` replaces
a link at the target itself, never the file it points to. Sits below every other module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["LOCK_NAME", "atomic_save", "atomic_write", "atomic_write_text", "locked_folder", "sweep_stale_temporaries"]

#: The lock file :func:`locked_folder` holds in a run's folder (it records the holder's pid).
LOCK_NAME = ".fastsat.lock"

# The temporary files of atomic_write: ".NAME.PID.RANDOM.tmp" — and ".NAME.PID.tmp", the
# predictable name fastsat used before, whose litter the sweep removes too.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)?\.tmp")

# The folders this process holds (resolved path -> nesting depth): locked_folder is re-entrant.
_HELD: dict[Path, int] = {}


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a binary handle of a new temporary file next to ``path``, fsync it
    and rename it over ``path`` (creating the parent folder). Returns ``path``.

    Raises:
        OSError: the folder is not writable or the disk is full (of the same type, naming ``path``);
            the previous file at ``path``, if any, is intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise _naming(err, path) from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as the same kind of OSError, its message naming the file that was being written."""
    message = f"could not write {path} ({err.strerror or err}); the previous file, if any, is intact"
    # OSError(errno, message) comes back as the subclass of that errno (PermissionError, ...).
    return OSError(message) if err.errno is None else OSError(err.errno, message)


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def sweep_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when its process died
    mid-write (a kill leaves one per file being written, as big as that file). Only names of its
    pattern whose process no longer runs are removed, never followed; returns them."""
    removed = []
    for entry in Path(folder).iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or _running(int(match["pid"])) or entry.is_dir():
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, name: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) while the context runs: an
    advisory ``flock`` on its :data:`LOCK_NAME` file, which records this process's pid. The
    kernel releases the lock when the process dies, so a killed run never blocks the next one.
    Re-entrant within a process: code holding the folder (the command line, writing the run's
    config.yaml) can call code that locks it again (the trainer).

    Raises:
        ValueError: another process holds the lock (naming ``name``, the folder and that pid), or
            the folder cannot be written (checked now, before any work is done).
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        held = folder.resolve()
        if held in _HELD:
            fd = None
        else:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ValueError(f"{name}: cannot write in {folder} ({err.strerror or err}); expected a writable "
                         "folder") from err
    if fd is None:
        _HELD[held] += 1
        try:
            yield folder
        finally:
            _HELD[held] -= 1
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ValueError(f"{name}: {folder} is in use by another fastsat run (pid {holder}, holding "
                             f"{lock}); wait for it to finish or choose another folder") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            os.fsync(fd)
        except OSError as err:
            reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise ValueError(f"{name}: cannot write in {folder} ({reason}); expected a writable folder") from err
        _HELD[held] = 1
        try:
            yield folder
        finally:
            del _HELD[held]
    finally:
        os.close(fd)  # releases the flock
