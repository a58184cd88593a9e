"""Reversible patching of diffusers UNets (and pipelines) with the mid-block bypass.

``patch(unet)`` attaches a :class:`BypassController` (``unet._bypass``, a plain object holding the
schedule and its λ table) with two forward hooks, both bound methods of the controller:

- a pre-hook on the UNet that keeps this call's timestep (a device tensor, no ``.item()``),
- a hook on the mid-block that reads it, consumes it, and blends the mid-block's output with its
  input in place.

Hooks, not forward replacement, because ``Module._call_impl`` runs them whatever replaced
``forward`` (accelerate's and diffusers' offload hooks do). Dynamo does not guard on hooks, so a
model compiled before ``patch`` would keep running its unpatched graph: ``patch`` and ``unpatch``
therefore also swap the class of the UNet and of its mid-block for a same-named marker subclass
(no methods of its own), which Dynamo does guard on. Every patch or unpatch thus changes what the
compiled code was specialised on, and the next call recompiles instead of silently running stale
code. The table is not a module buffer: a host copy is always materialised (so a model patched on
``meta`` needs nothing after ``to_empty``/``load_state_dict``), and a copy is made on each device
the blend runs on, where ``set_schedule`` writes in place (same storage: no recompile, captured CUDA
graphs see the new values), whatever moved the weights (``.to``, model/sequential/group offload).

The blend acts on the mid-block's own output, before diffusers adds any ControlNet or
T2I-Adapter residual to it. ``unpatch`` removes the hooks, restores both classes and drops
``unet._bypass``: the model is exactly as it was.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from bypass_kernels import backends
from bypass_kernels.ops import _as_timestep, blend, blend_
from bypass_kernels.schedule import BypassSchedule, default_schedule

__all__ = ["BypassController", "get_schedule", "is_patched", "patch", "patched", "set_schedule", "unpatch"]

_ATTR = "_bypass"
_HOST = torch.device("cpu")


class _TracedSlot:
    """This call's timestep (and table override) while torch.compile traces: Dynamo records writes
    to a plain object as side effects, so the compiled graph reads them straight from its inputs."""

    timestep = None
    table = None


class _ThreadSlot(threading.local):
    """The same in eager mode: one per thread, so concurrent calls each see their own."""

    timestep = None
    table = None


# --------------------------------------------------------------------- marker classes
_MARKERS: dict[type, type] = {}


def _marker_class(base: type) -> type:
    """A subclass of ``base`` with its name and module and no methods of its own but pickling: what a
    patched module's ``__class__`` becomes, so Dynamo's type guards see patch and unpatch. It keeps
    ``isinstance``, ``type(m).__name__`` (diffusers writes it into configs) and every behaviour."""
    marker = _MARKERS.get(base)
    if marker is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "__reduce_ex__": _reduce_marked,
            "_bypass_base": base,
        }
        marker = _MARKERS[base] = type(base.__name__, (base,), namespace)
    return marker


def _reduce_marked(self, protocol):
    # Pickle and deepcopy name the base class (importable), then rebuild the marker on load.
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_marked, (type(self)._bypass_base,), *rest)


def _new_marked(base: type):
    return object.__new__(_marker_class(base))


# --------------------------------------------------------------------- the controller
class BypassController:
    """The state and hooks of one patched UNet. Use :func:`patch`, not this class."""

    def __init__(self, schedule: BypassSchedule, backend: str, pipeline=None):
        self.schedule = schedule
        self.backend = backend
        self._tables: dict[torch.device, torch.Tensor] = {_HOST: schedule.table(_HOST)}
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._handles: list = []
        self._classes: list[tuple[nn.Module, type]] = []
        self._eager = _ThreadSlot()
        self._traced = _TracedSlot()

    @property
    def table(self) -> torch.Tensor:
        """The host (CPU) copy of the λ table: float32, length T."""
        return self._tables[_HOST]

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The table on ``device``, copied there once; later schedules are written into that copy."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._tables[_HOST].to(device)
        return table

    def write(self, schedule: BypassSchedule) -> None:
        """Write ``schedule`` into every copy of the table, in place."""
        host = schedule.table(_HOST)
        for table in self._tables.values():
            table.copy_(host)
        self.schedule = schedule

    # threading.local cannot be copied or pickled; a copy gets fresh slots (the hooks follow via the memo).
    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_eager", "_traced", "_pipeline"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._eager = _ThreadSlot()
        self._traced = _TracedSlot()
        self._pipeline = None

    def __repr__(self) -> str:
        return f"BypassController(schedule={self.schedule!r}, backend={self.backend!r})"

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
        if self._pipeline is not None and not torch.compiler.is_compiling():
            _check_pipeline_T(self._pipeline(), self.schedule)
        sample = args[0] if args else kwargs.get("sample")
        device = sample.device if isinstance(sample, torch.Tensor) else _HOST
        slot = self._slot()
        slot.timestep = _as_timestep(timestep, device)
        slot.table = table
        return args, kwargs

    def _take_timestep(self):
        """This UNet call's (timestep, table override), consumed: the mid-block runs once per call,
        and a later call of the mid-block on its own is not blended."""
        slot = self._slot()
        timestep, table = slot.timestep, slot.table
        if timestep is None and not torch.compiler.is_compiling():
            # The UNet's pre-hook ran compiled (torch.compile'd module) and the forward fell back to eager.
            slot = self._traced
            timestep, table = slot.timestep, slot.table
        slot.timestep = None
        slot.table = None
        return timestep, table

    def _blend_mid_block(self, mid_block, args, kwargs, output):
        timestep, table = self._take_timestep()
        if timestep is None:  # mid-block called on its own, outside the UNet's forward
            return None
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
        if table is None:
            table = self.table_on(output.device)
        timestep = _per_sample(timestep, output.shape[0])
        if torch.is_grad_enabled() and (output.requires_grad or mid_in.requires_grad):
            return blend(output, mid_in, table, timestep, backend=self.backend)
        blend_(output, mid_in, table, timestep, backend=self.backend)
        return None

    # ----------------------------------------------------------------- install / remove
    def install(self, unet: nn.Module) -> None:
        """Attach to ``unet``: all or nothing (on any failure the model is left as it was)."""
        try:
            setattr(unet, _ATTR, self)
            for module in (unet, unet.mid_block):
                base = type(module)
                module.__class__ = _marker_class(base)
                self._classes.append((module, base))
            self._handles.append(unet.register_forward_pre_hook(self._keep_timestep, with_kwargs=True))
            self._handles.append(unet.mid_block.register_forward_hook(self._blend_mid_block, with_kwargs=True))
        except Exception as exc:
            self.remove(unet)
            raise TypeError(
                f"bypass_kernels.patch: cannot attach to {type(unet).__name__} ({type(exc).__name__}: {exc}); "
                "the model is unchanged. Patch the eager diffusers module (not a TorchScript or traced one)."
            ) from exc

    def remove(self, unet: nn.Module) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        for module, base in reversed(self._classes):
            module.__class__ = base
        self._handles = []
        self._classes = []
        if unet.__dict__.get(_ATTR) is self:
            del unet.__dict__[_ATTR]


def _per_sample(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """Video UNets fold frames into the batch before the mid-block (sample-major, as diffusers'
    UNet3D, SVD, AnimateDiff and I2VGen-XL do): a [B] timestep becomes [B·F], each sample's value
    repeated over its frames. Shapes only: no host sync, no graph break."""
    n = timestep.numel()
    if n in (1, batch) or batch % n != 0:
        return timestep  # blend_ rejects the last case with a clear message
    return timestep.reshape(-1).repeat_interleave(batch // n)


# --------------------------------------------------------------------- resolving the target
def _find_unet(model, caller: str = "patch") -> tuple[nn.Module, object | None]:
    """(the module that owns the mid-block, the pipeline it came from or None)."""
    owner = None
    target = model
    if not isinstance(model, nn.Module) and hasattr(model, "unet"):  # a DiffusionPipeline
        owner, target = model, model.unet
    target = getattr(target, "_orig_mod", target)  # a torch.compile'd module: patch the original
    if not isinstance(target, nn.Module) or not hasattr(target, "mid_block"):
        what = type(model).__name__
        raise TypeError(
            f"bypass_kernels.{caller}: expected a diffusers UNet (UNet2DConditionModel, UNet2DModel, video UNets), "
            f"a DiffusionPipeline with a .unet, or an nn.Module with a .mid_block; got {what}, which has no mid-block"
        )
    if target.mid_block is None:
        raise ValueError(
            f"bypass_kernels.{caller}: {type(target).__name__} has no mid-block (mid_block is None, e.g. "
            "mid_block_type=None in its config), so there is nothing to bypass"
        )
    if not isinstance(target.mid_block, nn.Module):
        raise TypeError(
            f"bypass_kernels.{caller}: mid_block must be an nn.Module, got {type(target.mid_block).__name__}"
        )
    return target, owner


def _check_attachable(unet: nn.Module) -> None:
    for name, module in (("model", unet), ("mid_block", unet.mid_block)):
        if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise TypeError(
                f"bypass_kernels.patch: the {name} is a {type(module).__name__}, whose calls cannot be hooked; "
                "patch the eager diffusers module, then script, trace or export it"
            )


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
    return _HOST


def _scheduler_T(owner) -> int | None:
    """The pipeline scheduler's num_train_timesteps, or None (a bare UNet has no scheduler)."""
    config = getattr(getattr(owner, "scheduler", None), "config", None)
    T = getattr(config, "num_train_timesteps", None) if config is not None else None
    return T if isinstance(T, int) else None


def _check_pipeline_T(owner, schedule: BypassSchedule) -> None:
    T = _scheduler_T(owner)
    if T is not None and schedule.num_train_timesteps != T:
        raise ValueError(
            f"schedule: built for num_train_timesteps={schedule.num_train_timesteps}, but the pipeline's scheduler "
            f"has {T}; build it with num_train_timesteps={T} and call bypass_kernels.set_schedule(pipe, schedule)"
        )


def _check_schedule(schedule, owner) -> BypassSchedule:
    if not isinstance(schedule, BypassSchedule):
        raise TypeError(
            f"schedule: expected a BypassSchedule (e.g. BypassSchedule.linear(0.3, t_min=500)), "
            f"got {type(schedule).__name__}"
        )
    _check_pipeline_T(owner, schedule)
    return schedule


def _controller(model) -> BypassController | None:
    try:
        unet, _ = _find_unet(model)
    except (TypeError, ValueError):
        return None
    controller = unet.__dict__.get(_ATTR)
    return controller if isinstance(controller, BypassController) else None


# --------------------------------------------------------------------- public API
def patch(model, schedule: BypassSchedule | None = None, *, backend: str = "auto"):
    """Bypass the mid-block of ``model`` by ``schedule`` (default: :func:`default_schedule`).

    ``model``: a diffusers UNet (``UNet2DConditionModel``, ``UNet2DModel``, the video UNets), any
    ``nn.Module`` with a shape-preserving ``mid_block``, a ``DiffusionPipeline`` (its ``unet`` is
    patched), or any of these compiled: the next call recompiles. Patching a patched model replaces
    its schedule and backend; it never stacks. Returns ``model``. On any error the model is left
    exactly as it was and the error is a ``TypeError`` or ``ValueError`` naming the cause.
    """
    unet, owner = _find_unet(model)
    if schedule is None:
        schedule = default_schedule(num_train_timesteps=_scheduler_T(owner) or 1000)
    schedule = _check_schedule(schedule, owner)
    _check_attachable(unet)
    _check_mid_block_shape(unet.mid_block)
    device = _model_device(unet)
    backends.require(backend, device.type if device.type != "meta" else None)

    controller = _controller(unet)
    if controller is not None:
        if controller.table.shape[0] == schedule.num_train_timesteps:
            controller.write(schedule)
        else:  # a new length: new tables (one recompile for compiled models)
            controller._tables = {_HOST: schedule.table(_HOST)}
            controller.schedule = schedule
        controller.backend = backend
        if owner is not None:
            controller._pipeline = weakref.ref(owner)
        return model
    if _ATTR in unet.__dict__ or hasattr(type(unet), _ATTR):
        raise ValueError(f"bypass_kernels.patch: {type(unet).__name__} already has an attribute {_ATTR!r}")
    BypassController(schedule, backend, owner).install(unet)
    return model


def unpatch(model):
    """Restore ``model`` exactly: hooks removed, classes restored, the controller dropped; a second
    call does nothing. Compiled models recompile on their next call. Returns ``model``."""
    unet, _ = _find_unet(model, "unpatch")
    controller = _controller(unet)
    if controller is not None:
        controller.remove(unet)
    return model


def is_patched(model) -> bool:
    return _controller(model) is not None


def get_schedule(model) -> BypassSchedule | None:
    controller = _controller(model)
    return None if controller is None else controller.schedule


def set_schedule(model, schedule: BypassSchedule):
    """Write ``schedule`` into the patched model's tables, in the same storage (no recompile, and a
    captured CUDA graph sees the new values). Returns ``model``."""
    controller = _controller(model)
    if controller is None:
        raise ValueError("set_schedule: the model is not patched; call bypass_kernels.patch(model, schedule) first")
    _, owner = _find_unet(model, "set_schedule")
    schedule = _check_schedule(schedule, owner)
    if schedule.num_train_timesteps != controller.table.shape[0]:
        raise ValueError(
            f"set_schedule: the table holds {controller.table.shape[0]} timesteps, the schedule "
            f"{schedule.num_train_timesteps}; call patch(model, schedule) to change the length"
        )
    controller.write(schedule)
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
