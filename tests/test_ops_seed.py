"""Seeds and host checks of the fused ops (issue 8, part 1):

- ``seed=None`` draws a device-resident seed from torch's generator: no tensor→host conversion
  inside the op, reproducible under ``torch.manual_seed``, fresh numbers on every call and on
  every replay of a captured CUDA graph (GPU-only tests, skipped here);
- an int seed keeps its contract (same seed → same result, per backend);
- ``fastsat._checks.no_host_checks()`` skips the two value checks of the ops (x_nat finite, boxes
  inside the image) and nothing else;
- the ops compile with ``torch.compile(fullgraph=True)`` with the drawn-seed path too.

The distributions of the drawn numbers are tested in tests/test_ops.py (they do not depend on
where the seed comes from).
"""

from __future__ import annotations

import pytest
import torch
from _host_reads import HostReads

from fastsat import _checks, ops

AVAILABLE = ops.available_backends()
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _backend_param(name):
    return pytest.param(name, marks=pytest.mark.skipif(not AVAILABLE[name], reason=f"backend {name} not available"))


# Backends that run on CPU tensors without the Triton interpreter (which copies every tensor
# argument to numpy, a host read of its own).
HOST_BACKENDS = [_backend_param("cpp"), "torch"]
# Every backend that runs on CUDA tensors.
CUDA_BACKENDS = [_backend_param("cuda"), _backend_param("triton"), "torch"]


@pytest.fixture
def host_reads():
    """The tensor→host reads made during the test: a list that grows by the name of each read
    (HostReads.reads; test_value_checks_... shows it catches the ops' own checks)."""
    with HostReads() as reads:
        yield reads.reads


def _calls(device, backend, seed):
    """Every op that draws random numbers, with ``seed``; SAT with each saliency source. The
    inputs are the same on every call (their own generator)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 5, generator=gen).to(device)
    saliency = torch.rand(2, 3, 6, 5, generator=gen).to(device)
    boxes = torch.tensor([[0, 1, 4, 5], [2, 0, 5, 6]], device=device)
    masks = (torch.rand(2, 1, 6, 5, generator=gen) > 0.5).to(device)
    kw = {"seed": seed, "backend": backend}
    return {
        "random_start linf": lambda: ops.random_start(x, eps=0.1, **kw),
        "random_start l2": lambda: ops.random_start(x, eps=0.5, norm="l2", **kw),
        "sat_perturb boxes": lambda: ops.sat_perturb(x, eps=0.05, p=0.5, boxes=boxes, **kw),
        "sat_perturb masks": lambda: ops.sat_perturb(x, eps=0.05, p=0.5, masks=masks, **kw),
        "sat_perturb saliency": lambda: ops.sat_perturb(x, eps=0.05, p=0.5, saliency=saliency, **kw),
    }


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_drawn_seed_reads_nothing_back_to_the_host(backend, host_reads):
    """With seed None (and the value checks off) an op makes no tensor→host conversion. The old
    code drew the seed with int(torch.randint(...)): one conversion per call."""
    calls = _calls("cpu", backend, None)
    with _checks.no_host_checks():
        for name, call in calls.items():
            before = len(host_reads)
            call()
            assert host_reads[before:] == [], f"{name}: host reads {host_reads[before:]}"


@pytest.mark.parametrize("backend", [_backend_param("cpp"), _backend_param("triton"), "torch"])
def test_drawn_seed_is_reproducible_under_manual_seed_and_fresh_per_call(backend):
    for name in _calls("cpu", backend, None):
        torch.manual_seed(5)
        first, second = _calls("cpu", backend, None)[name](), _calls("cpu", backend, None)[name]()
        torch.manual_seed(5)
        again = _calls("cpu", backend, None)[name]()
        assert torch.equal(first, again), f"{name}: torch.manual_seed does not reproduce the draw"
        assert not torch.equal(first, second), f"{name}: two calls drew the same numbers"


@pytest.mark.parametrize("backend", [_backend_param("cpp"), _backend_param("triton"), "torch"])
def test_int_seed_keeps_its_contract(backend):
    """Same int seed → same result whatever torch's generator did in between; another seed differs."""
    for name in _calls("cpu", backend, 7):
        first = _calls("cpu", backend, 7)[name]()
        torch.rand(100)  # moves torch's generator: an int seed must not care
        assert torch.equal(first, _calls("cpu", backend, 7)[name]()), name
        assert not torch.equal(first, _calls("cpu", backend, 8)[name]()), name


def test_seed_tensor_draws_on_the_device_from_torchs_generator():
    from fastsat.ops.reference import seed_tensor

    torch.manual_seed(1)
    a = seed_tensor(None, torch.device("cpu"))
    torch.manual_seed(1)
    b = seed_tensor(None, torch.device("cpu"))
    assert a.dtype == torch.int64 and a.shape == (1,) and torch.equal(a, b)
    assert int(seed_tensor(2**63 - 1, torch.device("cpu"))[0]) == 2**63 - 1


# --- no_host_checks ----------------------------------------------------------------------------

def _nan_input():
    x = torch.rand(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    return x


@pytest.mark.parametrize("backend", [_backend_param("cpp"), "torch"])
def test_value_checks_run_outside_no_host_checks_and_are_skipped_inside(backend, host_reads):
    nan = _nan_input()
    bad_boxes = torch.tensor([[0, 0, 5, 2], [0, 0, 1, 1]])  # x1 = 5 > W = 4
    calls = {
        "x_nat": lambda: ops.random_start(nan, eps=0.1, seed=0, backend=backend),
        "x_nat ": lambda: ops.pgd_step(nan, torch.randn_like(nan), nan, step_size=0.1, eps=0.1, backend=backend),
        "boxes": lambda: ops.sat_perturb(torch.rand(2, 3, 4, 4), eps=0.1, p=0.5, seed=0, boxes=bad_boxes,
                                         backend=backend),
    }
    for name, call in calls.items():
        before = len(host_reads)
        with pytest.raises(ValueError, match=name.strip()):
            call()
        # The counter sees the check's host read, so its silence below means something.
        assert len(host_reads) > before, f"{name}: the counter missed the value check's host read"
    for name, call in calls.items():
        before = len(host_reads)
        with _checks.no_host_checks():
            call()  # no error: the value check is skipped...
        assert host_reads[before:] == [], f"{name}: host reads {host_reads[before:]}"  # ...and reads nothing


def test_shape_dtype_device_checks_still_run_inside_no_host_checks():
    x = torch.rand(2, 3, 4, 4)
    with _checks.no_host_checks():
        with pytest.raises(ValueError, match="grad"):
            ops.pgd_step(x, x[:1], x, step_size=0.1, eps=0.1)
        with pytest.raises(TypeError, match="x_nat"):
            ops.pgd_step(x, x, x.double(), step_size=0.1, eps=0.1)
        with pytest.raises(ValueError, match="boxes"):
            ops.sat_perturb(x, eps=0.1, p=0.5, boxes=torch.zeros(2, 5, dtype=torch.long))
        with pytest.raises(TypeError, match="masks"):
            ops.sat_perturb(x, eps=0.1, p=0.5, masks=torch.ones(2, 1, 4, 4))
        with pytest.raises(ValueError, match="seed"):
            ops.random_start(x, eps=0.1, seed=-1)


# --- torch.compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [_backend_param("cpp"), _backend_param("triton")])
def test_drawn_seed_compiles_fullgraph(backend):
    """seed=None inside a fullgraph-compiled function: no graph break, outputs inside the ball,
    fresh numbers per call."""

    def start(x):
        a = ops.random_start(x, eps=0.1, backend=backend)
        b = ops.sat_perturb(x, eps=0.05, p=0.5, saliency=torch.ones_like(x), backend=backend)
        return a, b

    compiled = torch.compile(start, fullgraph=True)
    x = torch.rand(2, 3, 4, 4)
    a1, b1 = compiled(x)
    a2, b2 = compiled(x)
    assert float((a1 - x).abs().max()) <= 0.1 + 1e-6
    assert bool(((((b1 - x).abs() - 0.05).abs() < 1e-6) | (b1 == 0) | (b1 == 1)).all())
    assert not torch.equal(a1, a2) and not torch.equal(b1, b2)


# --- CUDA (run by scripts/gpu_check.sh on a lent GPU; skipped here) ------------------------------

@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_ops_never_sync(backend):
    """On CUDA, every op with seed None (host checks off) runs under sync debug mode "error"."""
    x = torch.rand(4, 3, 8, 8, device="cuda")
    g = torch.randn_like(x)
    calls = _calls("cuda", backend, None)
    for call in calls.values():
        call()  # compile / load outside the check
    with _checks.no_host_checks():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls.values():
                call()
            for norm in ops.NORMS:
                ops.pgd_step(x, g, x, step_size=0.01, eps=0.03, norm=norm, return_stats=True, backend=backend)
            ops.alignment_stats(x, g, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replays_draw_fresh_numbers(backend):
    """Captured with seed None, every replay draws new numbers (torch's Philox offset advances per
    replay); captured with an int seed, every replay repeats them (kernel backends: the reference
    seeds a torch.Generator of its own for an int seed, which is not meant for capture). A PGD
    step is captured too."""
    x = torch.rand(4, 3, 8, 8, device="cuda")
    g = torch.randn_like(x)
    boxes = torch.tensor([[0, 0, 4, 4]] * 4, device="cuda")

    def body(seed):
        start = ops.random_start(x, eps=0.1, seed=seed, backend=backend)
        sat = ops.sat_perturb(x, eps=0.05, p=0.5, seed=seed, boxes=boxes, backend=backend)
        step = ops.pgd_step(start, g, x, step_size=0.01, eps=0.1, norm="l2", backend=backend)
        return start, sat, step

    for seed, fresh in ((None, True), (3, False)) if backend != "torch" else ((None, True),):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body(seed)  # warm-up (kernel compilation, allocator) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with _checks.no_host_checks(), torch.cuda.graph(graph):
            outputs = body(seed)
        graph.replay()
        first = [t.clone() for t in outputs]
        graph.replay()
        torch.cuda.synchronize()
        for a, b, name in zip(first, outputs, ("random_start", "sat_perturb", "pgd_step")):
            assert torch.equal(a, b) != fresh, f"{name}, seed {seed}: replays {'repeat' if fresh else 'differ'}"
        assert float((first[0] - x).abs().max()) <= 0.1 + 1e-6


@needs_cuda
@pytest.mark.parametrize("backend", [_backend_param("cuda"), _backend_param("triton")])
def test_cuda_ops_compile_fullgraph(backend):
    def step(x, g, x_nat):
        out, stats = ops.pgd_step(x.clone(), g, x_nat, step_size=0.01, eps=0.03, return_stats=True, backend=backend)
        start = ops.random_start(x_nat, eps=0.03, backend=backend)
        return out, stats.cosine, ops.alignment_stats(out, g, backend=backend).alignment, start

    x = torch.rand(4, 3, 8, 8, device="cuda")
    g = torch.randn_like(x)
    compiled = torch.compile(step, fullgraph=True)
    got, want = compiled(x, g, x), step(x, g, x)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float((got[3] - x).abs().max()) <= 0.03 + 1e-6


# --- one Philox stream layout for every kernel backend ---------------------------------------------

@pytest.mark.skipif(CUDA or not (AVAILABLE["cpp"] and AVAILABLE["triton"]),
                    reason="compares the C++ kernels with the Triton interpreter on CPU tensors")
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 1, 1, 2), (4, 1, 1, 1)], ids=str)
def test_cpp_and_triton_draw_the_same_words_for_contiguous_batches(shape):
    """Both draw Philox4x32-10 with counter (call, sample, stream): element 4q + k of a sample takes
    output k of call q (Triton: one call per quad, outputs interleaved; per element when a tile is
    narrower than 4). So for a contiguous float32 batch the L∞ start and SAT (sign: top bit;
    Bernoulli: low 24 bits of the same word) agree bit for bit — a sample size not a multiple of 4
    included (its last call is partly used)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen)
    saliency = torch.rand(shape, generator=gen) * 2 - 1
    boxes = torch.tensor([[0, 0, 1, 1]] * shape[0])
    for seed in (0, 2**40 + 5):
        kernels = {}
        for backend in ("cpp", "triton"):
            kernels[backend] = [
                ops.random_start(x, eps=0.25, seed=seed, backend=backend),
                ops.sat_perturb(x, eps=0.125, p=0.5, seed=seed, saliency=saliency, backend=backend),
                ops.sat_perturb(x, eps=0.125, p=0.3, seed=seed, boxes=boxes, backend=backend),
            ]
        for cpp, triton, name in zip(kernels["cpp"], kernels["triton"], ("random_start", "sat saliency", "sat boxes")):
            assert torch.equal(cpp, triton), f"{name}, seed {seed}: {int((cpp != triton).sum())} elements differ"
