"""Loads the optional C++/CUDA extension and registers the fake implementation of its op.

The schema ``bypass_kernels::blend_`` is declared once, in csrc/ops.cpp. Nothing here queries a
device; a missing extension only records why it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

OP_NAME = "bypass_kernels::blend_"
BUILD_HINT = "rebuild with `pip install --no-build-isolation -e .` (a C++ compiler; nvcc and a CUDA torch for CUDA)"


def build_report() -> dict | None:
    """What the last build of the extension built and what failed, with the reasons (written by setup.py
    beside the extension); None where there is no report (an older build, or none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_report.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_failure(kernel: str) -> str | None:
    """Why ``kernel`` ("cpu" or "cuda") failed to build, from the build report, else None."""
    return ((build_report() or {}).get("failed") or {}).get(kernel)


load_error: str | None = None
if os.environ.get("BYPASS_KERNELS_DISABLE_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
    load_error = "disabled by BYPASS_KERNELS_DISABLE_NATIVE"
elif importlib.util.find_spec("bypass_kernels._C") is None:
    failure = build_failure("cpu")
    load_error = (
        "the native extension bypass_kernels._C is not installed ("
        + (f"its build failed: {failure}" if failure else "it was not built: no C++ compiler or torch at build time")
        + f"); {BUILD_HINT}"
    )
else:
    try:
        from bypass_kernels import _C  # loading it runs the TORCH_LIBRARY registrations
    except ImportError as exc:
        load_error = f"the native extension bypass_kernels._C is installed but does not load ({exc}); {BUILD_HINT}"

loaded = load_error is None
eager_blend_ = _C.eager_blend_ if loaded else None  # the op through the dispatcher's unboxed path


def cpu_isa() -> str | None:
    """The CPU kernel's code path, chosen when the extension loads: "avx2" (AVX2 + F16C, where the CPU has
    both) or "generic" (any CPU; forced by BYPASS_KERNELS_CPU_ISA=generic); None without the extension."""
    query = getattr(_C, "cpu_isa", None) if loaded else None  # None too from an extension built before it
    return query() if query is not None else None


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return loaded and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key)


if loaded:

    @torch.library.register_fake(OP_NAME)
    def _blend_fake(mid_out, mid_in, table, timestep):
        # In-place op with no outputs: shapes are checked by the real kernels and by ops.blend_.
        return None
