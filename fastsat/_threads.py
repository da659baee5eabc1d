"""One place that pins torch's intra-op threads for a stretch of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_thread"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops single-threaded for the duration, then restore the thread count.

    For work made of many small ops (data generation, tiny networks): with two intra-op threads on
    a shared 2-core machine every op waits for a descheduled thread (measured 5-10x slower than one
    thread), and that wait, spent spinning, also counts as the process's CPU time.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
