"""A counter of reads of tensor values on the host, for tests that check a hot path never waits for
the device (imported as a plain module: pytest puts tests/ on sys.path)."""

import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that read values on the host without dispatching an aten op, so that the dispatch
# mode alone would miss them.
UNDISPATCHED_READS = ("tolist", "numpy")


class HostReads(TorchDispatchMode):
    """While entered, records every read of tensor values on the host: aten._local_scalar_dense
    (what .item(), bool(t), int(t) and float(t) go through, from Python or C++) and the methods of
    UNDISPATCHED_READS, wrapped for the duration. ``reads`` names them in order (the op or method);
    only reads made while ``armed`` are recorded, so a test can enter the counter early and arm it
    where the code under test begins."""

    def __init__(self, *, armed: bool = True):
        super().__init__()
        self.armed = armed
        self.reads: list[str] = []
        self._wrappers = contextlib.ExitStack()

    @property
    def count(self) -> int:
        return len(self.reads)

    def _record(self, name: str) -> None:
        if self.armed:
            self.reads.append(name)

    def __enter__(self):
        mode = super().__enter__()
        for name in UNDISPATCHED_READS:
            read = getattr(torch.Tensor, name)

            def recorded(tensor, *args, _read=read, _name=name, **kwargs):
                self._record(_name)
                return _read(tensor, *args, **kwargs)

            self._wrappers.enter_context(mock.patch.object(torch.Tensor, name, recorded))
        return mode

    def __exit__(self, *exc_info):
        self._wrappers.close()
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record(func.name())
        return func(*args, **(kwargs or {}))
