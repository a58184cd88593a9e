"""The blend op: ``mid_out <- (1 - λ)·mid_out + λ·mid_in`` with λ read from a timestep-indexed table.

One entry point, :func:`blend_`, dispatches to the backend kernels (Triton, CUDA C++, CPU C++) or
to plain torch ops. While tracing (torch.compile, torch.export, ONNX export) ``auto`` takes the
plain torch ops so the compiler can fuse the blend into the mid-block's last pointwise kernel.
"""

from __future__ import annotations

import numbers

import torch

from bypass_kernels import _native, backends

__all__ = ["blend", "blend_", "blend_reference", "timestep_index_tensor", "timestep_weights"]


def timestep_index_tensor(timestep: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Table indices [n]: float32, NaN to 0, round half to even, clamp to [0, T-1] (ONNX: IsNaN/Where,
    Round, Clip, Cast). NaN reads index 0 on every backend, as the native kernels' fmax/fmin do."""
    t = timestep.reshape(-1).to(torch.float32)
    t = torch.where(torch.isnan(t), torch.zeros_like(t), t)
    return t.round().clamp(0, num_train_timesteps - 1).to(torch.long)


def timestep_weights(table: torch.Tensor, timestep: torch.Tensor, ndim: int) -> torch.Tensor:
    """λ per sample as a float32 tensor of shape [n, 1, ..., 1] (n = 1 or batch), ready to broadcast."""
    index = timestep_index_tensor(timestep, table.shape[0])
    return table.index_select(0, index).reshape(-1, *([1] * (ndim - 1)))  # ONNX: Gather


def blend_reference(
    mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The blend in plain torch ops, out of place: the definition every kernel is tested against."""
    lam = timestep_weights(table, timestep, mid_out.dim())
    return ((1.0 - lam) * mid_out.to(torch.float32) + lam * mid_in.to(torch.float32)).to(mid_out.dtype)


def _as_timestep(timestep, device: torch.device) -> torch.Tensor:
    if isinstance(timestep, torch.Tensor):
        if timestep.device != device:
            timestep = timestep.to(device, non_blocking=True)
        return timestep
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")
    # torch.full passes the value as a kernel argument: no host-to-device copy, no sync.
    return torch.full((), float(timestep), dtype=torch.float32, device=device)


def _require_tensors(mid_out, mid_in) -> None:
    if not isinstance(mid_out, torch.Tensor) or not isinstance(mid_in, torch.Tensor):
        raise TypeError(f"mid_out and mid_in: expected tensors, got {type(mid_out).__name__}, {type(mid_in).__name__}")


def _check(mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor) -> None:
    if mid_out.shape != mid_in.shape:
        raise ValueError(
            f"mid_out and mid_in must have the same shape (the mid-block must keep its input's shape), "
            f"got {tuple(mid_out.shape)} and {tuple(mid_in.shape)}"
        )
    if mid_out.dtype != mid_in.dtype or not mid_out.is_floating_point():
        raise TypeError(f"mid_out and mid_in: expected one floating dtype, got {mid_out.dtype} and {mid_in.dtype}")
    if mid_out.dim() < 1:
        raise ValueError("mid_out: expected a tensor with a batch dimension")
    if mid_in.device != mid_out.device:
        raise ValueError(f"mid_out and mid_in must be on one device, got {mid_out.device} and {mid_in.device}")
    if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.dtype != torch.float32 or table.numel() < 1:
        raise TypeError("table: expected a 1-D float32 tensor (BypassSchedule.table())")
    if table.device != mid_out.device:
        raise ValueError(f"table must be on {mid_out.device}, got {table.device}")
    n = timestep.numel()
    if timestep.dim() > 1 or (n != 1 and n != mid_out.shape[0]):
        raise ValueError(
            f"timestep: expected 1 value or one per sample ({mid_out.shape[0]}) in a 0-d or 1-D tensor, "
            f"got shape {tuple(timestep.shape)}"
        )
    if timestep.is_complex() or timestep.dtype == torch.bool:
        raise TypeError(f"timestep: expected a real number type, got {timestep.dtype}")


def _same_memory(mid_out: torch.Tensor, mid_in: torch.Tensor) -> bool:
    """True if mid_in is mid_out's own memory (nothing to blend); ValueError on a partial overlap,
    the rule of torch's own in-place ops (address ranges that intersect)."""
    if mid_out.numel() == 0 or mid_in.numel() == 0:
        return False
    a0, a1 = _address_range(mid_out)
    b0, b1 = _address_range(mid_in)
    if a1 <= b0 or b1 <= a0:
        return False
    if a0 == b0 and mid_out.stride() == mid_in.stride():
        return True
    raise ValueError("mid_out and mid_in overlap in memory (partially); pass separate tensors, or mid_in.clone()")


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    start = t.data_ptr()
    return start, start + (extent + 1) * t.element_size()


def _needs_autograd(mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (mid_out.requires_grad or mid_in.requires_grad or table.requires_grad)


def blend_(
    mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep, *, backend: str = "auto"
) -> torch.Tensor:
    """Blend in place: ``mid_out <- (1 - λ)·mid_out + λ·mid_in``; returns ``mid_out``.

    λ = ``table[clamp(round_half_to_even(float32(t)), 0, T - 1)]`` per sample; ``timestep`` is a
    number, a 0-d or [1] tensor (one λ for the batch) or a [batch] tensor (one λ per sample). A NaN
    timestep reads index 0 (every backend, compiled graphs and exported graphs alike). Arithmetic
    is float32; the result is stored in ``mid_out``'s dtype. ``mid_in`` may be ``mid_out`` itself
    (nothing changes); a partial overlap raises ``ValueError``, as torch's in-place ops do.
    """
    _require_tensors(mid_out, mid_in)
    name = backends.resolve(backend, mid_out.device)
    if not isinstance(timestep, torch.Tensor) or timestep.device != mid_out.device:
        timestep = _as_timestep(timestep, mid_out.device)
    eager = not torch.compiler.is_compiling()
    if eager and name in _NATIVE and _native.loaded and not _needs_autograd(mid_out, mid_in, table):
        _native.eager_blend_(mid_out, mid_in, table, timestep)  # checks in C++, one unboxed call
        return mid_out
    _check(mid_out, mid_in, table, timestep)
    if eager and _same_memory(mid_out, mid_in):
        return mid_out
    if _needs_autograd(mid_out, mid_in, table) or (name == "torch" and not eager):
        return mid_out.copy_(blend_reference(mid_out, mid_in, table, timestep))  # what compilers fuse
    if name == "torch":
        return _blend_torch_eager_(mid_out, mid_in, table, timestep)
    if name == "triton":
        t = timestep if timestep.dtype in backends.triton_timestep_dtypes() else timestep.to(torch.float32)
        if mid_out.dtype in backends.triton_kernel_dtypes() and _flat_layout_ok(mid_out, mid_in, t):
            backends.triton_op()(mid_out, mid_in, table, t)
            return mid_out
        # Any other dtype or strides: the right answer, written into the caller's tensor.
        return mid_out.copy_(blend_reference(mid_out, mid_in, table, timestep))
    torch.ops.bypass_kernels.blend_(mid_out, mid_in, table, timestep)  # "cpu" / "cuda" traced: the op's fake impl
    return mid_out


_NATIVE = ("cpu", "cuda")


def _blend_torch_eager_(mid_out, mid_in, table, timestep) -> torch.Tensor:
    """The reference's arithmetic (each product and the sum rounded in float32) with at most two
    temporaries: fresh large buffers cost page faults on the CPU, which made the reference's six
    5 to 20 times slower than one lerp_."""
    lam = timestep_weights(table, timestep, mid_out.dim())
    if mid_out.dtype == torch.float32:
        return mid_out.mul_(1.0 - lam).add_(mid_in * lam)
    out32 = mid_out.to(torch.float32).mul_(1.0 - lam)
    return mid_out.copy_(out32.add_(mid_in.to(torch.float32).mul_(lam)))


def blend(
    mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep, *, backend: str = "auto"
) -> torch.Tensor:
    """Out-of-place :func:`blend_`; differentiable through the torch path when gradients are needed."""
    _require_tensors(mid_out, mid_in)
    if _needs_autograd(mid_out, mid_in, table):
        timestep = _as_timestep(timestep, mid_out.device)
        _check(mid_out, mid_in, table, timestep)
        backends.resolve(backend, mid_out.device)  # still validate the name
        return blend_reference(mid_out, mid_in, table, timestep)
    return blend_(mid_out.clone(), mid_in, table, timestep, backend=backend)


def _flat_layout_ok(mid_out: torch.Tensor, mid_in: torch.Tensor, timestep: torch.Tensor) -> bool:
    """Same rule as the C++ ``flat_layout_ok``: one flat pass over memory gives the right answer.
    Strides of size-1 dimensions never address memory, so only the others must agree."""
    if not _non_overlapping_and_dense(mid_out) or not _non_overlapping_and_dense(mid_in):
        return False
    if any(n != 1 and a != b for n, a, b in zip(mid_out.shape, mid_out.stride(), mid_in.stride(), strict=True)):
        return False
    batch = mid_out.shape[0]
    if timestep.numel() == 1 or batch == 1 or mid_out.numel() == 0:
        return True
    return mid_out.stride(0) == mid_out.numel() // batch


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Strides, sorted, describe a dense block with no overlap (any permutation of a contiguous layout)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
