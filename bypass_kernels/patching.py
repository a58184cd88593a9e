"""Reversible patching of diffusers models (and pipelines) with the bypass.

``patch(model)`` finds the span to bypass and where the timestep enters (``bypass_kernels.targets``),
then attaches a ``BypassController`` (three roles in their modules'
forwards, a per-thread record of each call, the λ tables; attached.py, records.py and controller.py say how),
kept as ``model._bypass``. ``unpatch`` removes every role, restores every swapped class and drops
``model._bypass``: the model is exactly as it was.

The table is not a module buffer: a host copy is always there (so a model patched on ``meta``
needs nothing after ``to_empty``/``load_state_dict``), and a copy is made on each device the
blend runs on, where ``set_schedule`` writes in place (same storage: no recompile, and captured
CUDA graphs see the new values), whatever moved the weights (``.to``, model/sequential/group offload).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bypass_kernels import backends, targets
from bypass_kernels.controller import BypassController, owner_of
from bypass_kernels.schedule import BypassSchedule, default_schedule
from bypass_kernels.scheduler_check import check_scheduler_T, scheduler_T
from bypass_kernels.targets import Carrier

__all__ = [
    "BypassController",
    "describe",
    "get_schedule",
    "is_patched",
    "patch",
    "patched",
    "per_sample",
    "set_schedule",
    "unpatch",
]

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
    """Every module a role would sit on must be an eager module whose forward can carry it."""
    modules = (("model", target.owner), *((f"block {type(m).__name__}", m) for m in target.span.modules))
    if target.carrier.module is not None:
        modules = (*modules, ("timestep module", target.carrier.module))
    for name, module in modules:
        if isinstance(module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise TypeError(
                f"bypass_kernels.patch: the {name} is a {type(module).__name__}, whose calls cannot be hooked; "
                "patch the eager diffusers module, then script, trace or export it"
            )


def _check_carrier(target: targets.Target) -> None:
    """The timestep must be kept before the span starts: a carrier inside the span would be called after it."""
    carrier = target.carrier.module
    for block in target.span.modules if carrier is not None else ():
        if any(carrier is m for m in block.modules()):
            raise ValueError(
                f"bypass_kernels.patch: the timestep module ({type(carrier).__name__}) is inside the bypassed span "
                f"(block {type(block).__name__}), which starts before it runs; name a module the model calls with "
                "the timestep before the span (a UNet's time_proj, a transformer's time embedder)"
            )


def _check_distinct(found: list[targets.Target]) -> None:
    """Two models of one pipeline patched together may not share a module a role sits on (each would
    attach its roles over the other's)."""
    seen: dict[int, int] = {}
    for k, target in enumerate(found):
        for module in (target.owner, target.carrier.module, *target.span.modules):
            if module is not None and seen.setdefault(id(module), k) != k:
                raise ValueError(
                    f"bypass_kernels.patch: {type(module).__name__} is shared by the pipeline's two models "
                    "(transformer and transformer_2); patch one of them (bypass_kernels.patch(pipe.transformer)), "
                    "or give each its own blocks"
                )


def _check_linkable(pipeline) -> None:
    if pipeline is None:
        return
    try:
        weakref.ref(pipeline)
    except TypeError:
        raise TypeError(
            f"bypass_kernels.patch: {type(pipeline).__name__} cannot be weakly referenced (it defines __slots__ "
            "without __weakref__), which the link between a pipeline and its patched model needs; patch its "
            "model instead (bypass_kernels.patch(pipe.unet) or patch(pipe.transformer))"
        ) from None


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


def _as_schedule(schedule, pipeline, carrier: Carrier | None = None) -> BypassSchedule:
    """A BypassSchedule from what ``patch``/``set_schedule`` were given: a schedule, a spec string
    as the command line takes it (``"linear:0.3:500"``), or a dict from ``to_dict()``."""
    T = scheduler_T(pipeline) or 1000
    if schedule is None:
        schedule = default_schedule(num_train_timesteps=T)
    elif isinstance(schedule, (str, dict)):
        schedule = BypassSchedule.parse(schedule, num_train_timesteps=T)
    if not isinstance(schedule, BypassSchedule):
        raise TypeError(
            "schedule: expected a BypassSchedule (e.g. BypassSchedule.linear(0.3, t_min=500)), a spec such as "
            f"'linear:0.3:500', or a dict from BypassSchedule.to_dict(); got {type(schedule).__name__}"
        )
    check_scheduler_T(pipeline, schedule, carrier)
    return schedule


def _controllers(model) -> list[BypassController]:
    """The controllers of every model ``model`` stands for (a pipeline may have two transformers)."""
    try:
        owners, _ = targets.models_of(model)
    except TypeError:
        return []
    found = [owner.__dict__.get(_ATTR) for owner in owners]
    return [c for c in found if isinstance(c, BypassController)]


def _controller(model) -> BypassController | None:
    found = _controllers(model)
    return found[0] if found else None


def _refuse_shared(target: targets.Target, mine: BypassController | None) -> None:
    """A block (or carrier) already bypassed through another model: two controllers on one module
    would each blend it; refused before anything changes."""
    for module in (target.owner, target.carrier.module, target.span.first, target.span.last):
        if module is None:
            continue
        other = owner_of(module)
        if other is not None and other is not mine:
            raise ValueError(
                f"bypass_kernels.patch: {type(module).__name__} is already bypassed through another model that "
                "shares it; unpatch that model first (bypass_kernels.unpatch), or patch only one of them"
            )


def _link(controller: BypassController, pipeline) -> None:
    previous = controller.pipeline
    if previous is not None and previous is not pipeline:  # the check follows the pipeline patched last
        link = getattr(previous, "__dict__", {}).get(_LINK)
        if isinstance(link, PipelineLink) and link.controller is controller:
            _unlink(previous)
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
    span=None,
    streams: str | None = None,
    timestep_module: str | None = None,
    timestep_scale: float | None = None,
):
    """Bypass part of ``model`` by ``schedule`` (default: ``default_schedule``).

    ``model``: a diffusers UNet (its mid-block is bypassed), a diffusers transformer (SD3, Flux,
    PixArt, Sana, Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi, QwenImage: a span of its blocks),
    a ``DiffusionPipeline`` (its ``unet``, or its ``transformer`` and ``transformer_2``), any
    ``nn.Module`` with a shape-preserving ``mid_block``, or any of these compiled (the next call
    recompiles). ``schedule``: a ``BypassSchedule``, a spec string as the command line takes
    it (``"linear:0.3:500"``), or a dict from ``to_dict()``.

    Transformers: ``span`` is the run of blocks to bypass, inclusive indices ``(i, j)`` (or one
    index) over the blocks in execution order, a block name (``"single_transformer_blocks.3"``), a
    pair of names, or a preset name (``"sd3.5-slg"``, ``"stg"``); None is the family's default
    (this package's own choice: the middle 1/16 of the blocks). ``streams="all"`` blends every
    stream the span returns (λ = 1 deletes the span), ``"image"`` the image stream only; not given:
    the present patch's streams, else ``"all"``.

    ``timestep_module``: the name of the submodule whose first argument is the call's timestep (for
    a model this package does not know; a UNet's ``time_proj``), read inside the model's forward,
    which costs nothing under torch.compile. ``timestep_scale``: table units per unit that module
    receives (the family's by default).

    Patching a patched model replaces its schedule and backend (and its span, when one is given);
    it never stacks. Returns ``model``. On any error the model is left exactly as it was and the
    error is a ``TypeError`` or ``ValueError`` naming the cause.
    """
    owners, pipeline = targets.models_of(model)
    _check_linkable(pipeline)
    found = [
        targets.resolve(
            owner,
            pipeline,
            span=_span_kept(owner, span),
            streams=_streams_kept(owner, streams),
            timestep_module=timestep_module,
            timestep_scale=timestep_scale,
        )
        for owner in owners
    ]
    schedule = _as_schedule(schedule, pipeline, found[0].carrier)
    # an argument the caller gave, whatever its value, asks for that attachment
    explicit = span is not None or streams is not None or timestep_module is not None or timestep_scale is not None
    for target in found:
        _check_attachable(target)
        _check_carrier(target)
        _check_span_shape(target)
        device = _model_device(target.owner)
        backends.require(backend, device.type if device.type != "meta" else None)
        _refuse_shared(target, _controller(target.owner))
        if _ATTR in target.owner.__dict__ and not isinstance(target.owner.__dict__[_ATTR], BypassController):
            raise ValueError(f"bypass_kernels.patch: {type(target.owner).__name__} already has an attribute {_ATTR!r}")
    _check_distinct(found)
    # Checked: now change, undoing every change on a failure (all or nothing, over every model of a pipeline)
    undo: list[Callable[[], None]] = []
    controllers = []
    try:
        for target in found:
            controller = _controller(target.owner)
            if controller is not None and explicit and _attachment(controller) != _attachment(target):
                _detach(target.owner)  # asked for another span or timestep: attach anew
                undo.append(functools.partial(_reattach, target.owner, controller))
                controller = None
            if controller is None:
                controller = _attach(target, schedule, backend)
                undo.append(functools.partial(unpatch, target.owner))
            else:
                undo.append(functools.partial(_rewrite, controller, controller.schedule, controller.backend))
                _rewrite(controller, schedule, backend)
            controllers.append(controller)
    except Exception:
        for action in reversed(undo):
            action()
        raise
    if pipeline is not None:
        for controller in controllers:
            _link(controller, pipeline)
    return model


def _rewrite(controller: BypassController, schedule: BypassSchedule, backend: str) -> None:
    controller.write(schedule)
    controller.backend = backend


def _detach(owner: nn.Module) -> None:
    controller = owner.__dict__.pop(_ATTR)
    controller.remove()
    _unlink(controller.pipeline)


def _reattach(owner: nn.Module, controller: BypassController) -> None:
    """Put back a controller ``_detach`` took off (a patch that failed after it)."""
    controller.install()
    owner.__dict__[_ATTR] = controller
    if controller.pipeline is not None:
        _link(controller, controller.pipeline)


def _streams_kept(owner: nn.Module, streams: str | None) -> str:
    """``streams``, or where none is given, the present patch's (a model not patched: ``"all"``)."""
    if streams is not None:
        return streams
    controller = _controller(owner)
    if controller is not None and not all(s.blend for s in controller.span.streams):
        return "image"
    return "all"


def _attachment(x) -> tuple:
    """What decides where the roles sit: the span's blocks and streams, the carrier and how it reads t."""
    return (x.span, x.carrier)


def _span_kept(owner: nn.Module, span):
    """``span``, or where none is given and the transformer is patched already, its present span (by
    block names): patching again with other streams or another schedule keeps the span."""
    controller = _controller(owner)
    if span is not None or controller is None or targets._family(owner) is None:
        return span
    names = {module: name for name, module in owner.named_modules()}
    first, last = names.get(controller.span.first), names.get(controller.span.last)
    return span if first is None or last is None else (first, last)


def _attach(target: targets.Target, schedule: BypassSchedule, backend: str) -> BypassController:
    controller = BypassController(
        schedule,
        backend,
        owner=target.owner,
        carrier=target.carrier,
        span=target.span,
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
    return controller


def unpatch(model):
    """Restore ``model`` exactly: roles removed, the swapped classes restored, the controller dropped;
    a second call does nothing. Compiled models recompile on their next call. Returns ``model``."""
    owners, pipeline = targets.models_of(model, "unpatch")
    for owner in owners:
        if isinstance(owner.__dict__.get(_ATTR), BypassController):
            _detach(owner)
    _unlink(pipeline)
    return model


def describe(model) -> str:
    """What a patch covers, in words: for each patched model (a pipeline may hold two), the blocks of the
    span and the streams blended, where the timestep is read and at what scale, the schedule (with λ at
    a few timesteps), the backend, and the pipeline whose scheduler is checked. An unpatched model says so."""
    try:
        owners, _ = targets.models_of(model, "describe")
    except TypeError as exc:
        return str(exc)
    parts = []
    for owner in owners:
        controller = owner.__dict__.get(_ATTR)
        if not isinstance(controller, BypassController):
            parts.append(f"{type(owner).__name__}: not patched")
            continue
        names = {module: name for name, module in owner.named_modules()}
        span = controller.span
        first, last = names.get(span.first, type(span.first).__name__), names.get(span.last, type(span.last).__name__)
        where = first if span.first is span.last else f"{first} .. {last} ({len(span.modules)} blocks)"
        streams = ", ".join(s.name + (" (blended)" if s.blend else " (passed through)") for s in span.streams)
        carrier = controller.carrier
        if carrier.module is not None:
            read = f"the first argument of {names.get(carrier.module, type(carrier.module).__name__)}"
        else:
            read = f"the model's argument {carrier.arg[0]!r}"
        term = "t" if abs(carrier.scale) == 1.0 else f"{abs(carrier.scale):g}·t"
        if carrier.offset:
            units = f"table index = {carrier.offset:g} {'-' if carrier.scale < 0 else '+'} {term}"
        else:
            units = f"table index = {'-' if carrier.scale < 0 else ''}{term}"
        schedule = controller.schedule
        T = schedule.num_train_timesteps
        samples = ", ".join(f"λ({t}) = {schedule.weight(t):.3g}" for t in (T - 1, (3 * T) // 4, T // 2, T // 4, 0))
        device = _model_device(owner)
        try:
            kernel = backends.resolve(controller.backend, device) if device.type != "meta" else "(on its device)"
        except Exception as exc:  # a backend that cannot run where the model now is
            kernel = f"unavailable here ({exc})"
        linked = controller.pipeline
        checked = f"{type(linked).__name__}'s scheduler" if linked is not None else "none (patched as a bare model)"
        parts.append(
            "\n".join(
                [
                    f"{type(owner).__name__}: patched by bypass_kernels",
                    f"  span: {where}",
                    f"  streams: {streams}",
                    f"  timestep: {read} ({units})",
                    f"  schedule: {schedule!r}",
                    f"            {samples}",
                    f"  backend: {controller.backend} ({kernel} on {device.type})",
                    f"  scheduler check: {checked}",
                ]
            )
        )
    return "\n".join(parts)


def is_patched(model) -> bool:
    return _controller(model) is not None


def get_schedule(model) -> BypassSchedule | None:
    controller = _controller(model)
    return None if controller is None else controller.schedule


def set_schedule(model, schedule: BypassSchedule | str | dict):
    """Write ``schedule`` into the patched model's tables, in the same storage (no recompile, and a
    captured CUDA graph sees the new values). Returns ``model``."""
    controllers = _controllers(model)
    if not controllers:
        raise ValueError("set_schedule: the model is not patched; call bypass_kernels.patch(model, schedule) first")
    (schedule,) = _schedules_for(model, controllers, [schedule], "set_schedule")
    for controller in controllers:
        controller.write(schedule)
    return model


def _schedules_for(model, controllers: list[BypassController], schedules: list, caller: str) -> list[BypassSchedule]:
    """``schedules`` as BypassSchedules for the patched ``model``: checked against the scheduler of the
    pipeline it was reached or patched through, and against the length of its tables."""
    _, pipeline = targets.models_of(model, caller)
    pipeline = pipeline if pipeline is not None else controllers[0].pipeline
    parsed = [_as_schedule(s, pipeline, controllers[0].carrier) for s in schedules]
    for i, schedule in enumerate(parsed):
        for controller in controllers:
            T = controller.table.shape[0]
            if schedule.num_train_timesteps != T:
                name = "the schedule" if caller == "set_schedule" else f"schedules[{i}]"
                raise ValueError(
                    f"{caller}: {name} is built for num_train_timesteps={schedule.num_train_timesteps}, the patched "
                    f"model's table holds {T} timesteps; call patch(model, schedule) to change the length"
                )
    return parsed


@contextlib.contextmanager
def patched(model, schedule: BypassSchedule | str | dict | None = None, *, backend: str = "auto", **where) -> Iterator:
    """``with patched(unet, schedule): ...`` patches for the block, then restores the previous state.
    ``where``: ``span``, ``streams``, ``timestep_module``, ``timestep_scale`` as ``patch`` takes them."""
    before = _controller(model)
    previous = (before.schedule, before.backend) if before is not None else None
    if previous is not None and any(v is not None for v in where.values()):
        raise ValueError(
            "patched: the model is already patched; a span, streams or timestep for the block would replace its "
            "attachment for good. Use patched(model, schedule) on it, or unpatch it first"
        )
    patch(model, schedule, backend=backend, **where)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            patch(model, previous[0], backend=previous[1])


@contextlib.contextmanager
def per_sample(model, schedules, *, images_per_prompt: int = 1) -> Iterator:
    """``with per_sample(pipe, [s1, s2, ...]): pipe(prompt=[p1, p2, ...])``: within the block, each image
    of the patched model's calls in this thread takes its own schedule, in one batched call.

    ``schedules``: one per image the pipeline makes, in its order (each a ``BypassSchedule``, a
    spec string or a dict, as ``patch`` takes them); ``images_per_prompt``: give one per prompt
    instead, each repeated for that pipeline's ``num_images_per_prompt`` images. A batch doubled by
    classifier-free guidance (unconditional half first) and video frames folded into the batch get
    their image's schedule. Other threads, and calls after the block, use the model's own schedule.
    Schedules change no compiled code's guards but the table's shape: a new number of images
    recompiles once, as a new batch size does (then the dimension is dynamic)."""
    controllers = _controllers(model)
    if not controllers:
        raise ValueError("per_sample: the model is not patched; call bypass_kernels.patch(model) first")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"per_sample: images_per_prompt must be a positive integer, got {images_per_prompt!r}")
    if isinstance(schedules, (str, dict, BypassSchedule)) or not hasattr(schedules, "__iter__"):
        raise TypeError("per_sample: schedules must be a list, one schedule per image (or per prompt)")
    parsed = _schedules_for(model, controllers, list(schedules), "per_sample")
    table = BypassSchedule.stack(parsed).repeat_interleave(images_per_prompt, 0)
    with contextlib.ExitStack() as stack:
        for controller in controllers:
            stack.enter_context(controller.table_for_calls(table))
        yield model
