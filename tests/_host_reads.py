"""A counter of reads of tensor values on the host, for tests that check a hot path never waits for
the device (imported as a plain module: pytest puts tests/ on sys.path)."""

import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that read values on the host without dispatching an aten op, so that the dispatch
# mode alone would miss them.
UNDISPATCHED_READS = ("tolist", "numpy")
# Ops whose output size depends on tensor values: on a GPU each waits for the device to learn it.
DATA_DEPENDENT_SIZES = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}


def _boolean_index(func, args) -> bool:
    """Whether ``func`` is indexing by a boolean mask (x[mask]): a nonzero inside the op."""
    return func is torch.ops.aten.index.Tensor and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)


class HostReads(TorchDispatchMode):
    """While entered, records every read of tensor values on the host: aten._local_scalar_dense
    (what .item(), bool(t), int(t) and float(t) go through, from Python or C++), the ops whose
    output size depends on values (DATA_DEPENDENT_SIZES, and boolean-mask indexing) and the
    methods of UNDISPATCHED_READS, wrapped for the duration. ``reads`` names them in order (the op or method);
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
        if func is torch.ops.aten._local_scalar_dense.default or func in DATA_DEPENDENT_SIZES \
                or _boolean_index(func, args):
            self._record(func.name())
        return func(*args, **(kwargs or {}))
