"""Schedules from records and spec strings: ``BypassSchedule.from_dict`` and ``BypassSchedule.parse``.

A record is what ``to_dict()`` gives (JSON-safe); a spec is what the command line takes:
``default``, ``off``, ``SHAPE:STRENGTH[:T_MIN[:T_MAX]]``,
``for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]``, a JSON object as text, or the
path of a JSON file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from bypass_kernels._checks import (
    as_float_list,
    check_fraction,
    check_num_inference_steps,
    check_ramp,
    check_strength,
    check_T,
    short_repr,
)
from bypass_kernels.steps import build_scheduler

# record keys per shape: (required, optional), besides "shape"
KEYS = {
    "constant": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "linear": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "cosine": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "table": (("values",), ("num_train_timesteps",)),
    "steps": (("timesteps", "strengths"), ("num_train_timesteps",)),
    "for_scheduler": (
        ("scheduler", "num_inference_steps", "strength"),
        ("start", "end", "ramp", "timesteps", "num_train_timesteps", "mu", "sigmas"),
    ),
}


def from_dict(cls, data: Mapping[str, Any], num_train_timesteps: int = 1000):
    """The schedule a record describes; every key is checked. A record without ``num_train_timesteps``
    (one written by hand) is built for ``num_train_timesteps``: the model's or the pipeline's, where known."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a mapping from to_dict(), got {type(data).__name__}")
    if "shape" not in data:
        raise ValueError("schedule: missing key 'shape'")
    shape = data["shape"]
    if not isinstance(shape, str) or shape not in KEYS:
        raise ValueError(f"shape: expected one of {', '.join(KEYS)}, got {shape!r}")
    required, optional = KEYS[shape]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{shape} schedule: missing key {missing[0]!r} (it needs {', '.join(required)})")
    unknown = sorted(str(k) for k in data if k not in required and k not in optional and k != "shape")
    if unknown:
        raise ValueError(f"{shape} schedule: unexpected key {unknown[0]!r}")
    if shape == "for_scheduler":
        return _for_scheduler(cls, data, num_train_timesteps)
    T = data.get("num_train_timesteps", num_train_timesteps)
    if shape == "table":
        return cls.from_table(data["values"], num_train_timesteps=T)
    if shape == "steps":
        return cls.from_steps(data["timesteps"], data["strengths"], num_train_timesteps=T)
    return getattr(cls, shape)(data["strength"], data.get("t_min", 0), data.get("t_max"), num_train_timesteps=T)


def _for_scheduler(cls, data: Mapping[str, Any], default_T: int):
    N = check_num_inference_steps(data["num_inference_steps"])
    s = check_strength(data["strength"])
    a, b = check_fraction(data.get("start", 0.0), "start"), check_fraction(data.get("end", 1.0), "end")
    if a >= b:
        raise ValueError(f"start must be below end, got start={a!r}, end={b!r}")
    ramp = check_ramp(data.get("ramp", "linear"), "ramp")
    spec = data["scheduler"]
    mu, sigmas = data.get("mu"), data.get("sigmas")
    if "timesteps" not in data:  # a hand-written record: build the scheduler and read its timesteps
        T = data.get("num_train_timesteps")
        scheduler = build_scheduler(spec, None if T is None else check_T(T))
        return cls.for_scheduler(scheduler, N, s, start=a, end=b, shape=ramp, mu=mu, sigmas=sigmas)
    # the resolved timesteps are authoritative: no scheduler (nor diffusers) is needed to rebuild
    T = check_T(data.get("num_train_timesteps", default_T))
    name = spec.get("_class_name") if isinstance(spec, Mapping) else spec
    if not isinstance(name, str) or not name:
        raise TypeError(f"scheduler: expected a scheduler class name, got {short_repr(spec)}")
    timesteps = as_float_list(data["timesteps"], "timesteps")
    if not timesteps:
        raise ValueError("timesteps: expected at least one timestep")
    for i, t in enumerate(timesteps):
        if not math.isfinite(t):
            raise ValueError(f"timesteps[{i}]: expected a finite timestep, got {t!r}")
    return cls._for_visits(name, timesteps, N, s, a, b, ramp, T, mu=mu, sigmas=sigmas)


def default(cls, num_train_timesteps: int):
    """``default_schedule`` (see its doc): ``linear(0.3, t_min=T/2)``."""
    T = check_T(num_train_timesteps)
    return cls.linear(0.3, t_min=min(T // 2, T - 2), num_train_timesteps=T)


def parse(cls, spec, num_train_timesteps: int, files: bool = True):
    """A schedule from a command-line spec (see ``BypassSchedule.parse``); ``files=False`` reads no file."""
    if spec is None or isinstance(spec, cls):
        return spec
    if isinstance(spec, Mapping):
        return from_dict(cls, spec, num_train_timesteps)
    if not isinstance(spec, str):
        raise TypeError(f"schedule spec: expected a string, got {type(spec).__name__}")
    text = spec.strip()
    if text == "default":
        return default(cls, num_train_timesteps)
    if text in ("off", "none"):
        return cls.constant(0.0, num_train_timesteps=num_train_timesteps)
    if text.startswith("{"):
        return from_dict(cls, json_object(text, "schedule spec"), num_train_timesteps)
    if files and (text.endswith(".json") or os.path.isfile(text)):
        try:
            with open(text, encoding="utf-8") as f:
                content = f.read()
        except OSError as exc:
            raise ValueError(f"schedule spec: cannot read {text!r}: {exc.strerror or exc}") from None
        return from_dict(cls, json_object(content, f"schedule spec {text!r}"), num_train_timesteps)
    parts = text.split(":")
    if parts[0] == "for_scheduler":
        return _parse_for_scheduler(cls, spec, parts[1:], num_train_timesteps)
    if parts[0] not in ("constant", "linear", "cosine") or not 2 <= len(parts) <= 4:
        raise ValueError(
            f"schedule spec {spec!r}: expected 'default', 'off', 'constant|linear|cosine:STRENGTH[:T_MIN[:T_MAX]]', "
            "'for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]', a JSON object"
            + (" or a JSON file" if files else "")
        )
    try:
        numbers_ = [float(parts[1])] + [int(p) for p in parts[2:]]
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: STRENGTH is a number, T_MIN and T_MAX integers") from None
    return getattr(cls, parts[0])(*numbers_, num_train_timesteps=num_train_timesteps)


def _parse_for_scheduler(cls, spec: str, parts: list[str], T: int):
    if not 3 <= len(parts) <= 6:
        raise ValueError(
            f"schedule spec {spec!r}: expected 'for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]'"
            " (e.g. for_scheduler:EulerDiscreteScheduler:30:0.3:0:0.4:cosine)"
        )
    try:
        steps = int(parts[1])
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: STEPS is an integer, got {parts[1]!r}") from None
    try:
        values = [float(p) for p in parts[2:5]]
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: STRENGTH, START and END are numbers") from None
    start, end = (values[1:] + [0.0, 1.0][len(values) - 1 :])[:2]
    shape = parts[5] if len(parts) == 6 else "linear"
    scheduler = build_scheduler(parts[0], check_T(T))
    return cls.for_scheduler(scheduler, steps, values[0], start=start, end=end, shape=shape)


def json_object(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise ValueError(f"{name}: invalid JSON: {exc}") from None
