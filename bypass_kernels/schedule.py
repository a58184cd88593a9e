"""Bypass schedules: the weight λ(t) of the bypass at each training timestep.

A schedule is an immutable value (shape, strength, active range) that renders to a float32 table
of length T = ``num_train_timesteps``. Every backend, the compiled graph and the exported
ONNX/TensorRT graph read λ from that table at ``idx = clamp(round_half_to_even(float32(t)), 0, T - 1)``.
Constructors live here; λ by fraction of sampling is worked out in ``bypass_kernels.steps``,
records and spec strings are read in ``bypass_kernels.spec``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from bypass_kernels import spec, steps
from bypass_kernels._checks import (
    MAX_TRAIN_TIMESTEPS,
    as_float,
    as_float_list,
    check_fraction,
    check_num_inference_steps,
    check_ramp,
    check_strength,
    check_T,
    check_timestep_bound,
)
from bypass_kernels.steps import timestep_index  # the table index every backend reads

__all__ = ["MAX_TRAIN_TIMESTEPS", "BypassSchedule", "default_schedule", "timestep_index"]


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
    """λ(t) for the mid-block bypass ``m' = (1 - λ)·m + λ·h`` (docs/method.md).

    Build one with ``constant``, ``linear``, ``cosine``, ``from_table``,
    ``from_steps`` or ``for_scheduler`` (λ by fraction of sampling). A schedule is an
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
        T = check_T(num_train_timesteps)
        s = check_strength(strength)
        lo = check_timestep_bound(t_min, "t_min", T)
        hi = T - 1 if t_max is None else check_timestep_bound(t_max, "t_max", T)
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
        T = check_T(num_train_timesteps)
        floats = as_float_list(values, "values")
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
        T = check_T(num_train_timesteps)
        ts = as_float_list(timesteps, "timesteps")
        ss = as_float_list(strengths, "strengths")
        if len(ts) != len(ss):
            raise ValueError(f"timesteps and strengths must have the same length, got {len(ts)} and {len(ss)}")
        if not ts:
            raise ValueError("timesteps: expected at least one step")
        table = torch.zeros(T, dtype=torch.float32)
        seen: dict[int, float] = {}
        for i, (t, s) in enumerate(zip(ts, ss, strict=True)):
            if not math.isfinite(t) or not 0 <= t <= T - 1:
                raise ValueError(f"timesteps[{i}]: expected a timestep in [0, {T - 1}], got {t!r}")
            s = check_strength(s, f"strengths[{i}]")
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
        mu: float | None = None,
        sigmas=None,
    ) -> BypassSchedule:
        """λ by fraction of sampling: active on the part ``[start, end)`` of the scheduler's steps.

        Step i of N = ``num_inference_steps`` (i = 0 the noisiest) has progress p = i/N. On
        ``start <= p < end``, λ is ``strength`` (``shape="constant"``),
        ``strength·(end − p)/(end − start)`` (``"linear"``, fading from strength at ``start``) or
        ``strength·(1 + cos(π(p − start)/(end − start)))/2`` (``"cosine"``); outside it λ is 0.

        The timesteps are those ``scheduler.set_timesteps(num_inference_steps)`` gives (with ``mu``
        and ``sigmas`` when given: flow-matching schedulers that shift by image size need ``mu``;
        ``for_pipeline`` works both out as the pipeline does), read from a deep copy (the
        scheduler passed in is not changed). When a scheduler calls the model more than once per
        step (Heun, KDPM2: ``len(timesteps)`` = L > N), call k belongs to step ``k·N // L``.

        The table: each visited timestep, at its index ``round_half_to_even(float32(t))``, gets its
        step's λ; every other index gets the λ of the nearest visited index (half a gap beyond the
        first and last, 0 further out), so a model that sees a slightly different timestep (Flux
        pipelines round t to bfloat16) reads its own step's λ. Use it with the scheduler and step
        count it was made for (image-to-image with them visits a tail of the same timesteps).

        Repeated index rule: when several calls land on one index (Heun's corrector of step i
        runs at step i+1's timestep; Karras sigmas and fractional timesteps can round two steps
        to one index), the entry takes the λ of the **last, least noisy** of those calls. A
        timestep is then weighted by where it sits in the schedule: the timestep at which step i
        starts gets exactly λ(i/N), unless a later step starts at the same index.
        """
        T, name = steps.check_scheduler(scheduler)
        N = check_num_inference_steps(num_inference_steps)
        s = check_strength(strength)
        a, b = check_fraction(start, "start"), check_fraction(end, "end")
        if a >= b:
            raise ValueError(f"start must be below end, got start={a!r}, end={b!r}")
        ramp = check_ramp(shape, "shape")
        if mu is not None:
            mu = as_float(mu, "mu")
        if sigmas is not None:
            sigmas = as_float_list(sigmas, "sigmas")
        visited = steps.visited_timesteps(scheduler, N, mu=mu, sigmas=sigmas)
        why = steps.continuous_noise_levels(visited, T, name)
        if why is not None:  # every step would collapse onto table index 0 or 1
            raise ValueError(
                f"scheduler: {why}; a per-step table cannot tell its steps apart. Use {steps.DISCRETE_SCHEDULERS}"
            )
        return cls._for_visits(name, visited, N, s, a, b, ramp, T, mu=mu, sigmas=sigmas)

    @classmethod
    def for_pipeline(
        cls,
        pipe,
        num_inference_steps: int,
        strength: float,
        *,
        start: float = 0.0,
        end: float = 1.0,
        shape: str = "linear",
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
    ) -> BypassSchedule:
        """``for_scheduler`` with the timesteps ``pipe`` itself samples at for that size:
        Flux, QwenImage and LTX-Video pipelines set ``sigmas = linspace(1, 1/N, N)`` and shift by
        the latent length (``mu``), SD3 shifts when its scheduler is set to
        (``use_dynamic_shifting``), HunyuanVideo sets ``sigmas = linspace(1, 0, N + 1)[:-1]``, Mochi
        its linear-quadratic sigmas (its scheduler inverts them: the table is read at T − t, as the
        patch reads a Mochi transformer's timestep); other pipelines use ``set_timesteps(N)``, and
        one not listed whose ``__call__`` computes sigmas or ``mu`` itself warns. ``height``,
        ``width`` and ``num_frames`` (LTX) default to the pipeline's own."""
        N = check_num_inference_steps(num_inference_steps)
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise TypeError(f"pipe: expected a diffusers pipeline with a scheduler, got {type(pipe).__name__}")
        extra = steps.pipeline_arguments(pipe, N, height, width, num_frames)
        return cls.for_scheduler(scheduler, N, strength, start=start, end=end, shape=shape, **extra)

    @classmethod
    def _for_visits(cls, name: str, timesteps, N, s, a, b, ramp, T, *, mu=None, sigmas=None) -> BypassSchedule:
        params = {
            "scheduler": name,
            "num_inference_steps": N,
            "strength": s,
            "start": a,
            "end": b,
            "ramp": ramp,
            "timesteps": timesteps,
        }
        if mu is not None:
            params["mu"] = mu
        if sigmas is not None:
            params["sigmas"] = list(sigmas)
        return cls("for_scheduler", params, T, steps.per_step_table(timesteps, N, s, a, b, ramp, T))

    # ----------------------------------------------------------------- accessors
    @property
    def shape(self) -> str:
        return self._shape

    @property
    def num_train_timesteps(self) -> int:
        return self._T

    @staticmethod
    def stack(schedules, device: torch.device | str | None = None) -> torch.Tensor:
        """A [len(schedules), T] float32 table, row i the table of ``schedules[i]``: a schedule per
        sample, as ``bypass_kernels.blend_`` and ``bypass_kernels.per_sample`` take it."""
        schedules = list(schedules)
        if not schedules or not all(isinstance(s, BypassSchedule) for s in schedules):
            raise TypeError("schedules: expected a non-empty sequence of BypassSchedule")
        lengths = {s.num_train_timesteps for s in schedules}
        if len(lengths) > 1:
            raise ValueError(f"schedules: built for different num_train_timesteps ({sorted(lengths)}); use one T")
        return torch.stack([s.table(device) for s in schedules])

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
        """The schedule described by ``data`` (a ``to_dict`` result); every key is checked."""
        return spec.from_dict(cls, data)

    @classmethod
    def parse(
        cls,
        text: str | Mapping[str, Any] | BypassSchedule | None,
        *,
        num_train_timesteps: int = 1000,
        files: bool = True,
    ):
        """A schedule from a command-line spec.

        Accepts ``"default"``, ``"off"``, ``"SHAPE:STRENGTH[:T_MIN[:T_MAX]]"`` (e.g. ``linear:0.3:500``),
        ``"for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]"`` (a diffusers scheduler class
        with its default config and ``num_train_timesteps``), a JSON object as text, or the path of a
        JSON file written from ``to_dict`` (a ``for_scheduler`` record may leave out
        ``timesteps``; its ``scheduler`` is then a class name or a config with ``_class_name``).
        ``files=False``: a text is never opened as a file (for schedules from untrusted places).
        """
        return spec.parse(cls, text, num_train_timesteps, files)

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


def _from_dict(data: Mapping[str, Any]) -> BypassSchedule:
    return BypassSchedule.from_dict(data)


def default_schedule(*, num_train_timesteps: int = 1000) -> BypassSchedule:
    """This package's own starting point, not a value from the paper: ``linear(0.3, t_min=T/2)``.

    λ rises from 0 at the middle of the timestep range to 0.3 at the noisiest timestep, so the
    bypass acts only on the high-noise half of sampling and fades out as the image forms. This
    package's own experiments (documentation, "Evidence") do not support any non-zero strength on
    their small models; tune on your model.
    """
    return spec.default(BypassSchedule, num_train_timesteps)
