#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, triton, onnx, onnxruntime; no diffusers, no network),
# and a setuptools new enough for pyproject.toml's SPDX license string (its own version is unknown).
# accelerate (diffusers' model, sequential and group offload import it) with its two binary
# dependencies, built for the GPU machine's Python 3.12. Run on a machine with network access, then copy
# ".whl" to the GPU machine; about 8 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==0.42.1" importlib_metadata zipp "setuptools>=77"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "accelerate==1.15.0" psutil pyyaml
ls -la .whl
