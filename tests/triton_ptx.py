"""Compile the Triton blend kernel for sm_90 without a GPU and print its PTX (used by test_codegen).

Usage: ``TRITON_INTERPRET=0 python tests/triton_ptx.py '[["fp16", "one-timestep", true], ...]'``
prints ``[[case, ptx], ...]`` as JSON; exits 3 with a reason when this Triton cannot do it.
"""

from __future__ import annotations

import json
import sys

MODES = {"one-timestep": (False, True), "per-sample-block": (True, True), "per-sample-element": (True, False)}
POINTERS = {"table_ptr": "fp32", "timestep_ptr": "fp32"}


def compile_ptx(dtype: str, mode: str, aligned: bool) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bypass_kernels import triton_kernels

    per_sample, block_in_sample = MODES[mode]
    constexprs = {"PER_SAMPLE": per_sample, "BLOCK_IN_SAMPLE": block_in_sample, "BLOCK": 1024, "ROUNDED_PRODUCTS": True}
    pointers = {"out_ptr": dtype, "in_ptr": dtype, **POINTERS}
    signature, values, attrs = {}, {}, {}
    for i, param in enumerate(triton_kernels.blend_kernel.params):
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constexprs[name]
            continue
        signature[name] = "*" + pointers[name] if name in pointers else "i32"
        # What Triton's launcher infers from 16-byte-aligned pointers and sizes divisible by 16.
        if aligned or name in POINTERS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=triton_kernels.blend_kernel, signature=signature, constexprs=values, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def main() -> int:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"this triton has no ahead-of-time compiler API ({exc})")
        return 3
    cases = json.loads(sys.argv[1])
    print(json.dumps([[case, compile_ptx(*case)] for case in cases]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
