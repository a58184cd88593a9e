"""The per-thread record: how one model call's values travel from role to role (see attached.py for
the roles, controller.py for what installs them).

The values travel in the entry ``call`` of a ``threading.local``'s dict, tagged with the
controller's token: the carrier sets it, the span start extends it, the span end reads it and
deletes it. Under torch.compile the forwards of submodules run inside the model's own compiled
frame, so the timestep is data flow of that frame, shared with no other call or thread, and the
frame gains no frame of its own (hooks on the model itself run outside the frame
``torch.compile(model)`` compiles, one Python call per step). The span end reads the λ tables from
its own block (``_bypass_tables``, the controller's dict), not through the controller. Where a value
must cross frames (a graph break between carrier and span), Dynamo reads the thread-local per thread.

A call that raises after the carrier and before the span end leaves its values behind; the next
model call overwrites them, and in eager mode a block called on its own is checked against the
frame of the model call that wrote them (a stack walk; a record without one, from compiled code or
a carrier called on its own, against the model being called), so it is never blended with a failed
call's timestep. Compiled code keeps its record under a key of its own, so such a leftover is
nothing to it, whether it was there when the code was traced or not (see ``_find_record``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

from torch import nn

# One record per thread and model class (a model is not called inside another of its own class in
# one thread; one of another class is, by reference networks and guidance tricks, and has its own
# record), keyed by its controller's token: the model's class name, a constant that compiled code
# shares across instances, copies and patches of one class (a token per controller would make every
# new patch recompile code shared by a class). The call's record: (timestep,
# frame id) from the carrier, then (timestep, frame id, streams, versions) from the span start, under
# one of the keys ``_record_keys(token)`` (compiled code's, eager mode's).
# ``table``: (token, table) from table_for_calls. Written and read as entries of ``_CALLS.__dict__``
# (this thread's dict), absent between calls: a compiled frame that adds the entry and deletes it
# again writes nothing back after its graph. Setting an attribute to None instead made Dynamo write
# it back on every call through a path that raises and clears an AttributeError on a threading.local.
# (A plain ``threading.local()``: Dynamo replays a compiled frame's writes to it in the calling
# thread; writes to a subclass's instance would be lost.)
_CALLS = threading.local()
_STACK_DEPTH = 64  # frames between a role and the model's forward: _call_impl layers, wrappers, checkpointing
_OWNER_DEPTH = 64  # frames searched for a call of the model, for a record with no frame id (a rare path)


def forward_codes(owner: nn.Module) -> frozenset:
    """The code of the model's forward along its class hierarchy (a subclass's forward may call its
    base's, and the base's frame is the one that calls the carrier)."""
    codes = set()
    for cls in type(owner).__mro__:
        fn = cls.__dict__.get("forward")
        while fn is not None:  # through decorators (diffusers wraps forward for LoRA scales)
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes.add(code)
            fn = getattr(fn, "__wrapped__", None)
    return frozenset(codes)


def _record_keys(token: str) -> tuple[str, str]:
    """The per-thread record's keys for a model class: (written in compiled code, written in eager
    mode). Identifiers: Dynamo reads dict entries of a thread-local as attributes, whose names cannot
    hold dots."""
    key = "call_" + "".join(c if c.isalnum() else "_" for c in token)
    return key + "_compiled", key


def _find_record(calls: dict, hook) -> tuple[str, tuple | None]:
    """This call's record and its key: the one compiled code wrote, else the eager one. Compiled code
    that finds its own record never reads the eager key, so an eager call's record left behind (an error
    or Ctrl-C inside the span) is nothing to the compiled code: Dynamo does not guard on the entries of
    this dict, and code traced while such a record was there would delete it again on every call."""
    call = calls.get(hook.compiled_key)
    if call is not None:
        return hook.compiled_key, call
    return hook.key, calls.get(hook.key)  # read only where compiled code has no record: no guard on it


def _callers(frame, depth: int) -> Iterator:
    """``frame`` and its callers, ``depth`` frames at most."""
    for _ in range(depth):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def _on_stack(frame_id: int) -> bool:
    return any(id(f) == frame_id for f in _callers(sys._getframe(2), _STACK_DEPTH))
