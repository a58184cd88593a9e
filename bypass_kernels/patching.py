"""Reversible patching of diffusers models (and pipelines) with the bypass.

``patch(model)`` finds the span to bypass and where the timestep enters (:mod:`bypass_kernels.targets`),
then attaches a :class:`~bypass_kernels.attach.BypassController` (hooks, a per-thread record of
each call, the λ tables; :mod:`bypass_kernels.attach` says how), kept as ``model._bypass``.
``unpatch`` removes every hook, restores the one swapped class and drops ``model._bypass``: the
model is exactly as it was.

The table is not a module buffer: a host copy is always there (so a model patched on ``meta``
needs nothing after ``to_empty``/``load_state_dict``), and a copy is made on each device the
blend runs on, where ``set_schedule`` writes in place (same storage: no recompile, and captured
CUDA graphs see the new values), whatever moved the weights (``.to``, model/sequential/group offload).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from bypass_kernels import backends, targets
from bypass_kernels.attach import BypassController, check_scheduler_T, owner_of, scheduler_T
from bypass_kernels.schedule import BypassSchedule, default_schedule

__all__ = ["BypassController", "get_schedule", "is_patched", "patch", "patched", "set_schedule", "unpatch"]

_ATTR = "_bypass"
_LINK = "_bypass_link"


class PipelineLink:
    """Kept on a pipeline patched through ``patch(pipe)``: copies and pickles of the pipeline relink
    their own model's controller to the copied pipeline, so the scheduler check survives them."""

    def __init__(self, pipeline, controller: BypassController):
        self.pipeline = pipeline
        self.controller = controller

    def __getstate__(self):
        return {"pipeline": self.pipeline, "controller": self.controller}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.controller.link_pipeline(self.pipeline)

    def __repr__(self) -> str:
        return f"PipelineLink({type(self.pipeline).__name__})"


def _check_attachable(target: targets.Target) -> None:
    for name, module in (("model", target.owner), *((f"block {type(m).__name__}", m) for m in target.span.modules)):
        if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise TypeError(
                f"bypass_kernels.patch: the {name} is a {type(module).__name__}, whose calls cannot be hooked; "
                "patch the eager diffusers module, then script, trace or export it"
            )


def _check_span_shape(target: targets.Target) -> None:
    """Where a UNet's mid-block says its channels (diffusers' resnets do), check it keeps its input's shape."""
    resnets = getattr(target.span.first, "resnets", None)
    if target.span.first is not target.span.last or resnets is None or len(resnets) == 0:
        return
    c_in = getattr(resnets[0], "in_channels", None)
    c_out = getattr(resnets[-1], "out_channels", None) or c_in
    if c_in is not None and c_out != c_in:
        raise ValueError(
            f"bypass_kernels.patch: the mid-block maps {c_in} channels to {c_out}; the bypass needs a mid-block "
            "whose output has its input's shape"
        )


def _writes_in_place(target: targets.Target) -> bool:
    """Whether a block of the span holds a module set to work in place (``inplace=True``), which
    may overwrite the span's input: then the span's input is copied before the span runs."""
    return any(getattr(m, "inplace", False) is True for block in target.span.modules for m in block.modules())


def _model_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _as_schedule(schedule, pipeline) -> BypassSchedule:
    """A BypassSchedule from what ``patch``/``set_schedule`` were given: a schedule, a spec string
    as the command line takes it (``"linear:0.3:500"``), or a dict from ``to_dict()``."""
    T = scheduler_T(pipeline) or 1000
    if schedule is None:
        return default_schedule(num_train_timesteps=T)
    if isinstance(schedule, (str, dict)):
        schedule = BypassSchedule.parse(schedule, num_train_timesteps=T)
    if not isinstance(schedule, BypassSchedule):
        raise TypeError(
            "schedule: expected a BypassSchedule (e.g. BypassSchedule.linear(0.3, t_min=500)), a spec such as "
            f"'linear:0.3:500', or a dict from BypassSchedule.to_dict(); got {type(schedule).__name__}"
        )
    check_scheduler_T(pipeline, schedule)
    return schedule


def _controller(model) -> BypassController | None:
    try:
        owner, _ = targets.find_owner(model)
    except TypeError:
        return None
    controller = owner.__dict__.get(_ATTR)
    return controller if isinstance(controller, BypassController) else None


def _refuse_shared(target: targets.Target, mine: BypassController | None) -> None:
    """A block (or carrier) already bypassed through another model: two controllers on one module
    would each blend it; refused before anything changes."""
    for module in (target.owner, target.trigger, target.span.first, target.span.last):
        other = owner_of(module)
        if other is not None and other is not mine:
            raise ValueError(
                f"bypass_kernels.patch: {type(module).__name__} is already bypassed through another model that "
                "shares it; unpatch that model first (bypass_kernels.unpatch), or patch only one of them"
            )


def _link(controller: BypassController, pipeline) -> None:
    controller.link_pipeline(pipeline)
    if pipeline is not None:
        # a pipeline-like object with __slots__ takes no link (and gets no scheduler check in copies)
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(pipeline, _LINK, PipelineLink(pipeline, controller))


def _unlink(pipeline) -> None:
    if pipeline is not None and isinstance(getattr(pipeline, "__dict__", {}).get(_LINK), PipelineLink):
        del pipeline.__dict__[_LINK]


# --------------------------------------------------------------------- public API
def patch(
    model,
    schedule: BypassSchedule | str | dict | None = None,
    *,
    backend: str = "auto",
    timestep_module: str | None = None,
):
    """Bypass the mid-block of ``model`` by ``schedule`` (default: :func:`default_schedule`).

    ``model``: a diffusers UNet (``UNet2DConditionModel``, ``UNet2DModel``, the video UNets), any
    ``nn.Module`` with a shape-preserving ``mid_block``, a ``DiffusionPipeline`` (its ``unet`` is
    patched), or any of these compiled: the next call recompiles. ``schedule``: a
    :class:`BypassSchedule`, a spec string as the command line takes it (``"linear:0.3:500"``), or
    a dict from ``to_dict()``. ``timestep_module``: for a model this package does not know, the
    name of the submodule whose first argument is the call's timestep (a UNet's ``time_proj``); the
    timestep is then read inside the model's forward, which costs nothing under torch.compile.
    Patching a patched model replaces its schedule and backend; it never stacks. Returns ``model``.
    On any error the model is left exactly as it was and the error is a ``TypeError`` or
    ``ValueError`` naming the cause.
    """
    target = targets.resolve(model, timestep_module=timestep_module)
    schedule = _as_schedule(schedule, target.pipeline)
    _check_attachable(target)
    _check_span_shape(target)
    device = _model_device(target.owner)
    backends.require(backend, device.type if device.type != "meta" else None)

    controller = _controller(target.owner)
    _refuse_shared(target, controller)
    moved = controller is not None and controller.carrier.module is not target.carrier.module
    if timestep_module is not None and moved:
        unpatch(target.owner)  # asked for another timestep module: attach anew
        controller = None
    if controller is not None:
        controller.write(schedule)
        controller.backend = backend
        if target.pipeline is not None:
            _link(controller, target.pipeline)
        return model
    if _ATTR in target.owner.__dict__ or hasattr(type(target.owner), _ATTR):
        raise ValueError(f"bypass_kernels.patch: {type(target.owner).__name__} already has an attribute {_ATTR!r}")
    controller = BypassController(
        schedule,
        backend,
        owner=target.owner,
        carrier=target.carrier,
        span=target.span,
        trigger=target.trigger,
        clone_inputs=_writes_in_place(target),
    )
    try:
        controller.install()
        target.owner.__dict__[_ATTR] = controller
    except Exception as exc:
        controller.remove()
        target.owner.__dict__.pop(_ATTR, None)
        raise TypeError(
            f"bypass_kernels.patch: cannot attach to {type(target.owner).__name__} ({type(exc).__name__}: {exc}); "
            "the model is unchanged. Patch the eager diffusers module (not a TorchScript or traced one)."
        ) from exc
    _link(controller, target.pipeline)
    return model


def unpatch(model):
    """Restore ``model`` exactly: hooks removed, the swapped class restored, the controller dropped;
    a second call does nothing. Compiled models recompile on their next call. Returns ``model``."""
    owner, pipeline = targets.find_owner(model, "unpatch")
    controller = _controller(owner)
    if controller is not None:
        controller.remove()
        del owner.__dict__[_ATTR]
        _unlink(pipeline)
        _unlink(controller.pipeline)
    return model


def is_patched(model) -> bool:
    return _controller(model) is not None


def get_schedule(model) -> BypassSchedule | None:
    controller = _controller(model)
    return None if controller is None else controller.schedule


def set_schedule(model, schedule: BypassSchedule | str | dict):
    """Write ``schedule`` into the patched model's tables, in the same storage (no recompile, and a
    captured CUDA graph sees the new values). Returns ``model``."""
    controller = _controller(model)
    if controller is None:
        raise ValueError("set_schedule: the model is not patched; call bypass_kernels.patch(model, schedule) first")
    _, pipeline = targets.find_owner(model, "set_schedule")
    schedule = _as_schedule(schedule, pipeline if pipeline is not None else controller.pipeline)
    if schedule.num_train_timesteps != controller.table.shape[0]:
        raise ValueError(
            f"set_schedule: the table holds {controller.table.shape[0]} timesteps, the schedule "
            f"{schedule.num_train_timesteps}; call patch(model, schedule) to change the length"
        )
    controller.write(schedule)
    return model


@contextlib.contextmanager
def patched(model, schedule: BypassSchedule | str | dict | None = None, *, backend: str = "auto") -> Iterator:
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
