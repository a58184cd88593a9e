"""The fused Triton blend: timestep -> index -> table gather -> blend, in one launch, in place.

On CUDA it is a ``torch.library.triton_op``, which torch.compile traces into (no graph break).
Under ``TRITON_INTERPRET=1`` (how CI runs Triton on the CPU) the interpreter cannot run on fake
tensors, so there the launcher is registered as an opaque ``custom_op`` with a fake impl instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

OP_NAME = "bypass_kernels::blend_triton_"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Timestep dtypes the kernel reads directly; others are converted to float32 first (one extra op).
TIMESTEP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _sample_weight(table_ptr, T, timestep_ptr, offset):
    t = tl.load(timestep_ptr + offset).to(tl.float32)
    # Round half to even without libdevice (portable to the interpreter), in integers after a float
    # clamp that keeps the conversion exact; NaN ends at index 0. Never reads outside the table.
    f = tl.floor(t + 0.5)
    f = tl.minimum(tl.maximum(f, -1.0), T.to(tl.float32))
    i = f.to(tl.int32)
    i = tl.where((f - t == 0.5) & (i % 2 != 0), i - 1, i)
    return tl.load(table_ptr + tl.minimum(tl.maximum(i, 0), T - 1))


@triton.jit
def _mul_rn(a, b):
    # PTX mul.rn is never contracted into an FMA, and without .ftz keeps subnormals (libdevice's
    # mul_rn compiles to mul.rn.ftz under Triton's default flags).
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _mix(m, h, w, ROUNDED_PRODUCTS: tl.constexpr):
    # Compiled Triton contracts a*b + c*d into an FMA by default, one rounding off the float32
    # reference; explicitly rounded products keep it equal to the CUDA and CPU kernels. The
    # interpreter (numpy) never contracts and cannot run PTX.
    keep = 1.0 - w
    if ROUNDED_PRODUCTS:
        return _mul_rn(keep, m) + _mul_rn(w, h)
    else:
        return keep * m + w * h


@triton.jit
def blend_kernel(
    out_ptr,
    in_ptr,
    table_ptr,
    T,
    row_stride,  # elements between two samples' table rows; 0: every sample reads one row
    timestep_ptr,
    ts_stride,  # 0: every sample reads one timestep
    per_sample,
    numel,
    PER_SAMPLE: tl.constexpr,  # a timestep or a table row per sample (else one weight for all)
    BLOCK_IN_SAMPLE: tl.constexpr,  # BLOCK divides per_sample: one weight per program
    BLOCK: tl.constexpr,
    ROUNDED_PRODUCTS: tl.constexpr,  # PTX mul.rn products (compiled kernels; the interpreter has no PTX)
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if PER_SAMPLE:
        if BLOCK_IN_SAMPLE:  # noqa: SIM108 (a scalar or a block of indices, chosen at compile time)
            sample = (pid * BLOCK) // per_sample
        else:
            sample = offs // per_sample
        w = _sample_weight(table_ptr + sample * row_stride, T, timestep_ptr, sample * ts_stride)
    else:
        w = _sample_weight(table_ptr, T, timestep_ptr, 0)
    m = tl.load(out_ptr + offs, mask=mask).to(tl.float32)
    h = tl.load(in_ptr + offs, mask=mask).to(tl.float32)
    # The downcast rounds to nearest even on GPUs (the interpreter truncates bf16: tests allow 1 ulp there).
    tl.store(out_ptr + offs, _mix(m, h, w, ROUNDED_PRODUCTS).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(run, mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor) -> None:
    numel = mid_out.numel()
    if numel == 0:
        return
    t = timestep.reshape(-1)
    rows = table.shape[0] if table.dim() == 2 else 1
    per_sample_weights = t.numel() > 1 or rows > 1
    per_sample = numel // mid_out.shape[0] if per_sample_weights else numel
    block = 4096 if numel >= (1 << 22) else 1024
    grid = (triton.cdiv(numel, block),)
    run(blend_kernel)[grid](
        mid_out,
        mid_in,
        table,
        table.shape[-1],
        table.stride(0) if rows > 1 else 0,
        t,
        t.stride(0) if t.numel() > 1 else 0,
        per_sample,
        numel,
        PER_SAMPLE=per_sample_weights,
        BLOCK_IN_SAMPLE=per_sample % block == 0,
        BLOCK=block,
        ROUNDED_PRODUCTS=not INTERPRET,
        num_warps=8 if block >= 4096 else 4,
    )


if INTERPRET:

    @torch.library.custom_op(OP_NAME, mutates_args={"mid_out"})
    def blend_triton_(mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor) -> None:
        _launch(lambda kernel: kernel, mid_out, mid_in, table, timestep)

    @blend_triton_.register_fake
    def _(mid_out, mid_in, table, timestep):
        return None

else:

    @torch.library.triton_op(OP_NAME, mutates_args={"mid_out"})
    def blend_triton_(mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor) -> None:
        _launch(torch.library.wrap_triton, mid_out, mid_in, table, timestep)
