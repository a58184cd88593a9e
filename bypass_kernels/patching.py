"""Reversible patching of diffusers UNets (and pipelines) with the mid-block bypass.

``patch(unet)`` adds one submodule, ``unet._bypass`` (a :class:`BypassController` holding the λ
table as a non-persistent float32 buffer), and three forward hooks, all bound methods of it:

- a pre-hook on the UNet that keeps this call's timestep (a device tensor, no ``.item()``),
- a hook on the mid-block that blends its output with its input in place,
- an always-called hook on the UNet that drops the kept timestep.

The blend acts on the mid-block's own output, before diffusers adds any ControlNet or
T2I-Adapter residual to it. ``unpatch`` removes the hooks and the submodule and nothing else.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

from bypass_kernels import backends
from bypass_kernels.ops import _as_timestep, blend, blend_
from bypass_kernels.schedule import BypassSchedule, default_schedule

__all__ = ["BypassController", "get_schedule", "is_patched", "patch", "patched", "set_schedule", "unpatch"]

_ATTR = "_bypass"


class _TracedSlot:
    """This call's timestep (and table override) while torch.compile traces: Dynamo records writes
    to a plain object as side effects, so the compiled graph reads them straight from its inputs."""

    timestep = None
    table = None


class _ThreadSlot(threading.local):
    """The same in eager mode: one per thread, so concurrent calls each see their own."""

    timestep = None
    table = None


class BypassController(nn.Module):
    """Holds the table and the hooks of one patched UNet. Use :func:`patch`, not this class."""

    def __init__(self, schedule: BypassSchedule, backend: str, device: torch.device):
        super().__init__()
        self.schedule = schedule
        self.backend = backend
        self.register_buffer("table", schedule.table(device), persistent=False)
        self._handles: list = []
        self._eager = _ThreadSlot()
        self._traced = _TracedSlot()

    # The table stays float32 on every .to(dtype)/.half(): only its device follows the model.
    def _apply(self, fn, recurse=True):
        moved = fn(self.table)
        if moved.device != self.table.device:
            self.table = self.table.to(moved.device)
        return self

    # threading.local cannot be copied; a copy gets fresh slots (the hooks follow via the memo).
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_eager", None)
        state.pop("_traced", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._eager = _ThreadSlot()
        self._traced = _TracedSlot()

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, backend={self.backend!r}"

    # ----------------------------------------------------------------- hooks
    def _slot(self):
        return self._traced if torch.compiler.is_compiling() else self._eager

    def _keep_timestep(self, unet, args, kwargs):
        # ``bypass_table=`` on the UNet call overrides the table for that call (export uses it to
        # make the schedule a graph input); it is taken out before the UNet sees its arguments.
        table = kwargs.pop("bypass_table", None)
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) >= 2:
            timestep = args[1]
        else:
            raise TypeError(
                "bypass_kernels: the patched model was called without a timestep; call it as "
                "model(sample, timestep, ...) or model(sample=..., timestep=...)"
            )
        sample = args[0] if args else kwargs.get("sample")
        device = sample.device if isinstance(sample, torch.Tensor) else self.table.device
        slot = self._slot()
        slot.timestep = _as_timestep(timestep, device)
        slot.table = table
        return args, kwargs

    def _drop_timestep(self, unet, args, kwargs, output):
        slot = self._slot()
        slot.timestep = None
        slot.table = None

    def _blend_mid_block(self, mid_block, args, kwargs, output):
        slot = self._slot()
        timestep = slot.timestep
        if timestep is None:  # mid-block called on its own, outside the UNet's forward
            return None
        table = self.table if slot.table is None else slot.table
        mid_in = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(output, torch.Tensor) or not isinstance(mid_in, torch.Tensor):
            raise TypeError(
                "bypass_kernels: the mid-block must take a tensor as its first argument and return a tensor, "
                f"got {type(mid_in).__name__} -> {type(output).__name__}; unpatch this model"
            )
        if output.shape != mid_in.shape:
            raise ValueError(
                f"bypass_kernels: the mid-block changed the shape {tuple(mid_in.shape)} -> {tuple(output.shape)}; "
                "the bypass needs a shape-preserving mid-block. Unpatch this model with bypass_kernels.unpatch()."
            )
        if output is mid_in:  # an identity mid-block: the blend is the identity too
            return None
        if torch.is_grad_enabled() and (output.requires_grad or mid_in.requires_grad):
            return blend(output, mid_in, table, timestep, backend=self.backend)
        blend_(output, mid_in, table, timestep, backend=self.backend)
        return None

    def install(self, unet: nn.Module) -> None:
        self._handles = [
            unet.register_forward_pre_hook(self._keep_timestep, with_kwargs=True),
            unet.mid_block.register_forward_hook(self._blend_mid_block, with_kwargs=True),
            unet.register_forward_hook(self._drop_timestep, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------- resolving the target
def _find_unet(model) -> tuple[nn.Module, object | None]:
    """(the module that owns the mid-block, the pipeline it came from or None)."""
    owner = None
    target = model
    if not isinstance(model, nn.Module) and hasattr(model, "unet"):  # a DiffusionPipeline
        owner, target = model, model.unet
    target = getattr(target, "_orig_mod", target)  # a torch.compile'd module: patch the original
    if not isinstance(target, nn.Module) or not hasattr(target, "mid_block"):
        what = type(model).__name__
        raise TypeError(
            f"bypass_kernels.patch: expected a diffusers UNet (UNet2DConditionModel, UNet2DModel), a DiffusionPipeline "
            f"with a .unet, or an nn.Module with a .mid_block; got {what}, which has no mid-block"
        )
    if target.mid_block is None:
        raise ValueError(
            f"bypass_kernels.patch: {type(target).__name__} has no mid-block (mid_block is None, e.g. "
            "mid_block_type=None in its config), so there is nothing to bypass"
        )
    if not isinstance(target.mid_block, nn.Module):
        raise TypeError(f"bypass_kernels.patch: mid_block must be an nn.Module, got {type(target.mid_block).__name__}")
    return target, owner


def _check_mid_block_shape(mid_block: nn.Module) -> None:
    """Where the mid-block says its channels (diffusers' resnets do), check it keeps its input's shape."""
    resnets = getattr(mid_block, "resnets", None)
    if resnets is None or len(resnets) == 0:
        return
    c_in = getattr(resnets[0], "in_channels", None)
    c_out = getattr(resnets[-1], "out_channels", None) or c_in
    if c_in is not None and c_out != c_in:
        raise ValueError(
            f"bypass_kernels.patch: the mid-block maps {c_in} channels to {c_out}; the bypass needs a mid-block "
            "whose output has its input's shape"
        )


def _model_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_schedule(schedule, owner) -> BypassSchedule:
    if not isinstance(schedule, BypassSchedule):
        raise TypeError(
            f"schedule: expected a BypassSchedule (e.g. BypassSchedule.linear(0.3, t_min=500)), "
            f"got {type(schedule).__name__}"
        )
    T = _scheduler_T(owner)
    if T is not None and schedule.num_train_timesteps != T:
        raise ValueError(
            f"schedule: built for num_train_timesteps={schedule.num_train_timesteps}, but the pipeline's scheduler "
            f"has {T}; build it with num_train_timesteps={T}"
        )
    return schedule


def _controller(model) -> BypassController | None:
    try:
        unet, _ = _find_unet(model)
    except (TypeError, ValueError):
        return None
    controller = getattr(unet, _ATTR, None)
    return controller if isinstance(controller, BypassController) else None


def _scheduler_T(owner) -> int | None:
    """The pipeline scheduler's num_train_timesteps, or None (a bare UNet has no scheduler)."""
    config = getattr(getattr(owner, "scheduler", None), "config", None)
    T = getattr(config, "num_train_timesteps", None) if config is not None else None
    return T if isinstance(T, int) else None


# --------------------------------------------------------------------- public API
def patch(model, schedule: BypassSchedule | None = None, *, backend: str = "auto"):
    """Bypass the mid-block of ``model`` by ``schedule`` (default: :func:`default_schedule`).

    ``model``: a diffusers ``UNet2DConditionModel`` / ``UNet2DModel``, any ``nn.Module`` with a
    shape-preserving ``mid_block``, or a ``DiffusionPipeline`` (its ``unet`` is patched). Patch
    before ``torch.compile``. Patching a patched model replaces its schedule and backend; it never
    stacks. Returns ``model``. On any error the model is left exactly as it was.
    """
    unet, owner = _find_unet(model)
    if schedule is None:
        schedule = default_schedule(num_train_timesteps=_scheduler_T(owner) or 1000)
    schedule = _check_schedule(schedule, owner)
    _check_mid_block_shape(unet.mid_block)
    device = _model_device(unet)
    backends.require(backend, device.type if device.type != "meta" else None)

    controller = getattr(unet, _ATTR, None)
    if isinstance(controller, BypassController):
        if controller.table.shape[0] == schedule.num_train_timesteps:
            controller.table.copy_(schedule.table())
        else:
            controller.table = schedule.table(controller.table.device)
        controller.schedule = schedule
        controller.backend = backend
        return model
    if hasattr(unet, _ATTR):
        raise ValueError(f"bypass_kernels.patch: {type(unet).__name__} already has an attribute {_ATTR!r}")
    controller = BypassController(schedule, backend, device)
    setattr(unet, _ATTR, controller)
    controller.install(unet)
    return model


def unpatch(model):
    """Restore ``model`` exactly: hooks and the table removed; a second call does nothing. Returns ``model``."""
    unet, _ = _find_unet(model)
    controller = getattr(unet, _ATTR, None)
    if isinstance(controller, BypassController):
        controller.remove()
        delattr(unet, _ATTR)
    return model


def is_patched(model) -> bool:
    return _controller(model) is not None


def get_schedule(model) -> BypassSchedule | None:
    controller = _controller(model)
    return None if controller is None else controller.schedule


def set_schedule(model, schedule: BypassSchedule):
    """Write ``schedule`` into the patched model's table, in the same storage (no recompile, and a
    captured CUDA graph sees the new values). Returns ``model``."""
    controller = _controller(model)
    if controller is None:
        raise ValueError("set_schedule: the model is not patched; call bypass_kernels.patch(model, schedule) first")
    _, owner = _find_unet(model)
    schedule = _check_schedule(schedule, owner)
    if schedule.num_train_timesteps != controller.table.shape[0]:
        raise ValueError(
            f"set_schedule: the table holds {controller.table.shape[0]} timesteps, the schedule "
            f"{schedule.num_train_timesteps}; call patch(model, schedule) to change the length"
        )
    controller.table.copy_(schedule.table())
    controller.schedule = schedule
    return model


@contextlib.contextmanager
def patched(model, schedule: BypassSchedule | None = None, *, backend: str = "auto") -> Iterator:
    """``with patched(unet, schedule): ...`` patches for the block, then restores the previous state."""
    before = _controller(model)
    previous = (before.schedule, before.backend) if before is not None else None
    patch(model, schedule, backend=backend)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            patch(model, previous[0], backend=previous[1])
