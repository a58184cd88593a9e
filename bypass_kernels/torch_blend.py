"""The blend in plain torch ops: the reference every kernel is tested against, the ``torch`` backend's
eager form, and the flat-layout rule the fused kernels share. Imports nothing else of the package, so
both ``ops`` and ``backends`` can use it."""

from __future__ import annotations

import torch

# Traced inside compiled models: names bound here, not read as torch.<name>. Dynamo guards a module
# that two frames' globals both reach (torch, from this module and from torch.nn) with a guard written
# in Python, run on every compiled call; a bound function or dtype is a plain identity check instead.
_where, _isnan, _zeros_like = torch.where, torch.isnan, torch.zeros_like
_float32, _long = torch.float32, torch.long


def timestep_index_tensor(timestep: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Table indices [n]: float32, NaN to 0, round half to even, clamp to [0, T-1] (ONNX: IsNaN/Where,
    Round, Clip, Cast). NaN reads index 0 on every backend, as the native kernels' fmax/fmin do."""
    t = timestep.reshape(-1).to(_float32)
    t = _where(_isnan(t), _zeros_like(t), t)
    return t.round().clamp(0, num_train_timesteps - 1).to(_long)


def timestep_weights(table: torch.Tensor, timestep: torch.Tensor, ndim: int) -> torch.Tensor:
    """λ per sample as a float32 tensor of shape [n, 1, ..., 1] (n = 1 or batch), ready to broadcast.
    ``table``: [T], one schedule for every sample, or [rows, T], sample b reading row b (rows = batch)."""
    if table.dim() == 2 and table.shape[0] == 1:  # one row: the 1-D case
        table = table.reshape(-1)
    index = timestep_index_tensor(timestep, table.shape[-1])
    if table.dim() == 1:
        lam = table.index_select(0, index)  # ONNX: Gather
    else:  # row b at its own index (one timestep for all rows, or one per row); ONNX: Expand, GatherElements
        lam = table.gather(1, index.reshape(-1, 1).expand(table.shape[0], 1))
    return lam.reshape(-1, *([1] * (ndim - 1)))


def blend_reference(
    mid_out: torch.Tensor, mid_in: torch.Tensor, table: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The blend in plain torch ops, out of place: the definition every kernel is tested against."""
    lam = timestep_weights(table, timestep, mid_out.dim())
    return ((1.0 - lam) * mid_out.to(_float32) + lam * mid_in.to(_float32)).to(mid_out.dtype)


def blend_torch_eager_(mid_out, mid_in, table, timestep) -> torch.Tensor:
    """The reference's arithmetic (each product and the sum rounded in float32) with at most two
    temporaries: fresh large buffers cost page faults on the CPU, which made the reference's six
    5 to 20 times slower than one lerp_."""
    lam = timestep_weights(table, timestep, mid_out.dim())
    if mid_out.dtype == torch.float32:
        return mid_out.mul_(1.0 - lam).add_(mid_in * lam)
    out32 = mid_out.to(torch.float32).mul_(1.0 - lam)
    return mid_out.copy_(out32.add_(mid_in.to(torch.float32).mul_(lam)))


def per_sample_weights(table: torch.Tensor, timestep: torch.Tensor) -> bool:
    """Whether samples may take different λ: a timestep per sample, or a table row per sample."""
    return timestep.numel() > 1 or (table.dim() == 2 and table.shape[0] > 1)


def flat_layout_ok(mid_out: torch.Tensor, mid_in: torch.Tensor, per_sample: bool) -> bool:
    """Same rule as the C++ ``flat_layout_ok``: one flat pass over memory gives the right answer.
    Strides of size-1 dimensions never address memory, so only the others must agree. ``per_sample``:
    samples may take different λ (``per_sample_weights``), so each must be one chunk of memory."""
    if not _non_overlapping_and_dense(mid_out) or not _non_overlapping_and_dense(mid_in):
        return False
    if any(n != 1 and a != b for n, a, b in zip(mid_out.shape, mid_out.stride(), mid_in.stride(), strict=True)):
        return False
    batch = mid_out.shape[0]
    if not per_sample or batch == 1 or mid_out.numel() == 0:
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
