#!/usr/bin/env bash
# The whole first-GPU check (issue 11) as one prepared script, for a lent H200 (torch 2.11 +
# CUDA 13, triton 3.6, python3 with pytest, pytest-xdist, hypothesis, pybind11 and ninja; no network).
#
#   bash scripts/gpu_check.sh                      # on the GPU machine; results under $OUT
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  # here: the same plumbing, CUDA-only parts stubbed
#
# Parts, in order, each under `timeout` and never longer than what is left of the total budget
# (GPU_CHECK_BUDGET_S, default 450 s: under 8 minutes with the start-up around it), each appending
# to $OUT/run.log as it goes and leaving its status line in $OUT/summary.txt, so a crash or a
# timeout in one part loses nothing of the others:
#   1. env     nvidia-smi, python / torch / triton / nvcc versions, the commit
#   2. build   fastsat._C with the CUDA kernels for sm_90 only (FASTSAT_CUDA_ARCH_LIST=9.0,
#              MAX_JOBS=16), `pip install --no-build-isolation --no-deps -e .` into the machine's own
#              python (its own torch; nothing downloaded), then a check that the cuda backend loads
#   3. tests   the GPU tests: every backend against the reference on CUDA tensors (fp32/fp16/bf16/
#              fp64, contiguous and channels_last), the CUDA kernels' own paths, CUDA-graph capture,
#              torch.compile and sync debug mode of the ops (tests/test_ops*.py), and the training
#              step's sync and capture tests (tests/test_fast_path.py), selected with
#              -k "cuda or triton"; junit in $OUT
#   3b. timm   the timm:NAME model route (tests/test_models_external.py -k timm), which skips, with its
#              reason in run.log, where the machine's python has no working timm (nothing is installed)
#   4. bench-ops-quick   python -m bench.gpu --quick --no-compile (a first, cheap op table)
#   5. bench-e2e         python bench/bench_e2e.py --device cuda (GPU_CHECK_E2E_ARGS, default --quick)
#   6. bench-ops         python -m bench.gpu (full: both shapes, fp32 + bf16, torch.compile rows and
#                        the attack / saliency / training paths) with whatever time is left; it
#                        overwrites part 4's files only when it finishes
# At most 8 files come back from $OUT: summary.txt, run.log, tests.xml, and bench.gpu's and
# bench_e2e's CSV + markdown.
#
# Exit status: 0 when every part passed, 1 otherwise (summary.txt says which).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
dry="${GPU_CHECK_DRY_RUN:-0}"
py="${PYTHON:-python3}"
out="${OUT:-}"
if [ -z "$out" ]; then
  out="$(mktemp -d)"
fi
mkdir -p "$out"
log="$out/run.log"
summary="$out/summary.txt"
budget="${GPU_CHECK_BUDGET_S:-450}"
start=$(date +%s)
: >"$log"
: >"$summary"
export PYTHONUNBUFFERED=1
failed=0

say() { echo "$*" | tee -a "$log"; }

# run_part NAME GUARD_SECONDS CMD...: runs CMD under timeout (the smaller of its guard and the time
# left), output appended to run.log; records "NAME ok|FAILED (rc)|TIMEOUT|SKIPPED seconds" in summary.txt.
run_part() {
  local name="$1" guard="$2"
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ "$left" -lt 20 ]; then
    echo "$name SKIPPED (budget spent)" >>"$summary"
    say "=== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$guard" -gt "$left" ] && guard="$left"
  say "=== $name (guard ${guard}s): $*"
  local t0=$(date +%s) rc
  timeout --signal=TERM --kill-after=10 "$guard" "$@" >>"$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    echo "$name ok ${took}s" >>"$summary"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name TIMEOUT ${took}s" >>"$summary"
    failed=1
  else
    echo "$name FAILED (rc $rc) ${took}s" >>"$summary"
    failed=1
  fi
  say "=== $name: rc $rc in ${took}s"
}

environment() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown) $(git -C "$root" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "dry run: $dry"
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not available"; fi
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not available"
  "$py" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory // 2**20, "MiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
EOF
}

build() {
  export FASTSAT_BUILD_CUDA=1 FASTSAT_CUDA_ARCH_LIST="9.0" MAX_JOBS=16
  # An in-place build is the fallback should pip refuse the editable install (it only compiles).
  { "$py" -m pip install --no-build-isolation --no-deps --no-index -e . ||
    { echo "pip install failed; building in place instead"; "$py" setup.py build_ext --inplace; }; } &&
    check_backends cpp cuda triton
}

# check_backends NAME...: fastsat._C loads and every named backend is available.
check_backends() {
  "$py" - "$@" <<'EOF'
import sys
import fastsat.ops as ops
available = ops.available_backends()
print("available backends:", available)
missing = [name for name in sys.argv[1:] if not available[name]]
sys.exit(f"missing backends: {missing}" if missing else 0)
EOF
}

# The parts run in a child shell under `timeout`, which needs the functions and settings exported.
export py
export -f build check_backends

tests=(tests/test_ops.py tests/test_ops_seed.py tests/test_ops_cuda.py tests/test_ops_cpp.py tests/test_ops_triton.py
  tests/test_fast_path.py)
pytest_args=(-q -p no:cacheprovider -k "cuda or triton" --junitxml="$out/tests.xml" -o junit_family=xunit2)

say "gpu_check: results in $out (budget ${budget}s, dry run: $dry)"
environment >>"$summary" 2>&1
echo "--- parts" >>"$summary"
cat "$summary" >>"$log"

if [ "$dry" = "1" ]; then
  # Here: no CUDA. The build and the runs that need a GPU are replaced by checks of the same
  # plumbing (the extension already built here loads; the test selection collects; bench.gpu
  # answers without a GPU; bench_e2e parses its GPU arguments).
  run_part build 60 bash -c "check_backends cpp"
  run_part tests 120 "$py" -m pytest --collect-only "${pytest_args[@]}" "${tests[@]}"
  run_part timm 60 "$py" -m pytest --collect-only -q -p no:cacheprovider -k timm tests/test_models_external.py
  run_part bench-ops-quick 60 bash -c "'$py' -m bench.gpu --quick --no-compile --out '$out'; test \$? -eq 2"
  run_part bench-e2e 60 "$py" bench/bench_e2e.py --help
else
  run_part build 240 bash -c build
  run_part tests 180 "$py" -m pytest "${pytest_args[@]}" -n 8 --timeout 120 "${tests[@]}"
  run_part timm 90 "$py" -m pytest -q -rs -p no:cacheprovider -k timm tests/test_models_external.py
  run_part bench-ops-quick 60 "$py" -m bench.gpu --quick --no-compile --out "$out"
  # shellcheck disable=SC2086  # word splitting of the extra arguments is meant
  run_part bench-e2e 120 "$py" bench/bench_e2e.py --device cuda ${GPU_CHECK_E2E_ARGS---quick} --out-dir "$out"
  run_part bench-ops 300 "$py" -m bench.gpu --out "$out"
fi

# The measured per-op table for fastsat/ops/_backends.py (the last one bench.gpu printed), to paste.
if grep -q '^AUTO_CUDA' "$log"; then
  echo "--- measured AUTO_CUDA (paste into fastsat/ops/_backends.py)" >>"$summary"
  awk '/^AUTO_CUDA/ {table = ""; on = 1} on {table = table $0 "\n"} /^}/ {on = 0} END {printf "%s", table}' \
    "$log" >>"$summary"
fi

total=$(($(date +%s) - start))
echo "total ${total}s of ${budget}s" >>"$summary"
say "gpu_check: done in ${total}s; summary:"
tail -n 8 "$summary" | tee -a "$log"
ls -l "$out" | tee -a "$log"
exit "$failed"
