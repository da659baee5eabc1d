#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine without a GPU, so a broken .cu cannot land.
#
# 1. every csrc/**/*.cu with `nvcc -c` for sm_90 (Hopper) and sm_80 (Ampere), with the defines
#    torch's CUDAExtension passes (no implicit __half/__nv_bfloat16 conversions) and warnings as
#    errors;
# 2. when torch is importable, the CUDA part of the binding (csrc/bindings.cpp with
#    -DFASTSAT_WITH_CUDA) with the host compiler, syntax only, against the installed torch headers
#    (a CPU build of torch lacks one generated c10/cuda header; an empty stand-in is supplied).
#
# Usage: scripts/check_cuda_compile.sh   (NVCC=/path/to/nvcc to pick a compiler). Exit status 0 when
# everything compiles, 1 on a compile error, 2 when nvcc is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
# nvcc's own include flags (the CUDA headers), as its dry run reports them.
cuda_includes="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="\(.*\)".*/\1/p' | head -n 1)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

mapfile -t sources < <(find "$root/csrc" -name '*.cu' | sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under $root/csrc" >&2
  exit 1
fi

nvcc_flags=(-std=c++17 -O3 --fmad=false -I "$root/csrc" --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Werror all-warnings -Xcompiler -Wall)

pids=()
names=()
for src in "${sources[@]}"; do
  "$nvcc" -c "$src" -o "$tmp/$(basename "$src").o" "${nvcc_flags[@]}" \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80 >"$tmp/log.${#pids[@]}" 2>&1 &
  pids+=("$!")
  names+=("nvcc sm_90 + sm_80 ${src#"$root"/}")
done

if torch_include="$(python3 -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null)"; then
  mkdir -p "$tmp/stub/c10/cuda/impl"
  echo '#pragma once' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  include_flags=()
  for dir in $torch_include; do include_flags+=(-I "$dir"); done
  python_include="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  ${CXX:-c++} -fsyntax-only -std=c++20 -Wall -Werror -DFASTSAT_WITH_CUDA -I "$root/csrc" "${include_flags[@]}" \
    -idirafter "$tmp/stub" $cuda_includes -I "$python_include" "$root/csrc/bindings.cpp" \
    >"$tmp/log.${#pids[@]}" 2>&1 &
  pids+=("$!")
  names+=("c++ -fsyntax-only -DFASTSAT_WITH_CUDA csrc/bindings.cpp")
else
  echo "check_cuda_compile: torch not importable, skipping the binding's CUDA part"
fi

failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "ok      ${names[$i]}"
  else
    echo "FAILED  ${names[$i]}" >&2
    cat "$tmp/log.$i" >&2
    failed=1
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "check_cuda_compile: CUDA sources do not compile" >&2
  exit 1
fi
echo "check_cuda_compile: all CUDA sources compile"
