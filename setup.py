"""Builds the optional extension fastsat._C (package metadata lives in pyproject.toml).

- ``pip install --no-build-isolation -e .`` compiles fastsat._C against the torch already
  installed: the C++ CPU kernels always; the CUDA kernels too when that torch has CUDA and nvcc is
  found.
- ``pip install .`` (isolated build, no torch in the build environment) installs the pure-Python
  package; the ops then run on their Triton / PyTorch backends.

Environment:
  FASTSAT_BUILD_CUDA      unset: CUDA kernels when possible; 1: require them; 0: skip them.
  FASTSAT_CUDA_ARCH_LIST  GPU architectures, e.g. "8.0;9.0+PTX" (default: 9.0 plus those of
                          TORCH_CUDA_ARCH_LIST and of the GPUs visible at build time).
  MAX_JOBS                parallel compile jobs (ninja).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")

# Identical bits from every build: no floating-point contraction (FMA) anywhere, no fast-math.
# (-fno-math-errno only lets sqrt compile to the instruction; errno is never read.)
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]


def _say(message: str) -> None:
    print(f"fastsat setup: {message}", file=sys.stderr)


def _cuda_arch_flags(torch) -> list[str]:
    arch_list = os.environ.get("FASTSAT_CUDA_ARCH_LIST")
    if not arch_list:
        archs = ["9.0", *re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())]
        if torch.cuda.is_available():
            archs += ["{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
        archs = sorted({a for a in archs if a}, key=lambda a: float(re.match(r"\d+\.\d+", a).group()))
        archs[-1] = archs[-1].removesuffix("+PTX") + "+PTX"  # PTX of the newest arch for newer GPUs
        arch_list = ";".join(archs)
    flags = []
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if match is None:
            raise ValueError(f"FASTSAT_CUDA_ARCH_LIST: cannot parse {arch!r} (expected e.g. 8.0, 9.0a, 9.0+PTX)")
        number = match[1] + match[2] + match[3]
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match[4]:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    _say(f"CUDA architectures: {arch_list}")
    return flags


def _want_cuda(torch, cpp_extension) -> bool:
    switch = os.environ.get("FASTSAT_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"FASTSAT_BUILD_CUDA must be 0, 1 or unset, got {switch!r}")
    if switch == "0":
        _say("FASTSAT_BUILD_CUDA=0: building the C++ CPU kernels only")
        return False
    reason = None
    if torch.version.cuda is None:
        reason = f"the installed torch {torch.__version__} has no CUDA"
    elif cpp_extension.CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if reason is None:
        return True
    if switch == "1":
        raise RuntimeError(f"FASTSAT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    _say(f"skipping the CUDA kernels: {reason}; building the C++ CPU kernels only")
    return False


def _extension_build() -> dict:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch not importable at build time; build with --no-build-isolation to get the C++/CUDA kernels "
             "(`pip install --no-build-isolation -e .`). Installing the pure-Python package.")
        return {}
    sources = [str(CSRC / "bindings.cpp"), str(CSRC / "cpu" / "kernels.cpp")]
    include_dirs = [str(ROOT / CSRC)]
    extra = {"cxx": list(CXX_FLAGS)}
    if _want_cuda(torch, cpp_extension):
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))
        extra["cxx"].append("-DFASTSAT_WITH_CUDA")
        extra["nvcc"] = NVCC_FLAGS + _cuda_arch_flags(torch)
        extension_class = cpp_extension.CUDAExtension
        _say(f"building the C++ CPU and CUDA kernels (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        extension_class = cpp_extension.CppExtension
    extension = extension_class(
        name="fastsat._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_extension_build())
