#!/usr/bin/env bash
# One GPU run that brings back every figure it can, whatever fails, and ends with a verdict table.
#   bash benchmarks/fetch_wheels.sh        # with network access, once: diffusers (and setuptools) wheels into .whl/
#   bash benchmarks/gpu_check.sh           # on the GPU machine: results in $OUT (default: gpu_out/)
# Steps, most important first: install the package as docs/install.md does (against the machine's torch,
# no build isolation, so bypass_kernels.export imports), GPU tests (junit xml), microbenchmarks and
# the host cost of blend_, UNet step (SD1.5: CUDA graph and eager; SD1.5: reduce-overhead and
# default compile; SDXL: CUDA graph), a schedule per sample (op and step, benchmarks/per_sample.py),
# then the verdict (benchmarks/verdict.py). The SD1.5 compiles
# happen first in the background, during the build and the tests, and are awaited before anything
# is timed. Each step is independent: its failure or time-out is logged and the next one runs. Each
# has its own cap and all share GPU_CHECK_BUDGET_S (default 450 s: the whole run, install included, fits in about 8 minutes).
# Files in $OUT (8): gpu_check.log gpu_tests.xml compile_facts.xml microbench.csv host_cost.csv unet_step.csv per_sample.csv
# verdict.md (the build's log stays in /tmp/build.log; its bypass_kernels lines, errors and, on a failure, its
# last lines go into gpu_check.log).
# Without a CUDA GPU (a dry run, e.g. `OUT=/tmp/x bash benchmarks/gpu_check.sh`) every GPU step is
# reported as skipped and the verdict table is still printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-450}))
summary=()
stamp() { echo "== $(date -u +%H:%M:%S) (+${SECONDS}s) $*"; }

have_gpu=false
if [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
  && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  have_gpu=true
fi

# step NAME CAP_S command...: runs the command (a program or one of the functions below) with a
# time-out of CAP_S or what is left of the budget, whichever is less; records ok / exit code / timed
# out / skipped, and never stops the script. Without a GPU it is skipped; any_step runs anyway.
step() {
  if ! $have_gpu; then
    summary+=("SKIPPED  $1 (no CUDA GPU)"); stamp "skipped (no CUDA GPU): $1"; return 0
  fi
  any_step "$@"
}
any_step() {
  local name=$1 cap=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
  shift 2
  if ((left < 15)); then
    summary+=("SKIPPED  $name (budget spent)"); stamp "skipped (budget spent): $name"; return 0
  fi
  local limit=$((cap < left ? cap : left))
  stamp "$name (limit ${limit}s)"
  # SIGINT first: pytest still writes its junit xml, a benchmark keeps the rows it appended.
  if declare -F "$1" >/dev/null; then
    timeout -s INT -k 10 "$limit" bash -c '"$@"' _ "$@"  # a function: exported below, run by a child bash
  else
    timeout -s INT -k 10 "$limit" "$@"
  fi
  rc=$?
  case $rc in
    0) summary+=("ok       $name ($((SECONDS - start)) s)") ;;
    124 | 137) summary+=("TIMEOUT  $name (killed after ${limit} s)") ;;
    *) summary+=("FAILED   $name (exit $rc after $((SECONDS - start)) s)") ;;
  esac
  stamp "$name: exit $rc"
  return 0
}

show_environment() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  fi
  "$PY" -c 'import sys; print("python", sys.version.split()[0])'
  "$PY" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("torch", "triton")))' 2>&1 | tail -1
}

install_wheels() {
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run benchmarks/fetch_wheels.sh here and carry .whl"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

install_package() {
  # The documented install (docs/install.md): against the torch already here, no build isolation, no downloads.
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${cap:-9.0}}
  PIP_BREAK_SYSTEM_PACKAGES=1 BYPASS_KERNELS_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >/tmp/build.log 2>&1
  local rc=$?
  grep -E "^\s*bypass_kernels:|error|Successfully installed" /tmp/build.log | tail -20
  if ((rc != 0)); then  # still give the benchmarks the kernels: an in-place build (no export mapping)
    tail -40 /tmp/build.log
    echo "pip install failed (exit $rc): building the extension in place instead"
    BYPASS_KERNELS_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py -q build_ext --inplace >>/tmp/build.log 2>&1
  fi
  return $rc
}

unet() { "$PY" benchmarks/unet_step.py --loop-steps 20 --out "$OUT/unet_step.csv" "$@"; }
export OUT PY
export -f show_environment install_wheels install_package unet

$have_gpu || stamp "dry run: no CUDA GPU visible (or GPU_CHECK_DRY_RUN=1); GPU steps are skipped"
any_step "environment" 30 show_environment
# Always the carried wheels, first on the path: the pinned diffusers, and setuptools >= 77 for
# pyproject.toml's license string (the machine's own versions are unknown).
step "carried wheels (diffusers, accelerate, setuptools)" 30 install_wheels
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
warm_pid=
if $have_gpu; then
  # Compiling the SD1.5-shaped UNet (unpatched and patched, two modes) is the longest part of the run:
  # do it once in the background while the extension builds and the tests run (the traced graph does
  # not use the extension), so the compile step below loads the graphs from Inductor's on-disk cache.
  stamp "compile warm-up in the background: SD1.5, reduce-overhead and default"
  (BYPASS_KERNELS_DISABLE_NATIVE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout -s INT -k 10 200 \
    "$PY" benchmarks/unet_step.py --warm-only --models sd15 --modes reduce-overhead compile 2>&1 \
    | sed -u 's/^/[warm-up] /') &
  warm_pid=$!
fi
step "install: pip install --no-build-isolation -e . (CPU + CUDA kernels)" 150 install_package
if $have_gpu && ! "$PY" -c "import bypass_kernels.export" 2>/dev/null; then
  stamp "the package is not installed: the steps below import it from the source tree (no export, no extension)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
step "backends (bypass-kernels info)" 30 "$PY" -m bypass_kernels.cli info
# Every test that needs a GPU carries the `gpu` mark (tests/conftest.py skips them where none is visible).
step "GPU tests: pytest -m 'gpu or tensorrt'" 90 \
  "$PY" -m pytest -q -rfEs -m "gpu or tensorrt" -p no:cacheprovider -p no:xdist \
  --continue-on-collection-errors tests/ --junitxml="$OUT/gpu_tests.xml"
# The torch.compile facts the patch is built on (hooks unguarded, a swapped submodule class guarded),
# on this machine's torch: the tests of compile-then-patch rely on them.
step "torch.compile facts on this torch (test_attach)" 30 \
  "$PY" -m pytest -q -rfEs -p no:cacheprovider -p no:xdist tests/test_attach.py \
  -k "dynamo_does_not_see or inplace_modules" --junitxml="$OUT/compile_facts.xml"
if [ -n "$warm_pid" ]; then  # nothing may compile while the benchmarks time
  stamp "waiting for the compile warm-up"
  wait "$warm_pid"
  rc=$?
  result="FAILED  "
  ((rc == 0)) && result="ok      "
  summary+=("$result compile warm-up in the background (exit $rc; done at +${SECONDS} s)")
  stamp "compile warm-up: exit $rc"
fi
step "microbenchmarks and blend_ host cost" 60 \
  "$PY" benchmarks/microbench.py --out "$OUT/microbench.csv" --host-cost-out "$OUT/host_cost.csv"
step "UNet step: SD1.5, CUDA graph and eager, every variant" 75 unet --models sd15 --modes cuda_graph eager
step "UNet step: SD1.5 compiled, reduce-overhead and default mode" 150 unet --models sd15 --modes reduce-overhead compile
step "UNet step: SDXL, CUDA graph, every variant" 60 unet --models sdxl --modes cuda_graph
step "Transformer step: Flux and SD3.5 at full width (fewer blocks), CUDA graph and eager" 60 \
  unet --models flux-reduced sd35-reduced --modes cuda_graph eager
step "A schedule per sample: blend_ with [8, T] vs [T], and a batch of 8 with 8 schedules (SD1.5, Flux)" 60 \
  "$PY" benchmarks/per_sample.py --models sd15 flux-reduced --rounds 7 --out "$OUT/per_sample.csv"

stamp "verdict"
{
  echo "# Verdict"
  echo
  "$PY" benchmarks/verdict.py --microbench "$OUT/microbench.csv" --host-cost "$OUT/host_cost.csv" \
    --unet-step "$OUT/unet_step.csv" --junit "$OUT/gpu_tests.xml" 2>&1 || echo "(verdict.py failed: exit $?)"
  echo
  echo "Steps:"
  printf -- '- %s\n' "${summary[@]}"
} >"$OUT/verdict.md"
cat "$OUT/verdict.md"
n=$(find "$OUT" -type f | wc -l)
stamp "done in ${SECONDS}s; $n files in $OUT"
((n <= 8)) || echo "warning: more than 8 files in $OUT; the device tool brings back 8"
ls -la "$OUT"
