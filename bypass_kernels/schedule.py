"""Bypass schedules: the weight λ(t) of the mid-block bypass at each training timestep.

A schedule is an immutable description (shape, strength, active range) that renders to a
float32 table of length T = ``num_train_timesteps``. Every backend, the compiled graph and the
exported ONNX/TensorRT graph read λ from that table at
``idx = clamp(round_half_to_even(float32(t)), 0, T - 1)``.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["BypassSchedule", "default_schedule", "timestep_index"]

# to_dict()/from_dict() keys per shape: (required, optional), besides "shape"
_KEYS = {
    "constant": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "linear": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "cosine": (("strength",), ("t_min", "t_max", "num_train_timesteps")),
    "table": (("values",), ("num_train_timesteps",)),
    "steps": (("timesteps", "strengths"), ("num_train_timesteps",)),
    "for_scheduler": (
        ("scheduler", "num_inference_steps", "strength"),
        ("start", "end", "ramp", "timesteps", "num_train_timesteps"),
    ),
}


def timestep_index(t: float, num_train_timesteps: int) -> int:
    """Table index of one timestep: float32, round half to even, clamp to [0, T-1]; NaN reads index 0,
    as every backend, compiled graph and exported graph does."""
    T = _check_T(num_train_timesteps)
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"timestep: expected a single value, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep: expected a real number, got a {t.dtype} tensor")
        value = t.detach().reshape(()).to("cpu", torch.float32)
    elif isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"timestep: expected a number or a one-element tensor, got {t!r}")
    else:
        try:
            value = torch.tensor(float(t), dtype=torch.float32)
        except OverflowError:  # an int beyond float64 is beyond float32 too: it clamps like ±inf
            value = torch.tensor(math.inf if t > 0 else -math.inf, dtype=torch.float32)
    if torch.isnan(value):
        return 0
    return int(value.round().clamp(0, T - 1))


# float32 holds every integer up to 2**24 exactly; a table longer than that has entries that
# idx = round(float32(t)) can never reach.
MAX_TRAIN_TIMESTEPS = 2**24


def _r(value: Any) -> str:
    """repr for an error message, shortened (a 400-digit int stays readable)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: {_r(value)} is too large for a float") from None


def _check_T(num_train_timesteps: Any) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
        raise TypeError(f"num_train_timesteps: expected an int, got {_r(num_train_timesteps)}")
    if not 2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps: expected an int in [2, 2**24] (float32 timesteps are exact up to 2**24),"
            f" got {_r(num_train_timesteps)}"
        )
    return int(num_train_timesteps)


def _check_strength(strength: Any, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {_r(strength)}")
    value = _float(strength, name)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a finite number in [0, 1], got {_r(strength)}")
    return value


def _check_timestep_bound(value: Any, name: str, T: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected an integer timestep in [0, {T - 1}], got {_r(value)}")
    if not isinstance(value, numbers.Integral) and not _float(value, name).is_integer():
        raise ValueError(f"{name}: expected an integer timestep, got {_r(value)}")
    if not 0 <= value <= T - 1:
        raise ValueError(f"{name}: expected a timestep in [0, {T - 1}] (T = num_train_timesteps), got {_r(value)}")
    return int(value)


def _as_float_list(values: Any, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):  # numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}]: expected a number, got {_r(v)}")
        out.append(_float(v, f"{name}[{i}]"))
    return out


_RAMPS = ("constant", "linear", "cosine")


def _check_scheduler(scheduler: Any) -> tuple[int, str]:
    config = getattr(scheduler, "config", None)
    if (
        isinstance(scheduler, type)
        or not callable(getattr(scheduler, "set_timesteps", None))
        or not isinstance(config, Mapping)
    ):
        raise TypeError(f"scheduler: expected a diffusers scheduler instance, got {_r(scheduler)}")
    if "num_train_timesteps" not in config:
        raise ValueError("scheduler: its config has no num_train_timesteps")
    try:
        T = _check_T(config["num_train_timesteps"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"scheduler.config.{exc}") from None
    return T, type(scheduler).__name__


def _check_num_inference_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_inference_steps: expected a positive int, got {_r(value)}")
    if value < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {_r(value)}")
    return int(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a fraction of sampling in [0, 1], got {_r(value)}")
    x = _float(value, name)
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{name}: expected a fraction of sampling in [0, 1], got {_r(value)}")
    return x


def _check_ramp(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {', '.join(_RAMPS)}, got {_r(value)}")
    if value not in _RAMPS:
        raise ValueError(f"{name}: expected one of {', '.join(_RAMPS)}, got {value!r}")
    return value


def _visited_timesteps(scheduler: Any, N: int) -> list[float]:
    """``scheduler.timesteps`` after ``set_timesteps(N)``, computed on a deep copy."""
    work = copy.deepcopy(scheduler)
    try:
        work.set_timesteps(N, device="cpu")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"num_inference_steps: {type(scheduler).__name__}.set_timesteps({N}) failed: {exc}") from None
    timesteps = _as_float_list(work.timesteps, "scheduler.timesteps")
    if not timesteps:
        raise ValueError(f"scheduler: set_timesteps({N}) gave no timesteps")
    for i, t in enumerate(timesteps):
        if not math.isfinite(t):
            raise ValueError(f"scheduler.timesteps[{i}]: expected a finite timestep, got {t!r}")
    return timesteps


def _ramp(ramp: str, s: float, a: float, b: float, p: float) -> float:
    if not a <= p < b:
        return 0.0
    if ramp == "constant":
        return s
    if ramp == "linear":
        return s * (b - p) / (b - a)
    return s * (1.0 + math.cos(math.pi * (p - a) / (b - a))) / 2.0


def _per_call_strengths(timesteps: list[float], N: int, s: float, a: float, b: float, ramp: str, T: int):
    """λ of each call: its step's ramp value, then one value per table index (the last call's)."""
    L = len(timesteps)
    own = [_ramp(ramp, s, a, b, (k * N // L) / N) for k in range(L)]
    indices = [timestep_index(t, T) for t in timesteps]
    by_index = dict(zip(indices, own, strict=True))  # later calls overwrite: the least noisy wins
    return [by_index[i] for i in indices]


def _build_scheduler(spec: Any, T: int | None) -> Any:
    """A diffusers scheduler from a class name or a config mapping (``_class_name`` plus settings)."""
    if isinstance(spec, str):
        config: dict[str, Any] = {}
        name = spec
    elif isinstance(spec, Mapping):
        config = {str(k): v for k, v in spec.items() if k != "_class_name"}
        name = spec.get("_class_name")
        if not isinstance(name, str):
            raise ValueError("scheduler: a scheduler config needs '_class_name' (e.g. 'EulerDiscreteScheduler')")
    else:
        raise TypeError(f"scheduler: expected a diffusers scheduler class name or config, got {_r(spec)}")
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"scheduler: {name!r} needs diffusers installed (or give the resolved 'timesteps')") from None
    # only *Scheduler names are looked up: a pipeline or model name would import half of diffusers
    scheduler_cls = getattr(diffusers, name, None) if name.isidentifier() and name.endswith("Scheduler") else None
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, diffusers.SchedulerMixin)):
        raise ValueError(f"scheduler: {name!r} is not a diffusers scheduler class (e.g. 'DDIMScheduler')")
    if T is not None and config.setdefault("num_train_timesteps", T) != T:
        raise ValueError(
            f"num_train_timesteps: {T} disagrees with the scheduler config's {config['num_train_timesteps']!r}"
        )
    try:
        return scheduler_cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"scheduler: cannot build {name} from {_r(config)}: {exc}") from None


def _freeze(value: Any) -> Any:
    """A deep copy in which lists are tuples and mappings are plain dicts (held privately)."""
    if isinstance(value, Mapping):
        return {k: _freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """A fresh JSON-style deep copy of a frozen value: tuples become lists, dicts new dicts."""
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class BypassSchedule:
    """λ(t) for the mid-block bypass ``m' = (1 - λ)·m + λ·h`` (see METHOD.md).

    Build one with :meth:`constant`, :meth:`linear`, :meth:`cosine`, :meth:`from_table`,
    :meth:`from_steps` or :meth:`for_scheduler` (λ by fraction of sampling). A schedule is an
    immutable value. ``linear`` and ``cosine`` rise from 0 at ``t_min`` to ``strength`` at
    ``t_max``, so the bypass is strongest at the noisiest step and fades out as denoising
    proceeds; λ is 0 outside ``[t_min, t_max]``.
    """

    __slots__ = ("_T", "_params", "_shape", "_table")

    def __init__(self, shape: str, params: Mapping[str, Any], num_train_timesteps: int, table: torch.Tensor):
        # Use the constructors; this one trusts its arguments. A schedule is a value: it keeps its
        # own frozen copy of every input (lists become tuples, mappings are copied) and hands out
        # only fresh containers (to_dict, table), so nothing outside can change it after this.
        object.__setattr__(self, "_shape", shape)
        object.__setattr__(self, "_params", _freeze(params))
        object.__setattr__(self, "_T", num_train_timesteps)
        object.__setattr__(self, "_table", table.detach().to("cpu", torch.float32, copy=True))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"BypassSchedule is immutable: cannot set {name!r}; build a new schedule instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"BypassSchedule is immutable: cannot delete {name!r}")

    def __reduce__(self):
        # pickle and copy rebuild through from_dict (validated), not by setting attributes
        return (_from_dict, (self.to_dict(),))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def _analytic(cls, shape: str, strength, t_min, t_max, num_train_timesteps) -> BypassSchedule:
        T = _check_T(num_train_timesteps)
        s = _check_strength(strength)
        lo = _check_timestep_bound(t_min, "t_min", T)
        hi = T - 1 if t_max is None else _check_timestep_bound(t_max, "t_max", T)
        if lo >= hi:
            raise ValueError(f"t_min must be below t_max, got t_min={lo}, t_max={hi}")
        t = torch.arange(T, dtype=torch.float64)
        frac = ((t - lo) / (hi - lo)).clamp(0.0, 1.0)
        if shape == "constant":
            ramp = torch.ones_like(t)
        elif shape == "linear":
            ramp = frac
        else:  # cosine
            ramp = (1.0 - torch.cos(math.pi * frac)) / 2.0
        active = (t >= lo) & (t <= hi)
        table = torch.where(active, s * ramp, torch.zeros_like(t)).to(torch.float32)
        return cls(shape, {"strength": s, "t_min": lo, "t_max": hi}, T, table)

    @classmethod
    def constant(cls, strength: float, t_min: int = 0, t_max: int | None = None, *, num_train_timesteps: int = 1000):
        """λ = strength on [t_min, t_max], 0 elsewhere."""
        return cls._analytic("constant", strength, t_min, t_max, num_train_timesteps)

    @classmethod
    def linear(cls, strength: float, t_min: int = 0, t_max: int | None = None, *, num_train_timesteps: int = 1000):
        """λ rises linearly from 0 at t_min to strength at t_max; 0 outside."""
        return cls._analytic("linear", strength, t_min, t_max, num_train_timesteps)

    @classmethod
    def cosine(cls, strength: float, t_min: int = 0, t_max: int | None = None, *, num_train_timesteps: int = 1000):
        """λ = strength·(1 − cos(π·(t − t_min)/(t_max − t_min)))/2 on [t_min, t_max]; 0 outside."""
        return cls._analytic("cosine", strength, t_min, t_max, num_train_timesteps)

    @classmethod
    def from_table(cls, values, *, num_train_timesteps: int = 1000) -> BypassSchedule:
        """λ given for every integer timestep 0..T-1 (values are stored as float32)."""
        T = _check_T(num_train_timesteps)
        floats = _as_float_list(values, "values")
        if len(floats) != T:
            raise ValueError(f"values: expected {T} entries (num_train_timesteps), got {len(floats)}")
        for i, v in enumerate(floats):
            if not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"values[{i}]: expected a finite number in [0, 1], got {v!r}")
        table = torch.tensor(floats, dtype=torch.float32)
        return cls("table", {}, T, table)

    @classmethod
    def from_steps(cls, timesteps, strengths, *, num_train_timesteps: int = 1000) -> BypassSchedule:
        """λ per sampler step, keyed by the sampler's timesteps (e.g. ``scheduler.timesteps``).

        Each timestep is rounded to its table index; every other index gets λ = 0.
        """
        T = _check_T(num_train_timesteps)
        ts = _as_float_list(timesteps, "timesteps")
        ss = _as_float_list(strengths, "strengths")
        if len(ts) != len(ss):
            raise ValueError(f"timesteps and strengths must have the same length, got {len(ts)} and {len(ss)}")
        if not ts:
            raise ValueError("timesteps: expected at least one step")
        table = torch.zeros(T, dtype=torch.float32)
        seen: dict[int, float] = {}
        for i, (t, s) in enumerate(zip(ts, ss, strict=True)):
            if not math.isfinite(t) or not 0 <= t <= T - 1:
                raise ValueError(f"timesteps[{i}]: expected a timestep in [0, {T - 1}], got {t!r}")
            s = _check_strength(s, f"strengths[{i}]")
            idx = timestep_index(t, T)
            s32 = float(torch.tensor(s, dtype=torch.float32))
            if idx in seen and seen[idx] != s32:
                raise ValueError(
                    f"timesteps[{i}]={t!r} rounds to index {idx}, which an earlier step gave another strength"
                )
            seen[idx] = s32
            table[idx] = s
        params = {"timesteps": ts, "strengths": ss}
        return cls("steps", params, T, table)

    @classmethod
    def for_scheduler(
        cls,
        scheduler,
        num_inference_steps: int,
        strength: float,
        *,
        start: float = 0.0,
        end: float = 1.0,
        shape: str = "linear",
    ) -> BypassSchedule:
        """λ by fraction of sampling: active on the part ``[start, end)`` of the scheduler's steps.

        Step i of N = ``num_inference_steps`` (i = 0 the noisiest) has progress p = i/N. On
        ``start <= p < end``, λ is ``strength`` (``shape="constant"``),
        ``strength·(end − p)/(end − start)`` (``"linear"``, fading from strength at ``start``) or
        ``strength·(1 + cos(π(p − start)/(end − start)))/2`` (``"cosine"``); outside it λ is 0.

        The timesteps are those ``scheduler.set_timesteps(num_inference_steps)`` gives, read from a
        deep copy (the scheduler passed in is not changed). When a scheduler calls the model more
        than once per step (Heun, KDPM2: ``len(timesteps)`` = L > N), call k belongs to step
        ``k·N // L``. The result is a per-step table (as :meth:`from_steps`): each visited timestep,
        at its index ``round_half_to_even(float32(t))``, gets its step's λ; every other index gets 0,
        so use it with the scheduler and step count it was made for (image-to-image with them
        visits a tail of the same timesteps and gets their λ).

        Repeated index rule: when several calls land on one index (Heun's corrector of step i
        runs at step i+1's timestep; Karras sigmas and fractional timesteps can round two steps
        to one index), the entry takes the λ of the **last, least noisy** of those calls. A
        timestep is then weighted by where it sits in the schedule: the timestep at which step i
        starts gets exactly λ(i/N), unless a later step starts at the same index.
        """
        T, name = _check_scheduler(scheduler)
        N = _check_num_inference_steps(num_inference_steps)
        s = _check_strength(strength)
        a, b = _check_fraction(start, "start"), _check_fraction(end, "end")
        if a >= b:
            raise ValueError(f"start must be below end, got start={a!r}, end={b!r}")
        ramp = _check_ramp(shape, "shape")
        return cls._for_visits(name, _visited_timesteps(scheduler, N), N, s, a, b, ramp, T)

    @classmethod
    def _for_visits(cls, name: str, timesteps: list[float], N: int, s: float, a: float, b: float, ramp: str, T: int):
        strengths = _per_call_strengths(timesteps, N, s, a, b, ramp, T)
        # the table is the per-step table of from_steps (timesteps outside [0, T-1] read the clamped end)
        steps = cls.from_steps([min(max(t, 0.0), T - 1.0) for t in timesteps], strengths, num_train_timesteps=T)
        params = {
            "scheduler": name,
            "num_inference_steps": N,
            "strength": s,
            "start": a,
            "end": b,
            "ramp": ramp,
            "timesteps": timesteps,
        }
        return cls("for_scheduler", params, T, steps._table)

    # ----------------------------------------------------------------- accessors
    @property
    def shape(self) -> str:
        return self._shape

    @property
    def num_train_timesteps(self) -> int:
        return self._T

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The float32 table of length T (a new tensor each call)."""
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device: expected a torch.device or a string, got {device!r}")
        try:
            device = None if device is None else torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device: {exc}") from None
        try:
            return self._table.to(device=device, copy=True)
        except (AssertionError, RuntimeError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
            raise ValueError(f"device: cannot use {str(device)!r} here: {exc}") from None

    def weight(self, t) -> float:
        """λ at timestep t, exactly as every backend reads it from the table."""
        return float(self._table[timestep_index(t, self._T)])

    @property
    def max_strength(self) -> float:
        return float(self._table.max())

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description (fresh containers on every call): ``from_dict(to_dict())`` is exact."""
        d: dict[str, Any] = {"shape": self._shape, "num_train_timesteps": self._T}
        if self._shape == "table":
            d["values"] = self._table.tolist()
        else:
            d.update(_thaw(self._params))
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BypassSchedule:
        """The schedule described by ``data`` (a :meth:`to_dict` result); every key is checked."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a mapping from to_dict(), got {type(data).__name__}")
        if "shape" not in data:
            raise ValueError("schedule: missing key 'shape'")
        shape = data["shape"]
        if not isinstance(shape, str) or shape not in _KEYS:
            raise ValueError(f"shape: expected one of {', '.join(_KEYS)}, got {shape!r}")
        required, optional = _KEYS[shape]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{shape} schedule: missing key {missing[0]!r} (it needs {', '.join(required)})")
        unknown = sorted(str(k) for k in data if k not in required and k not in optional and k != "shape")
        if unknown:
            raise ValueError(f"{shape} schedule: unexpected key {unknown[0]!r}")
        if shape == "for_scheduler":
            return cls._for_scheduler_from_dict(data)
        T = data.get("num_train_timesteps", 1000)
        if shape == "table":
            return cls.from_table(data["values"], num_train_timesteps=T)
        if shape == "steps":
            return cls.from_steps(data["timesteps"], data["strengths"], num_train_timesteps=T)
        return getattr(cls, shape)(data["strength"], data.get("t_min", 0), data.get("t_max"), num_train_timesteps=T)

    @classmethod
    def _for_scheduler_from_dict(cls, data: Mapping[str, Any]) -> BypassSchedule:
        N = _check_num_inference_steps(data["num_inference_steps"])
        s = _check_strength(data["strength"])
        a, b = _check_fraction(data.get("start", 0.0), "start"), _check_fraction(data.get("end", 1.0), "end")
        if a >= b:
            raise ValueError(f"start must be below end, got start={a!r}, end={b!r}")
        ramp = _check_ramp(data.get("ramp", "linear"), "ramp")
        spec = data["scheduler"]
        if "timesteps" not in data:  # a hand-written record: build the scheduler and read its timesteps
            T = data.get("num_train_timesteps")
            scheduler = _build_scheduler(spec, None if T is None else _check_T(T))
            return cls.for_scheduler(scheduler, N, s, start=a, end=b, shape=ramp)
        # the resolved timesteps are authoritative: no scheduler (nor diffusers) is needed to rebuild
        T = _check_T(data.get("num_train_timesteps", 1000))
        name = spec.get("_class_name") if isinstance(spec, Mapping) else spec
        if not isinstance(name, str) or not name:
            raise TypeError(f"scheduler: expected a scheduler class name, got {_r(spec)}")
        timesteps = _as_float_list(data["timesteps"], "timesteps")
        if not timesteps:
            raise ValueError("timesteps: expected at least one timestep")
        for i, t in enumerate(timesteps):
            if not math.isfinite(t):
                raise ValueError(f"timesteps[{i}]: expected a finite timestep, got {t!r}")
        return cls._for_visits(name, timesteps, N, s, a, b, ramp, T)

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | BypassSchedule | None, *, num_train_timesteps: int = 1000):
        """A schedule from a command-line spec.

        Accepts ``"default"``, ``"off"``, ``"SHAPE:STRENGTH[:T_MIN[:T_MAX]]"`` (e.g. ``linear:0.3:500``),
        ``"for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]"`` (a diffusers scheduler class
        with its default config and ``num_train_timesteps``), a JSON object as text, or the path of a
        JSON file written from :meth:`to_dict` (a ``for_scheduler`` record may leave out
        ``timesteps``; its ``scheduler`` is then a class name or a config with ``_class_name``).
        """
        if spec is None or isinstance(spec, BypassSchedule):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if not isinstance(spec, str):
            raise TypeError(f"schedule spec: expected a string, got {type(spec).__name__}")
        text = spec.strip()
        if text == "default":
            return default_schedule(num_train_timesteps=num_train_timesteps)
        if text in ("off", "none"):
            return cls.constant(0.0, num_train_timesteps=num_train_timesteps)
        if text.startswith("{"):
            return cls.from_dict(_json_object(text, "schedule spec"))
        if text.endswith(".json") or os.path.isfile(text):
            try:
                with open(text, encoding="utf-8") as f:
                    content = f.read()
            except OSError as exc:
                raise ValueError(f"schedule spec: cannot read {text!r}: {exc.strerror or exc}") from None
            return cls.from_dict(_json_object(content, f"schedule spec {text!r}"))
        parts = text.split(":")
        if parts[0] == "for_scheduler":
            return cls._parse_for_scheduler(spec, parts[1:], num_train_timesteps)
        if parts[0] not in ("constant", "linear", "cosine") or not 2 <= len(parts) <= 4:
            raise ValueError(
                f"schedule spec {spec!r}: expected 'default', 'off', 'constant|linear|cosine:STRENGTH[:T_MIN[:T_MAX]]',"
                " a JSON object or a JSON file"
            )
        try:
            numbers_ = [float(parts[1])] + [int(p) for p in parts[2:]]
        except ValueError:
            raise ValueError(f"schedule spec {spec!r}: STRENGTH is a number, T_MIN and T_MAX integers") from None
        return getattr(cls, parts[0])(*numbers_, num_train_timesteps=num_train_timesteps)

    @classmethod
    def _parse_for_scheduler(cls, spec: str, parts: list[str], T: int) -> BypassSchedule:
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
        scheduler = _build_scheduler(parts[0], _check_T(T))
        return cls.for_scheduler(scheduler, steps, values[0], start=start, end=end, shape=shape)

    # ----------------------------------------------------------------- dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BypassSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        T = self._T
        if self._shape == "table":
            nz = torch.nonzero(self._table).reshape(-1)
            where = f"nonzero on [{int(nz.min())}, {int(nz.max())}]" if nz.numel() else "all zero"
            return f"BypassSchedule.from_table(<{T} values, max {self.max_strength:.4g}, {where}>)"
        if self._shape == "for_scheduler":
            p = self._params
            return (
                f"BypassSchedule.for_scheduler(<{p['scheduler']}: {len(p['timesteps'])} timesteps>,"
                f" num_inference_steps={p['num_inference_steps']}, strength={p['strength']:g}, start={p['start']:g},"
                f" end={p['end']:g}, shape={p['ramp']!r}, num_train_timesteps={T})"
            )
        if self._shape == "steps":
            n = len(self._params["timesteps"])
            return f"BypassSchedule.from_steps(<{n} steps, max {self.max_strength:.4g}>, num_train_timesteps={T})"
        p = self._params
        return (
            f"BypassSchedule.{self._shape}(strength={p['strength']:g}, t_min={p['t_min']}, t_max={p['t_max']},"
            f" num_train_timesteps={T})"
        )


def _json_object(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise ValueError(f"{name}: invalid JSON: {exc}") from None


def _from_dict(data: Mapping[str, Any]) -> BypassSchedule:
    return BypassSchedule.from_dict(data)


def default_schedule(*, num_train_timesteps: int = 1000) -> BypassSchedule:
    """This package's own starting point, not a value from the paper: ``linear(0.3, t_min=T/2)``.

    λ rises from 0 at the middle of the timestep range to 0.3 at the noisiest timestep, so the
    bypass acts only on the high-noise half of sampling and fades out as the image forms. The
    project's own experiment (README, "Evidence") does not support any non-zero strength on its
    synthetic data; tune on your model.
    """
    T = _check_T(num_train_timesteps)
    return BypassSchedule.linear(0.3, t_min=min(T // 2, T - 2), num_train_timesteps=T)
