#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the extension, run the GPU tests and the benchmarks, and write
# results and logs to $OUT (default: gpu_out/). After the build (about a minute), steps run most
# important first, each capped by what is left of GPU_CHECK_BUDGET_S (default 330 s), so a short
# lease still brings back the tests and the microbenchmarks. At most 7 files land in $OUT.
#   bash benchmarks/fetch_wheels.sh        # here, once: diffusers wheels into .whl/ (carried)
#   bash benchmarks/gpu_check.sh           # there: OUT=... set by the device tool
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-330}))
stamp() { echo "== $(date -u +%H:%M:%S) (+${SECONDS}s) $*"; }
# step CAP_S command...: run with a timeout of CAP_S or what is left of the budget, whichever is less.
step() {
  local cap=$1 left=$((deadline - SECONDS)); shift
  if ((left < 20)); then stamp "skipped (budget spent): $*"; return 0; fi
  timeout $((cap < left ? cap : left)) "$@" || stamp "exit $? from: $*"
}

if ! python3 -c "import diffusers" 2>/dev/null; then
  stamp "installing carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no diffusers: run benchmarks/fetch_wheels.sh here and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

stamp "building the extension (CPU + CUDA kernels)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BYPASS_KERNELS_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-16}
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m bypass_kernels.cli info

stamp "GPU tests"
step 150 python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/ --junitxml="$OUT/gpu_tests.xml"
stamp "microbenchmarks"
step 90 python3 benchmarks/microbench.py --out "$OUT/microbench.csv"
stamp "UNet step: SD1.5 and SDXL shapes, eager and a manual CUDA graph, every variant"
step 120 python3 benchmarks/unet_step.py --models sd15 sdxl --modes eager cuda_graph --loop-steps 20 \
  --out "$OUT/unet_step.csv"
stamp "UNet step: SD1.5 shape compiled (default and reduce-overhead), unpatched and patched_auto"
step 200 python3 benchmarks/unet_step.py --models sd15 --modes compile reduce-overhead --loop-steps 20 \
  --out "$OUT/unet_step.csv"
stamp "done; files in $OUT"
ls -la "$OUT"
