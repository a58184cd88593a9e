#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, triton, onnx, onnxruntime; no diffusers, no network),
# and a setuptools new enough for pyproject.toml's SPDX license string (its own version is unknown).
# Run here before a device call that carries ".whl"; pure-Python wheels, about 6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==0.42.1" importlib_metadata zipp "setuptools>=77"
ls -la .whl
