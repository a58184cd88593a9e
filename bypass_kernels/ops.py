"""The blend op: ``mid_out <- (1 - λ)·mid_out + λ·mid_in`` with λ read from a timestep-indexed table.

One entry point, ``blend_``, dispatches to the backend kernels (Triton, CUDA C++, CPU C++) or
to plain torch ops. While tracing (torch.compile, torch.export, ONNX export) ``auto`` takes the
plain torch ops so the compiler can fuse the blend into the mid-block's last pointwise kernel.
"""

from __future__ import annotations

import numbers

import torch

from bypass_kernels import _native, backends
from bypass_kernels.torch_blend import blend_reference, timestep_index_tensor, timestep_weights

_NATIVE = backends.NATIVE  # backends whose eager calls take the C++ op's unboxed path

__all__ = ["blend", "blend_", "blend_reference", "timestep_index_tensor", "timestep_weights"]


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
    if not isinstance(table, torch.Tensor) or table.dim() not in (1, 2) or table.dtype != torch.float32:
        raise TypeError(
            "table: expected a float32 tensor, 1-D [T] (BypassSchedule.table()) or 2-D [rows, T] with a row per "
            "sample (BypassSchedule.stack)"
        )
    if table.shape[-1] < 1 or (table.dim() == 2 and table.shape[0] not in (1, mid_out.shape[0])):
        raise ValueError(
            f"table: expected [T] or [rows, T] with rows 1 or the batch ({mid_out.shape[0]}) and T >= 1, "
            f"got shape {tuple(table.shape)}"
        )
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

    λ = ``table[clamp(round_half_to_even(float32(t)), 0, T - 1)]`` per sample; ``table`` is [T], or
    [rows, T] with a row per sample (sample b reads row b; rows 1 or the batch); ``timestep`` is a
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
    if _needs_autograd(mid_out, mid_in, table):
        return mid_out.copy_(blend_reference(mid_out, mid_in, table, timestep))
    return backends.BACKENDS[name].kernel(mid_out, mid_in, table, timestep)


def blend(
    mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep, *, backend: str = "auto"
) -> torch.Tensor:
    """Out-of-place ``blend_``; differentiable through the torch path when gradients are needed."""
    _require_tensors(mid_out, mid_in)
    if _needs_autograd(mid_out, mid_in, table):
        timestep = _as_timestep(timestep, mid_out.device)
        _check(mid_out, mid_in, table, timestep)
        backends.resolve(backend, mid_out.device)  # still validate the name
        return blend_reference(mid_out, mid_in, table, timestep)
    return blend_(mid_out.clone(), mid_in, table, timestep, backend=backend)
