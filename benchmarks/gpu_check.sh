#!/usr/bin/env bash
# On a machine with a CUDA GPU: build the extension, run the GPU tests and the benchmarks, and write
# results and logs to $OUT (default: gpu_out/). Budget: about 5 minutes on an H100/H200.
#   bash benchmarks/fetch_wheels.sh        # here, once: diffusers wheels into .whl/ (carried)
#   bash benchmarks/gpu_check.sh           # there: OUT=... set by the device tool
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

if ! python3 -c "import diffusers" 2>/dev/null; then
  stamp "installing carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no diffusers: run benchmarks/fetch_wheels.sh here and carry .whl"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

stamp "building the extension (CPU + CUDA kernels)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BYPASS_KERNELS_REQUIRE_NATIVE=1 MAX_JOBS=${MAX_JOBS:-16}
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m bypass_kernels.cli info | tee "$OUT/info.txt"

stamp "GPU tests"
timeout 240 python3 -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests/ --junitxml="$OUT/gpu_tests.xml" \
  | tail -25
stamp "microbenchmarks"
timeout 240 python3 benchmarks/microbench.py --out "$OUT/microbench.csv" | tail -80
stamp "UNet step benchmarks"
timeout 300 python3 benchmarks/unet_step.py --models sd15 --modes eager cuda_graph reduce-overhead \
  --loop-steps 20 --out "$OUT/unet_step.csv" | tail -30
timeout 200 python3 benchmarks/unet_step.py --models sdxl --modes eager cuda_graph \
  --variants unpatched patched_auto patched_triton patched_cuda naive_item_hook freeu \
  --loop-steps 10 --out "$OUT/unet_step.csv" | tail -20
stamp "done; files in $OUT"
ls -la "$OUT"
