"""The attached classes, and the roles their forwards run.

A *span* is a run of blocks i..j that the model's forward calls one after another (a UNet's
mid-block is a span of one). With h the streams entering block i and m those leaving block j, the
patched output is ``m + λ(t)·(h − m)``. A ``BypassController`` gives three modules a role:

- the *carrier*, the submodule that receives the call's timestep inside the model's forward, once
  per call (a diffusers UNet's ``time_proj``; a DiT's time embedder), keeps it
  (``KeepTimestep``); where no such module is known, ``KeepModelTimestep`` reads it from
  the model's own arguments (a pre-hook on the model);
- block i keeps the streams h (``EnterSpan``; not in compiled code for a span of one block and
  one stream: the span end reads the block's own input);
- block j blends each stream of its output (``LeaveSpan``).

Each role lives in the module's own forward: the module's class is swapped for a same-named subclass
(an *attached class*) whose ``forward`` runs the role around its base's forward, the role objects in
the module's ``_bypass_roles``. Dynamo reads an attached class's forward as code of a type it already
guards, and the compiled common case is written out in it with its constants in its closure, so
compiled code checks almost nothing a hand-written blend would not (a forward hook costs guards on
the hook dictionaries ``Module._call_impl`` reads, on each hook object's type, code and attributes).
A module that has its own ``forward`` attribute (an offloading wrapper, installed before the patch)
would never reach a class forward: it gets the roles as forward hooks instead.

Dynamo guards on the type of every module it inlines, so swapping a class makes compiled code
recompile on its next call, and swapping it back reuses the original code. Where every role is a
hook (Dynamo does not guard on hooks added to empty hook dicts), the span's last block still gets a
same-named subclass, one that changes nothing. The model's own class never changes. A forward
reached through a bound method kept from before ``unpatch`` (an offloading wrapper added while
patched) finds its module no longer of its class and runs the module's present forward.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, is_grad_enabled, nn
from torch.compiler import is_compiling
from torch.nn.utils import parametrize

from bypass_kernels.ops import _as_timestep, blend, blend_, blend_reference
from bypass_kernels.records import _CALLS, _find_record, _record_keys

if TYPE_CHECKING:  # annotations only: the controller imports this module
    from bypass_kernels.controller import BypassController

_HOST = torch.device("cpu")
_TABLES = "_bypass_tables"  # the attribute of the span's last block that holds the controller's tables
# How many table_for_calls are open, in all threads. The span end reads the entry ``table`` only while
# one is: compiled code that read the absent attribute would check its absence on every call (an
# AttributeError raised and cleared each time, about 6k instructions).
_OPEN_OVERRIDES = 0
_OVERRIDES_LOCK = threading.Lock()


# --------------------------------------------------------------------- the roles
class KeepTimestep:
    """The carrier's role (its attached forward calls it, or it is its pre-hook): its first argument is
    this call's [batch] timestep."""

    # Slots: compiled code then need not check that an instance attribute shadows __call__ (one guard per hook)
    __slots__ = ("as_given", "compiled_key", "controller", "first_half", "key", "offset", "scale")

    def __init__(self, controller: BypassController):
        self.controller = controller
        self.compiled_key, self.key = _record_keys(controller.token)
        self.scale = controller.carrier.scale
        self.offset = controller.carrier.offset
        self.first_half = controller.carrier.first_half
        # one flag for the common case (a UNet's time_proj): compiled code then checks one attribute, not three
        self.as_given = not self.first_half and self.scale == 1.0 and self.offset == 0.0

    def __call__(self, carrier, args):
        # the common case in compiled code (inference), written out: fewer guards. Grad mode is a constant
        # while tracing (no guard of its own). is_grad_enabled by its own name: reaching the torch module
        # here too (torch.nn's _call_impl reaches it) costs a guard that they are the same object, run
        # in Python on every call
        if self.as_given and is_compiling() and not is_grad_enabled():
            _CALLS.__dict__[self.compiled_key] = (args[0], None)
            return
        self.keep(args[0], own_call=False)

    def keep(self, timestep, *, own_call: bool) -> None:
        """Start this call's record. ``own_call``: the hook runs in the model's own call (a pre-hook on
        the model), whose frame lives until its forward returns; else the forward's frame is found."""
        if not self.as_given:
            if self.first_half:
                timestep = timestep[: timestep.shape[0] // 2]
            if self.scale != 1.0 or self.offset != 0.0:  # in float32: a bfloat16 product can miss its index
                timestep = timestep.float() * self.scale + self.offset
        calls = _CALLS.__dict__
        if is_compiling():
            calls[self.compiled_key] = (timestep, None)
        else:
            self.controller.check_call()
            frame = id(sys._getframe(2)) if own_call else self.controller.owner_frame()
            calls.pop(self.compiled_key, None)  # a compiled call's, left where it broke its graph and then raised
            calls[self.key] = (timestep, frame)


class KeepModelTimestep(KeepTimestep):
    """Pre-hook on the model itself: the timestep from its arguments."""

    __slots__ = ("name", "position")

    def __init__(self, controller: BypassController):
        super().__init__(controller)
        self.name, self.position = controller.carrier.arg

    def __call__(self, model, args, kwargs):
        if self.name in kwargs:
            timestep = kwargs[self.name]
        elif len(args) > self.position:
            timestep = args[self.position]
        else:
            raise TypeError(
                f"bypass_kernels: the patched model was called without a timestep; call it as "
                f"model(sample, {self.name}, ...) or model(sample=..., {self.name}=...)"
            )
        sample = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        self.keep(_as_timestep(timestep, sample.device if isinstance(sample, Tensor) else _HOST), own_call=True)


class EnterSpan:
    """Block i's role, before its forward (called by it, or a pre-hook): keeps the streams entering the span."""

    __slots__ = ("clone", "compiled_key", "controller", "key", "own_input", "streams")

    def __init__(self, controller: BypassController):
        self.controller = controller
        self.compiled_key, self.key = _record_keys(controller.token)
        self.streams = tuple((s.name, s.position) for s in controller.span.streams)
        self.clone = controller.clone_inputs
        self.own_input = _own_input(controller)

    def __call__(self, block, args, kwargs):
        if self.own_input and is_compiling():  # the span end reads the input itself: nothing to keep
            return
        calls = _CALLS.__dict__
        key, call = _find_record(calls, self)
        if call is None:  # block i called on its own, outside a model call
            return
        timestep, frame = call[0], call[1]
        if not is_compiling() and not self.controller.live(call):
            del calls[key]  # left by a model call that raised before the span end, or by the carrier called alone
            return
        streams = tuple(kwargs[n] if n in kwargs else (args[p] if len(args) > p else None) for n, p in self.streams)
        versions = None
        if self.clone:  # the span writes into tensors in place (inplace=True modules)
            streams = tuple(s.clone() if isinstance(s, Tensor) else s for s in streams)
        elif not is_compiling():  # Dynamo cannot branch on version counters; inference tensors have none
            versions = tuple(s._version if isinstance(s, Tensor) and not s.is_inference() else None for s in streams)
        calls[key] = (timestep, frame, streams, versions)


class LeaveSpan:
    """Block j's role, after its forward (called by it, or a hook): blends each stream of its output with
    the span's input. Returns the new output, or None where it blended in place."""

    __slots__ = (
        "compiled_key",
        "controller",
        "input_name",
        "key",
        "outputs",
        "own_input",
        "several",
        "single",
        "token",
    )

    def __init__(self, controller: BypassController):
        self.controller = controller
        self.token = controller.token
        self.compiled_key, self.key = _record_keys(self.token)
        self.single = controller.span.single
        self.outputs = tuple((s.output_index, s.blend) for s in controller.span.streams)
        self.own_input = _own_input(controller)
        self.input_name = controller.span.streams[0].name
        self.several = controller.span.first is not controller.span.last  # a model call may stop inside the span

    def __call__(self, block, args, kwargs, output):
        calls = _CALLS.__dict__
        key, call = _find_record(calls, self)
        own = args[0] if args else kwargs.get(self.input_name)  # the tensor block j ran on (None: not given)
        if call is None:  # block j called on its own, or recomputed for a checkpoint's backward (eager)
            if is_compiling():
                return None
            kept = self.controller.kept_for_recompute(own)
            return None if kept is None else self.blend(block, args, kwargs, output, *kept)
        del calls[key]  # the record ends as it began: absent (nothing for compiled code to write back)
        if self.several and not is_compiling() and not self.controller.live(call):
            return None  # left by a model call that stopped inside the span: not this call's
        if len(call) == 4:
            timestep, _, entered, versions = call
        elif self.own_input:  # the span start ran compiled and kept nothing
            timestep, entered, versions = call[0], None, None
        else:
            return None  # block j called on its own
        if self.own_input:  # the input the block ran on (a pre-hook of the user's after ours may replace it)
            if entered is None or own is not entered[0]:
                versions = None  # kept for another tensor, or not kept
            entered = (own,)
        if versions is not None:
            _check_unchanged(entered, versions)
        tables = _override(calls, self.token) if _OPEN_OVERRIDES else None
        if not is_compiling() and is_grad_enabled() and self.controller.checkpointing():
            self.controller.keep_for_recompute(own, timestep, entered, tables)
        return self.blend(block, args, kwargs, output, timestep, entered, tables)

    def blend(self, block, args, kwargs, output, timestep, entered, tables):
        """Blend block j's ``output`` with the span's input ``entered`` at ``timestep``."""
        controller = self.controller  # read by compiled code only as an argument: no guard on it
        if self.single:
            return blend_stream(controller, block, output, entered[0], timestep, tables)
        if not isinstance(output, (tuple, list)):
            raise TypeError(
                f"bypass_kernels: block {type(block).__name__} returned {type(output).__name__}, "
                "not the tuple of streams its model family returns; unpatch this model"
            )
        rebuilt = None
        for (index, blended), h in zip(self.outputs, entered, strict=True):
            m = output[index]
            if not blended or m is None or h is None:
                continue  # a stream left as it is, or one this block does not return (SD3's last: no text)
            new = blend_stream(controller, block, m, h, timestep, tables)
            if new is not None:
                rebuilt = list(output) if rebuilt is None else rebuilt
                rebuilt[index] = new
        return None if rebuilt is None else type(output)(rebuilt)


# --------------------------------------------------------------------- attached classes
@dataclass(frozen=True)
class Role:
    """What an attached class's forward does, in constants (its compiled code then reads no object's
    attributes for them). ``kind``: "timestep" (the carrier), "span" (block i and/or j), None
    (nothing: a class swap that only makes compiled code recompile). ``fast``: the compiled common
    case is written out (a carrier that gives the timestep as it is; a span of one block and one
    stream that blends with the block's own input)."""

    kind: str | None = None
    compiled_key: str = ""
    fast: bool = False
    input_name: str = ""
    token: str = ""


_ROLES = "_bypass_roles"  # a module's role objects: (pre, post), each a hook object of this module or None
_MARKERS: dict[tuple[type, Role], type] = {}


def marker_class(base: type, role: Role = Role()) -> type:
    """A subclass of ``base`` with its name, module and pickling whose forward runs ``role`` around
    ``base.forward``. Dynamo guards on the types of the modules it inlines, so swapping a module's
    class makes compiled code recompile on its next call."""
    marker = _MARKERS.get((base, role))
    if marker is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "__reduce_ex__": _reduce_marked,
            "_bypass_base": base,
            "_bypass_role": role,
            # What calling a module looks up, resolved here once: compiled code then finds them in this
            # class and checks no other class of its hierarchy for them (fewer guards per call)
            "__call__": base.__call__,
            "_call_impl": base._call_impl,
            "_compiled_call_impl": base._compiled_call_impl,
        }
        # setdefault: two threads creating the class of one base at once agree on one
        marker = _MARKERS.setdefault((base, role), _with_forward(base, role, namespace))
        if base.__module__.startswith("diffusers."):
            _share_block_metadata(base, marker)
    return marker


def _share_block_metadata(base: type, marker: type) -> None:
    """diffusers' block hooks (FirstBlockCache, MagCache, LayerSkip under the skip-layer guiders) look a
    block's metadata up by its exact class: the attached class gets its base's entry (which names the base,
    whose forward has the signature those hooks read)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # a diffusers without block hooks
        return
    with contextlib.suppress(AttributeError):  # another layout of diffusers' private registry: nothing to share
        TransformerBlockRegistry._register()
        registry = TransformerBlockRegistry._registry
        if base in registry:
            registry.setdefault(marker, registry[base])


def _with_forward(base: type, role: Role, namespace: dict) -> type:
    """The attached class: ``namespace`` and, for a role, a forward that runs it. The forward reads its
    constants from its closure; ``marker`` is the class itself (assigned below, before any call)."""
    key, fast, input_name, token = role.compiled_key, role.fast, role.input_name, role.token
    # A forward reached through a bound method kept from before unpatch (or from another attached class of
    # the same base) runs the module's present forward: ``not isinstance(self, marker)``. In eager mode a
    # module whose roles are gone (a class put over ours, which unpatch leaves) runs its base's forward.

    if role.kind == "timestep":

        def forward(self, *args, **kwargs):
            if not isinstance(self, marker):
                return type(self).forward(self, *args, **kwargs)
            if not is_compiling() and _ROLES not in self.__dict__:
                return super(marker, self).forward(*args, **kwargs)
            if fast and is_compiling() and not is_grad_enabled():
                # compiled inference, written out: one entry written, no object read (grad mode is a
                # constant while tracing)
                _CALLS.__dict__[key] = (args[0] if args else next(iter(kwargs.values())), None)
            else:
                self.__dict__[_ROLES][0](self, args or tuple(kwargs.values()))
            return super(marker, self).forward(*args, **kwargs)

    elif role.kind == "span":

        def forward(self, *args, **kwargs):
            if not isinstance(self, marker):
                return type(self).forward(self, *args, **kwargs)
            if not is_compiling() and _ROLES not in self.__dict__:
                return super(marker, self).forward(*args, **kwargs)
            if fast and is_compiling():
                out = super(marker, self).forward(*args, **kwargs)
                calls = _CALLS.__dict__
                call = calls.get(key)
                if call is not None:  # this frame's carrier wrote it: the common case, written out
                    del calls[key]
                    tables = _override(calls, token) if _OPEN_OVERRIDES else None
                    own = args[0] if args else kwargs.get(input_name)
                    blended = blend_stream(None, self, out, own, call[0], tables)
                    return out if blended is None else blended
                blended = self.__dict__[_ROLES][1](self, args, kwargs, out)  # an eager carrier's record
                return out if blended is None else blended
            enter, leave = self.__dict__[_ROLES]
            if enter is not None:
                enter(self, args, kwargs)
            out = super(marker, self).forward(*args, **kwargs)
            if leave is not None:
                blended = leave(self, args, kwargs, out)
                if blended is not None:
                    out = blended
            return out

    if role.kind is not None:
        forward.__name__ = forward.__qualname__ = "forward"
        forward.__doc__ = base.forward.__doc__
        # the block's own parameters for inspect.signature (hooks that find arguments by name read it:
        # diffusers' context-parallel plans)
        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(base.forward)
        namespace["forward"] = forward
    marker = type(base.__name__, (base,), namespace)
    return marker


def _diffusers_innermost(module: nn.Module, base: type) -> list[tuple[object, str]] | None:
    """Where diffusers' hook chain on ``module`` (its ``_diffusers_hook`` registry, which replaces the
    instance's ``forward``) calls the class forward it found when the first hook was registered: (the
    function reference, its attribute), or None where the module has no such chain."""
    refs = getattr(module.__dict__.get("_diffusers_hook"), "_fn_refs", None)
    if not refs:
        return None
    found = []
    for name in ("forward", "original_forward"):
        fn = getattr(refs[0], name, None)
        if getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is base.forward:
            found.append((refs[0], name))
    return found or None


def _reduce_marked(self, protocol):
    # Pickle and deepcopy name the base class (importable) and the role, then rebuild the class on load.
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    cls = _attached_class_of(self)
    return (_new_marked, (cls._bypass_base, cls._bypass_role), *rest)


def _new_marked(base: type, role: Role = Role()):
    return object.__new__(marker_class(base, role))


def _attached_class_of(module: nn.Module) -> type | None:
    """The module's attached class, also under a parametrization class (torch.nn.utils.parametrize
    puts one above the module's class)."""
    cls = parametrize.type_before_parametrizations(module)
    return cls if "_bypass_base" in cls.__dict__ else None


def _set_class_below_parametrizations(module: nn.Module, cls: type) -> None:
    """Make ``cls`` the module's class, below its parametrization class if it has one: removing the
    last parametrization sets the class to that class's base, which must then be ``cls``."""
    if not parametrize.is_parametrized(module):
        module.__class__ = cls
        return
    above = type(module)
    namespace = {k: v for k, v in vars(above).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(above.__name__, (cls,), namespace)


def _override(calls: dict, token: str):
    """The tables (by device) a ``table_for_calls`` of this model class opened in this thread, else None."""
    override = calls.get("table")
    return override[1] if override is not None and override[0] == token else None


@contextlib.contextmanager
def table_override(token: str, table: torch.Tensor) -> Iterator[None]:
    """``BypassController.table_for_calls``: this thread's calls of the model class ``token`` blend with
    ``table``; counted in ``_OPEN_OVERRIDES`` while open."""
    global _OPEN_OVERRIDES
    previous = getattr(_CALLS, "table", None)
    _CALLS.table = (token, {table.device: table})
    with _OVERRIDES_LOCK:
        _OPEN_OVERRIDES += 1
    try:
        yield
    finally:
        with _OVERRIDES_LOCK:
            _OPEN_OVERRIDES -= 1
        if previous is None:
            del _CALLS.table  # absent again, as between calls
        else:
            _CALLS.table = previous


def table_on(tables: dict, device: torch.device) -> torch.Tensor:
    """The table on ``device`` from a controller's tables, copied there once from the host table."""
    table = tables.get(device)
    if table is None:
        source = tables.get(_HOST)
        table = tables[device] = (source if source is not None else next(iter(tables.values()))).to(device)
    return table


def blend_stream(controller: BypassController, block, m, h, timestep, tables):
    """Blend one stream of the span's output; returns a new tensor (compiled code, or where autograd
    needs one), else None (blended in place). ``tables``: by device, a ``table_for_calls``'s, else
    None (the block's own). Compiled code reads the tables from ``block`` and nothing of
    ``controller`` (its backend chooses eager kernels), so it guards neither."""
    if not isinstance(m, Tensor) or not isinstance(h, Tensor):
        raise TypeError(
            f"bypass_kernels: the span must take and return tensors, got {type(h).__name__} -> "
            f"{type(m).__name__} at {type(block).__name__}; unpatch this model"
        )
    if m.shape != h.shape:
        raise ValueError(
            f"bypass_kernels: the bypassed blocks changed the shape {tuple(h.shape)} -> {tuple(m.shape)}; "
            "the bypass needs blocks whose output has their input's shape. Unpatch with bypass_kernels.unpatch()."
        )
    if m is h:  # an identity span: the blend is the identity too
        return None
    if tables is None:
        tables = block._bypass_tables
    table = tables.get(m.device)
    if table is None:  # not on this device yet (compiled code finds it there from the next call)
        table = table_on(tables, m.device)
    # Video UNets fold frames into the batch before the mid-block (sample-major, as diffusers' UNet3D, SVD,
    # AnimateDiff and I2VGen-XL do): a [B] timestep becomes [B·F], each sample's value repeated over its
    # frames. Shapes only: no host sync, no graph break. (Written here, not called: fewer guards.)
    t = timestep
    n = calls = t.numel()
    if table.dim() == 2:  # a schedule per sample, one row per sample of the model's call
        table = table_rows(table, calls if calls > 1 and m.shape[0] % calls == 0 else m.shape[0])
    if n not in (1, m.shape[0]) and m.shape[0] % n == 0:  # blend_ rejects the other mismatches, with a message
        t = t.reshape(-1).repeat_interleave(m.shape[0] // n)
        n = t.numel()
    if table.dim() == 2 and table.shape[0] not in (1, m.shape[0]) and m.shape[0] % table.shape[0] == 0:
        table = table.repeat_interleave(m.shape[0] // table.shape[0], 0)  # the frames folded, as t
    rows = None
    if n != 1 and n != m.shape[0] and m.dim() >= 3 and n == m.shape[0] * m.shape[1]:
        # A timestep per token (LTX's image-to-video and condition pipelines, Wan 2.2 TI2V: [batch, tokens],
        # flattened sample-major by the model): each token takes its own λ, as a batch of batch·tokens
        # samples. Conditioning tokens at t = 0 then take λ(0).
        rows = (m.shape[0] * m.shape[1], *m.shape[2:])
        h = h.reshape(rows)
        if table.dim() == 2 and table.shape[0] > 1:
            table = table.repeat_interleave(m.shape[1], 0)
    if is_compiling():  # plain ops, out of place: what the compiler fuses into the block's last kernel
        if rows is None:
            return blend_reference(m, h, table, t)
        return blend_reference(m.reshape(rows), h, table, t).reshape(m.shape)
    flat = m if rows is None else _view(m, rows)  # the same memory, to blend in place
    if flat is None or (torch.is_grad_enabled() and (m.requires_grad or h.requires_grad)):
        new = blend(m if rows is None else m.reshape(rows), h, table, t, backend=controller.backend)
        return new if rows is None else new.reshape(m.shape)
    blend_(flat, h, table, t, backend=controller.backend)
    return None


def table_rows(table: Tensor, batch: int) -> Tensor:
    """A [rows, T] table (a schedule per image) for a model call of ``batch`` samples: the rows as they
    are, or twice over where classifier-free guidance doubled the batch (diffusers' pipelines put the
    unconditional half first, then the conditional, each in image order). Shapes only: no host sync."""
    rows = table.shape[0]
    if rows == batch or rows == 1:
        return table
    if 2 * rows == batch:
        return table.repeat(2, 1)
    raise ValueError(
        f"bypass_kernels.per_sample: {rows} schedules for a model call of batch {batch}: give one schedule per "
        "image the pipeline makes (prompts × num_images_per_prompt, in that order, or images_per_prompt=...); "
        "a batch doubled by classifier-free guidance is handled"
    )


def _view(tensor: Tensor, shape: tuple) -> Tensor | None:
    try:
        return tensor.view(shape)
    except RuntimeError:  # strides no view of that shape can have
        return None


def _own_input(controller: BypassController) -> bool:
    """A span of one block and one stream (a UNet's mid-block): its end blends with the input the block
    ran on, read from its own arguments, and in compiled code its start keeps nothing (fewer guards; in
    eager mode the start keeps the input's version, for the in-place check). Not where the block writes
    into its input (the start keeps a clone, which the end must use)."""
    span = controller.span
    return span.single and span.first is span.last and span.streams[0].position == 0 and not controller.clone_inputs


def _check_unchanged(entered: tuple, versions: tuple) -> None:
    for tensor, version in zip(entered, versions, strict=True):
        if version is not None and tensor._version != version:
            raise ValueError(
                "bypass_kernels: the bypassed blocks changed their input in place (an in-place op on the tensor "
                "they were given), so the input the blend needs is gone. Make that op out of place (for example "
                "nn.SiLU(inplace=False)) or unpatch this model."
            )
