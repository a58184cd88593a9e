"""What the GPU kernels compile to, checked without a GPU.

The Triton kernel is compiled for sm_90 by Triton's own NVIDIA backend and the CUDA kernel by nvcc;
the PTX shows 16-byte loads and stores on aligned inputs and no FMA contraction in the blend. This
proves how the code compiles, not how it runs: the GPU tests (marked ``gpu``) do that.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_ptx import MODES

ROOT = Path(__file__).resolve().parents[1]


def _ptx_ops(ptx: str) -> collections.Counter:
    """Instruction names in a PTX listing (predicates dropped): ``{"ld.global.v4.b32": 2, ...}``."""
    ops = collections.Counter()
    for line in ptx.splitlines():
        line = line.strip()
        if line.startswith("@"):
            line = line.split(None, 1)[1]
        if line and line[0].isalpha():  # not a directive, label, comment or brace
            ops[line.split()[0].rstrip(";")] += 1
    return ops


def _count(ops: collections.Counter, prefix: str) -> int:
    return sum(n for name, n in ops.items() if name.startswith(prefix))


# --- Triton -------------------------------------------------------------------------------------

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module")
def triton_ptx():
    """PTX of every Triton case, ``{(dtype name, mode, aligned): text}``, compiled in a child process:
    the interpreter (on for the CPU tests) replaces the kernel's functions with numpy ones."""
    pytest.importorskip("triton")
    cases = [(name, mode, True) for name in TRITON_TYPES.values() for mode in MODES] + [("fp16", "one-timestep", False)]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_ptx.py")), json.dumps(cases)],
        env={**os.environ, "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stderr[-4000:]
    return {tuple(case): ptx for case, ptx in json.loads(result.stdout)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", TRITON_TYPES, ids=TRITON_TYPES.values())
def test_triton_kernel_compiles_for_sm90_with_wide_accesses_and_no_fma(triton_ptx, dtype, mode):
    ops = _ptx_ops(triton_ptx[(TRITON_TYPES[dtype], mode, True)])
    elements_per_thread = 1024 // 128  # BLOCK over 4 warps of 32 threads
    wide = elements_per_thread * dtype.itemsize // 16
    assert _count(ops, "ld.global.v4") == 2 * wide, ops  # mid_out and mid_in, 16 bytes a load
    assert _count(ops, "st.global.v4") == wide, ops
    assert _count(ops, "fma") == 0, ops  # products rounded on their own, as in the reference
    assert ops["mul.rn.f32"] == 2 * elements_per_thread, ops
    assert _count(ops, "mul.rn.ftz") == 0, ops  # subnormals kept


def test_triton_kernel_compiles_for_unaligned_inputs(triton_ptx):
    ops = _ptx_ops(triton_ptx[("fp16", "one-timestep", False)])
    assert _count(ops, "st.global") > 0 and _count(ops, "fma") == 0, ops


# --- CUDA C++ -----------------------------------------------------------------------------------


def test_cuda_kernel_compiles_for_sm90_with_wide_accesses_and_no_fma(tmp_path):
    """The kernels and their launcher (blend_cuda.cu, whose entry must match blend.h's declaration); the
    one-line registration beside it (register_cuda.cpp) compiles with the extension's CUDA build."""
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if nvcc is None or not os.path.exists(nvcc):
        pytest.skip("nvcc is not installed")
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()]
    torch_include = Path(include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # A CPU build of torch lacks this one generated header; its CUDA builds define only this.
        stub = tmp_path / "c10/cuda/impl/cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(0, f"-I{tmp_path}")
    ptx_path = tmp_path / "blend_cuda.ptx"
    flags = (ROOT / "csrc/nvcc_flags.txt").read_text().split()  # exactly what setup.py passes
    assert not {"--use_fast_math", "-use_fast_math", "-ftz=true", "--ftz=true", "-fmad=true"} & set(flags)
    command = [nvcc, "-ptx", "-arch=sm_90", *flags, "-std=c++17", *includes, str(ROOT / "csrc/cuda/blend_cuda.cu")]
    result = subprocess.run([*command, "-o", str(ptx_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ptx = ptx_path.read_text()
    assert ".ftz" not in ptx  # subnormals kept: bit-exact against the float32 reference
    # One wide (16-byte) instantiation per dtype: mid_out read and written, mid_in read (non-coherent).
    wide_kernels = [k for k in ptx.split(".entry")[1:] if "ld.global.nc.v4" in k]
    assert len(wide_kernels) == 3, [k[:80] for k in ptx.split(".entry")[1:]]
    for kernel in wide_kernels:
        ops = _ptx_ops(kernel)
        assert _count(ops, "ld.global.v4") == 1 and _count(ops, "ld.global.nc.v4") == 1, ops
        assert _count(ops, "st.global.v4") == 1, ops
    ops = _ptx_ops(ptx)
    assert _count(ops, "fma") == 0 and ops["mul.rn.f32"] > 0, ops
