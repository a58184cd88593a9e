"""One patched model's controller: its λ tables (one per device), its link to a pipeline and the checks
before an eager call, and the roles it installs (attached.py) and removes, all or nothing."""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, is_grad_enabled, nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from bypass_kernels import targets
from bypass_kernels.attached import (
    _HOST,
    _ROLES,
    _TABLES,
    EnterSpan,
    KeepModelTimestep,
    KeepTimestep,
    LeaveSpan,
    Role,
    _attached_class_of,
    _diffusers_innermost,
    _set_class_below_parametrizations,
    marker_class,
    table_on,
    table_override,
)
from bypass_kernels.records import _OWNER_DEPTH, _STACK_DEPTH, _callers, _on_stack, forward_codes
from bypass_kernels.schedule import BypassSchedule
from bypass_kernels.scheduler_check import check_scheduler_T
from bypass_kernels.targets import Carrier, Span


class BypassController:
    """The state and hooks of one patched model. Use ``bypass_kernels.patch``, not this class."""

    def __init__(
        self,
        schedule: BypassSchedule,
        backend: str,
        *,
        owner: nn.Module,
        carrier: Carrier,
        span: Span,
        clone_inputs: bool = False,
    ):
        self.schedule = schedule
        self.backend = backend
        self.owner = owner
        self.carrier = carrier
        self.span = span
        self.clone_inputs = clone_inputs
        self.token = f"{type(owner).__module__}.{type(owner).__qualname__}"
        # One table per device, in one dict that the span's last block also holds (``_bypass_tables``):
        # compiled code reads it there, through the model, not through the hook and this controller.
        self._tables: dict[torch.device, torch.Tensor] = {_HOST: schedule.table(_HOST)}
        self._pipeline: Callable | None = None  # weakref to the pipeline patched through, if any
        self._handles: list = []
        self._swapped: list[tuple[nn.Module, type, Role]] = []  # (module, its base class, its role): picklable
        self._rebound: list[tuple] = []  # (diffusers hook function reference, attribute, its forward before)
        self._owner_codes = forward_codes(owner)
        # block j's input tensor -> (timestep, span input, tables) while checkpointing (see keep_for_recompute)
        self._recompute = WeakIdKeyDictionary()
        # the block lists as patched: an engine that splits them later (pipeline parallelism) is refused
        self._block_lists = tuple((name, owner._modules.get(name)) for name in targets.block_lists(owner))

    # ----------------------------------------------------------------- tables
    @property
    def table(self) -> torch.Tensor:
        """The host (CPU) copy of the λ table: float32, length T."""
        return self._tables[_HOST]

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The table on ``device``, copied there once; later schedules are written into that copy."""
        return table_on(self._tables, device)

    def write(self, schedule: BypassSchedule) -> None:
        """Write ``schedule`` into every copy of the table, in place (same storage: no recompile)."""
        host = schedule.table(_HOST)
        if host.shape != self.table.shape:  # a new length: new tables (compiled code recompiles once)
            self._tables.clear()  # the same dict, which the span's last block holds too
            self._tables[_HOST] = host
        else:
            for table in self._tables.values():
                table.copy_(host)
        self.schedule = schedule

    def table_for_calls(self, table: torch.Tensor):
        """Blend with ``table`` instead of the schedule's, in this thread, for the block's calls: [T], or
        [rows, T] with a schedule per sample (see ``table_rows``). Copied once to each device a
        blend runs on. A context manager."""
        return table_override(self.token, table)

    # ----------------------------------------------------------------- the pipeline
    def link_pipeline(self, pipeline) -> None:
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None

    @property
    def pipeline(self):
        return self._pipeline() if self._pipeline is not None else None

    def check_pipeline(self) -> None:
        pipeline = self.pipeline
        if pipeline is not None:
            check_scheduler_T(pipeline, self.schedule, self.carrier)

    def check_call(self) -> None:
        """Before an eager call: the pipeline's scheduler, and the block lists still whole."""
        self.check_pipeline()
        for name, held in self._block_lists:
            if self.owner._modules.get(name) is not held:  # replaced since the patch: sliced?
                targets.check_blocks_whole(self.owner, "call")

    # ----------------------------------------------------------------- gradient checkpointing
    def checkpointing(self) -> bool:
        """Whether the model checkpoints whole blocks, roles included (a transformer with
        ``gradient_checkpointing`` set; a UNet checkpoints inside its mid-block, below the roles)."""
        return getattr(self.owner, "gradient_checkpointing", False) is True and not hasattr(self.owner, "mid_block")

    def keep_for_recompute(self, block_input, timestep, entered, tables) -> None:
        """Keep what block j blended with, under the tensor block j was called on: the backward pass
        recomputes block j from that tensor, outside the model call, and must blend it the same way.
        Kept while that tensor lives (the checkpoint holds it until its backward)."""
        if isinstance(block_input, Tensor):
            self._recompute[block_input] = (timestep, entered, tables)

    def kept_for_recompute(self, block_input) -> tuple | None:
        """What ``keep_for_recompute`` kept for ``block_input``; None outside a recomputation."""
        if not self._recompute or not isinstance(block_input, Tensor) or not is_grad_enabled():
            return None
        return self._recompute.get(block_input)

    def live(self, call: tuple) -> bool:
        """Whether the model call that wrote the record ``call`` is still under way (eager mode)."""
        frame = call[1]
        return _on_stack(frame) if frame is not None else self.owner_called()

    # Code objects and weak references cannot be copied or pickled: a copy finds its forward's code
    # again and has no pipeline (a copied pipeline links its copy again, see patching.PipelineLink).
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_owner_codes"], state["_recompute"]
        state["_rebound"] = []  # the copy's hook chains are the copied module's (its forward was deep-copied)
        state["_pipeline"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._owner_codes = forward_codes(self.owner)
        self._recompute = WeakIdKeyDictionary()

    def __repr__(self) -> str:
        return (
            f"BypassController({type(self.owner).__name__}, span={self.span!r}, timestep={self.carrier!r}, "
            f"schedule={self.schedule!r}, backend={self.backend!r})"
        )

    # ----------------------------------------------------------------- what the roles call
    def owner_frame(self) -> int | None:
        """The id of the model's forward frame that is calling the carrier (eager mode), or None
        where it is not found (a forward replaced by the user's own)."""
        codes = self._owner_codes
        return next((id(f) for f in _callers(sys._getframe(3), _STACK_DEPTH) if f.f_code in codes), None)

    def owner_called(self) -> bool:
        """Whether a call of the model is under way in this thread (a frame whose ``self`` is the model),
        for a record that has no frame id: one written by compiled code, or by a carrier whose model
        frame was not found. Eager mode only, and only for such records."""
        owner = self.owner
        return any(f.f_locals.get("self") is owner for f in _callers(sys._getframe(2), _OWNER_DEPTH))

    # ----------------------------------------------------------------- install / remove
    def install(self) -> None:
        """Attach: all or nothing (on any failure the model is left as it was). Each role goes into its
        module's forward (an attached class), or into a hook where the module has a forward of its own."""
        try:
            carrier, first, last = self.carrier.module, self.span.first, self.span.last
            if carrier is None:
                hook = self.owner.register_forward_pre_hook(KeepModelTimestep(self), with_kwargs=True)
                self._handles.append(hook)
            else:
                keep = KeepTimestep(self)
                role = Role("timestep", keep.compiled_key, fast=keep.as_given)
                if not self._attach_class(carrier, (keep,), role):
                    self._handles.append(carrier.register_forward_pre_hook(keep))
            enter, leave = EnterSpan(self), LeaveSpan(self)
            ends = ((first, enter, leave),) if first is last else ((first, enter, None), (last, None, leave))
            # own_input: a span of one block and one stream, whose compiled case the attached forward writes out
            role = Role("span", leave.compiled_key, leave.own_input, leave.input_name, leave.token)
            for block, pre, post in ends:
                if not self._attach_class(block, (pre, post), role):
                    if pre is not None:
                        self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
                    if post is not None:
                        self._handles.append(block.register_forward_hook(post, with_kwargs=True))
            last.__dict__[_TABLES] = self._tables
            if not self._swapped:  # every role is a hook, which compiled code does not see come: swap a class
                self._attach_class(last, None, Role())
        except Exception:
            self.remove()
            raise

    def _attach_class(self, module: nn.Module, roles: tuple | None, role: Role) -> bool:
        """Give ``module`` the attached class of ``role``; False (nothing changed) where it has a forward of
        its own (an offloading wrapper's, say), which a class forward would never be reached through, unless
        that forward is a chain of diffusers' hooks ending in the class forward: the chain is made to end
        in the attached one, so the roles run inside the hooks (a context-parallel plan's split happens
        before the span keeps its input)."""
        base = parametrize.type_before_parametrizations(module)
        innermost = None
        if "forward" in module.__dict__:
            innermost = _diffusers_innermost(module, base)
            if roles is not None and innermost is None:
                return False
        cls = marker_class(base, role)
        _set_class_below_parametrizations(module, cls)
        self._swapped.append((module, base, role))
        if roles is not None:
            module.__dict__[_ROLES] = roles
        for ref, name in innermost or ():
            self._rebound.append((ref, name, getattr(ref, name)))
            setattr(ref, name, types.MethodType(cls.forward, module))  # bound to the attached forward
        return True

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
        for ref, name, original in reversed(self._rebound):
            setattr(ref, name, original)
        self._rebound = []
        if self.span.last.__dict__.get(_TABLES) is self._tables:
            del self.span.last.__dict__[_TABLES]
        for module, base, role in reversed(self._swapped):
            roles = module.__dict__.get(_ROLES)
            if roles is not None and any(r is not None and r.controller is self for r in roles):
                del module.__dict__[_ROLES]
            cls = _attached_class_of(module)
            if cls is not None and cls._bypass_base is base and cls._bypass_role == role:
                _set_class_below_parametrizations(module, base)  # (a class put over ours stays, roles gone)
        self._swapped = []


_HOOKS = (KeepTimestep, EnterSpan, LeaveSpan)  # KeepModelTimestep is a KeepTimestep


def owner_of(module: nn.Module) -> BypassController | None:
    """The controller whose roles sit on ``module``, if any (found through the role objects themselves,
    so copies and pickles answer too)."""
    roles = module.__dict__.get(_ROLES) or ()
    for role in (*roles, *module._forward_pre_hooks.values(), *module._forward_hooks.values()):
        if isinstance(role, _HOOKS):
            return role.controller
    return None
