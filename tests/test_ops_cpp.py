"""The compiled extension fastsat._C: op registration (opcheck), the counter-based RNG, thread-count
independence, samples longer than one task, the binding's guards, the build script's switches,
and the nvcc compile check of the CUDA sources. The numerics against the reference are covered
for every backend by tests/test_ops.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsat import ops
from fastsat.ops import NORMS

ROOT = Path(__file__).resolve().parents[1]

_cpp = pytest.importorskip("fastsat.ops._cpp", reason="fastsat._C is not built (pip install --no-build-isolation -e .)")
fastsat_ops = torch.ops.fastsat

# Sizes of one CPU task (csrc/cpu/kernels.cpp kChunk) and of one Philox call.
CPU_CHUNK = 1 << 14
WORDS_PER_CALL = 4


# --- registration ------------------------------------------------------------------------------

def _opcheck_cases():
    gen = torch.Generator().manual_seed(0)
    x_nat = torch.rand(2, 3, 5, 7, generator=gen)
    x = (x_nat + 0.05 * torch.randn(2, 3, 5, 7, generator=gen)).clamp(0, 1)
    g = torch.randn(2, 3, 5, 7, generator=gen)
    boxes = torch.tensor([[1, 0, 4, 3], [0, 2, 7, 5]])
    masks = (torch.rand(2, 1, 5, 7, generator=gen) > 0.5).to(torch.uint8)
    saliency = torch.rand(2, 1, 5, 7, generator=gen) * 2 - 1
    cl = x.contiguous(memory_format=torch.channels_last)
    return [
        ("pgd_step linf stats", fastsat_ops.pgd_step, (x, g, x_nat, torch.empty_like(x), 0.01, 0.03, False, 0.0, 1.0, True)),
        ("pgd_step l2", fastsat_ops.pgd_step, (x, g, x_nat, torch.empty_like(x), 0.2, 0.5, True, 0.0, 1.0, False)),
        ("pgd_step l2 fp64 stats", fastsat_ops.pgd_step,
         (x.double(), g.double(), x_nat.double(), torch.empty_like(x.double()), 0.2, 0.5, True, 0.0, 1.0, True)),
        ("random_start linf", fastsat_ops.random_start, (x_nat, 0.03, False, 0.0, 1.0, torch.tensor([7]))),
        ("random_start l2 bf16", fastsat_ops.random_start, (x_nat.bfloat16(), 0.5, True, 0.0, 1.0, torch.tensor([7]))),
        ("alignment_stats", fastsat_ops.alignment_stats, (x, g)),
        ("alignment_stats fp16", fastsat_ops.alignment_stats, (x.half(), g.half())),
        ("pgd_step l2 fp16 x fp32 grad stats", fastsat_ops.pgd_step,
         (x.half(), g, x_nat.half(), torch.empty_like(x.half()), 0.2, 0.5, True, 0.0, 1.0, True)),
        ("pgd_step linf bf16 x fp32 grad", fastsat_ops.pgd_step,
         (x.bfloat16(), g, x_nat.bfloat16(), torch.empty_like(x.bfloat16()), 0.01, 0.03, False, 0.0, 1.0, False)),
        ("alignment_stats bf16 x fp32 g", fastsat_ops.alignment_stats, (x.bfloat16(), g)),
        ("sat_perturb saliency", fastsat_ops.sat_perturb, (x, 0.03, 0.5, torch.tensor([3]), 0.0, 1.0, saliency, None, None)),
        ("sat_perturb boxes channels_last", fastsat_ops.sat_perturb, (cl, 0.03, 0.5, torch.tensor([3]), 0.0, 1.0, None, boxes, None)),
        ("sat_perturb masks", fastsat_ops.sat_perturb, (x, 0.03, 0.5, torch.tensor([3]), 0.0, 1.0, None, None, masks)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    """Schema (pgd_step mutates only `out`), fake implementation, and AOT dispatch of each op."""
    torch.library.opcheck(op, args)


# --- the RNG -----------------------------------------------------------------------------------

_MASK = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) in plain Python integers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK, (k1 + 0xBB67AE85) & _MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK
    return [c0, c1, c2, c3]


def test_python_philox_matches_random123_known_answers():
    """The oracle below is Philox4x32-10: the known-answer vectors of Random123's kat_vectors."""
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10((_MASK,) * 4, (_MASK,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _words(seed, stream, batch, per_sample):
    """The word each element draws: call q of sample b has counter (q, b_lo, b_hi, stream), key = seed."""
    key = (seed & _MASK, seed >> 32)
    rows = []
    for b in range(batch):
        calls = (per_sample + WORDS_PER_CALL - 1) // WORDS_PER_CALL
        row = [w for q in range(calls) for w in _philox4x32_10((q, b & _MASK, b >> 32, stream), key)]
        rows.append(row[:per_sample])
    return torch.tensor(rows, dtype=torch.int64)


SEED = 0x1234_5678_9ABC  # wider than 32 bits: both key words matter


def test_random_start_draws_philox_words_in_memory_order():
    """L∞ random start in float64 with ε = 1 around 0.5: x0 − 0.5 = 2u − 1 exactly, u = (w >> 8)·2⁻²⁴,
    so the top 24 bits of every element's word can be read back and compared with the oracle."""
    batch, per_sample = 3, 10
    x_nat = torch.full((batch, per_sample), 0.5, dtype=torch.float64)
    x0 = ops.random_start(x_nat, eps=1.0, clip=(-10.0, 10.0), seed=SEED, backend="cpp")
    top24 = ((x0 - 0.5 + 1.0) / 2 * 2**24).round().to(torch.int64)
    expected = _words(SEED, 0, batch, per_sample) >> 8
    mismatch = (top24 != expected).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} elements differ, first at {mismatch[0].tolist()}"


def test_sat_perturb_sign_and_keep_bits_of_one_word():
    """x = 0.5, ε = 0.25, S = 0.5: output 0.375 ⇔ the element kept S (the uniform of the low 24
    bits of its word < p), else 0.25 / 0.75 for the noise sign (top bit of the same word: 1 → +1).
    One Philox call (stream 3) serves four elements: all four outputs used, no second stream."""
    batch, per_sample, p = 2, 13, 0.4
    x = torch.full((batch, per_sample), 0.5)
    out = ops.sat_perturb(x, eps=0.25, p=p, seed=SEED, saliency=torch.full_like(x, 0.5), backend="cpp")
    words = _words(SEED, 3, batch, per_sample)
    keep = (words & 0xFFFFFF).double() * 2**-24 < p
    sign = torch.where((words >> 31) == 1, 1.0, -1.0)
    expected = torch.where(keep, 0.375, 0.5 - 0.25 * sign).float()
    assert torch.equal(out, expected), f"{int((out != expected).sum())} of {out.numel()} elements differ"


def _all_outputs(seed=5):
    """Every op on a batch large enough for at::parallel_for to split it over two threads."""
    gen = torch.Generator().manual_seed(seed)
    shape = (8, 3, 64, 64)
    x_nat = torch.rand(shape, generator=gen)
    x = (x_nat + 0.02 * torch.randn(shape, generator=gen)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    boxes = torch.tensor([[3, 5, 40, 60]] * 8)
    results = {}
    for norm in NORMS:
        eps = 0.03 if norm == "linf" else 1.0
        step, stats = ops.pgd_step(x, g, x_nat, step_size=eps / 3, eps=eps, norm=norm, return_stats=True, backend="cpp")
        results[f"pgd_step {norm}"] = step
        results[f"pgd_step {norm} stats"] = torch.stack([stats.dot, stats.grad_norm, stats.x_norm, stats.delta_norm])
        results[f"random_start {norm}"] = ops.random_start(x_nat, eps=eps, norm=norm, seed=seed, backend="cpp")
    results["alignment_stats"] = ops.alignment_stats(x, g, backend="cpp").dot
    results["sat_perturb"] = ops.sat_perturb(x, eps=0.03, p=0.5, seed=seed, boxes=boxes, backend="cpp")
    return results


def test_results_do_not_depend_on_thread_count():
    """Same seed → same bits with 1 or 2 threads, also for the per-sample sums (fixed task split)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_outputs()
        torch.set_num_threads(2)
        two = _all_outputs()
    finally:
        torch.set_num_threads(previous)
    for name in one:
        assert torch.equal(one[name], two[name]), f"{name}: 1 vs 2 threads differ by {(one[name] - two[name]).abs().max()}"


# --- samples longer than one task --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 1, 131, 127)], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_rows_longer_than_a_task(shape, norm):
    """Per-sample sums and the L2 projection combine several tasks of a sample (here 2–10 of them,
    the last one partial) and equal the reference: L∞ bitwise, sums within 1e-5 relative (float64
    accumulation; the reference's float32 sums over ≤ 150,528 terms are good to ~1e-6)."""
    per_sample = shape[1] * shape[2] * shape[3]
    assert per_sample > CPU_CHUNK and per_sample % CPU_CHUNK, "the case must span a partial second task"
    gen = torch.Generator().manual_seed(1)
    x_nat = torch.rand(shape, generator=gen)
    x = (x_nat + 0.01 * torch.randn(shape, generator=gen)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    eps = 0.03 if norm == "linf" else 2.0
    kw = {"step_size": eps / 2, "eps": eps, "norm": norm, "return_stats": True}
    got, stats = ops.pgd_step(x, g, x_nat, backend="cpp", **kw)
    want, want_stats = ops.pgd_step(x, g, x_nat, backend="torch", **kw)
    atol = 0.0 if norm == "linf" else 1e-5 * eps + 2.0**-23
    assert float((got - want).abs().max()) <= atol, f"step differs by {float((got - want).abs().max())}"
    for field in ("dot", "grad_norm", "x_norm", "delta_norm"):
        a, b = getattr(stats, field).double(), getattr(want_stats, field).double()
        rel = float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())
        assert rel <= 1e-5, f"{field}: relative error {rel:.2e}"
    align = ops.alignment_stats(x, g, backend="cpp")
    want_align = ops.alignment_stats(x, g, backend="torch")
    assert torch.allclose(align.cosine, want_align.cosine, rtol=1e-5, atol=0)
    start = ops.random_start(x_nat, eps=eps, norm=norm, seed=2, backend="cpp")
    delta = (start.double() - x_nat.double()).reshape(shape[0], -1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-6)).all()), f"random start left the ball: {size}"


@pytest.mark.parametrize("norm", NORMS)
def test_out_may_alias_x_nat(norm):
    """The kernels read a tile's inputs and take the statistics before writing the tile, so
    `out=x_nat` gives the result and statistics of a separate output (bitwise)."""
    gen = torch.Generator().manual_seed(3)
    x_nat = torch.rand(2, 3, 9, 9, generator=gen)
    x = (x_nat + 0.05 * torch.randn(2, 3, 9, 9, generator=gen)).clamp(0, 1)
    g = torch.randn(2, 3, 9, 9, generator=gen)
    kw = {"step_size": 0.01, "eps": 0.03, "norm": norm, "return_stats": True, "backend": "cpp"}
    want, want_stats = ops.pgd_step(x, g, x_nat, **kw)
    aliased = x_nat.clone()
    got, stats = ops.pgd_step(x, g, aliased, out=aliased, **kw)
    assert got.data_ptr() == aliased.data_ptr() and torch.equal(got, want)
    for field in ("dot", "grad_norm", "x_norm", "delta_norm"):
        assert torch.equal(getattr(stats, field), getattr(want_stats, field)), field


# --- the binding's own guards ------------------------------------------------------------------

def test_binding_rejects_memory_it_cannot_index():
    x = torch.rand(4, 3, 6, 6)
    strided = x[:, :, ::2]
    with pytest.raises(RuntimeError, match="x: expected a contiguous or channels_last tensor"):
        fastsat_ops.alignment_stats(strided, strided)
    with pytest.raises(RuntimeError, match="out: expected the memory layout of x"):
        fastsat_ops.pgd_step(x, x, x, x.contiguous(memory_format=torch.channels_last), 0.1, 0.1, False, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="saliency, boxes, masks: expected exactly one of them, got 0"):
        fastsat_ops.sat_perturb(x, 0.1, 0.5, torch.tensor([0]), 0.0, 1.0, None, None, None)
    with pytest.raises(RuntimeError, match="boxes: expected a contiguous int64"):
        fastsat_ops.sat_perturb(x, 0.1, 0.5, torch.tensor([0]), 0.0, 1.0, None, torch.zeros(4, 4, dtype=torch.int32), None)
    # The kernels read one int64 seed through its pointer.
    for seed in (torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1]), torch.tensor([], dtype=torch.int64)):
        with pytest.raises(RuntimeError, match=r"seed: expected a \(1,\) int64 tensor"):
            fastsat_ops.random_start(x, 0.1, False, 0.0, 1.0, seed)
        with pytest.raises(RuntimeError, match=r"seed: expected a \(1,\) int64 tensor"):
            fastsat_ops.sat_perturb(x, 0.1, 0.5, seed, 0.0, 1.0, None, None, torch.ones(4, 1, 6, 6, dtype=torch.uint8))


@pytest.mark.parametrize("x_dtype,grad_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float64),
                                                (torch.float16, torch.bfloat16), (torch.float32, torch.float64)])
def test_binding_takes_a_gradient_only_in_the_dtype_of_x_or_its_accumulation_dtype(x_dtype, grad_dtype):
    """The kernels read the gradient as T or acc_t<T>; any other dtype would be read as the wrong type.
    (C++ names the dtypes as c10 does: Half, BFloat16, Float, Double.)"""
    x = torch.rand(2, 3, 4, 4, dtype=x_dtype)
    g = torch.randn(2, 3, 4, 4, dtype=grad_dtype)
    c10_name = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double"}[grad_dtype]
    with pytest.raises(RuntimeError, match=f"grad: expected dtype .*, got {c10_name}$"):
        fastsat_ops.pgd_step(x, g, x, torch.empty_like(x), 0.1, 0.1, False, 0.0, 1.0, False)
    with pytest.raises(RuntimeError, match="g: expected dtype"):
        fastsat_ops.alignment_stats(x, g)


def test_has_cuda_matches_dispatcher():
    assert isinstance(_cpp.HAS_CUDA, bool)
    assert ops.available_backends()["cpp"]
    if not _cpp.HAS_CUDA:
        assert not ops.available_backends()["cuda"]


# --- build -------------------------------------------------------------------------------------

def _run_setup(code_prefix: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """setup.py's extension decision only (`--name`: no compilation)."""
    code = code_prefix + "import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py')"
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_without_torch_builds_pure_python():
    result = _run_setup("import sys; sys.modules['torch'] = None\n", {})
    assert result.returncode == 0, result.stderr
    assert "torch not importable at build time; build with --no-build-isolation" in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a torch without CUDA")
def test_setup_cuda_switches():
    forced = _run_setup("", {"FASTSAT_BUILD_CUDA": "1"})
    assert forced.returncode != 0 and "FASTSAT_BUILD_CUDA=1 but the CUDA kernels cannot be built" in forced.stderr
    auto = _run_setup("", {"FASTSAT_BUILD_CUDA": ""})
    assert auto.returncode == 0 and "skipping the CUDA kernels: the installed torch" in auto.stderr, auto.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_with_nvcc():
    """Every .cu compiles for sm_90 and sm_80, and the binding's CUDA part compiles (see the script)
    against the torch running the tests (the script's python3 is this interpreter)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([str(ROOT / "scripts" / "check_cuda_compile.sh")], check=False, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, f"CUDA compile check failed:\n{result.stdout}\n{result.stderr}"
    assert "ok      c++ -fsyntax-only -DFASTSAT_WITH_CUDA csrc/bindings.cpp" in result.stdout, result.stdout
