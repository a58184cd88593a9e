"""Argument checks shared by the schedule constructors: each names the parameter it rejects."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

# float32 holds every integer up to 2**24 exactly; a table longer than that has entries that
# idx = round(float32(t)) can never reach.
MAX_TRAIN_TIMESTEPS = 2**24


def short_repr(value: Any) -> str:
    """repr for an error message, shortened (a 400-digit int stays readable)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-8:]} ({len(text)} characters)"


def as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: {short_repr(value)} is too large for a float") from None


def check_T(num_train_timesteps: Any) -> int:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
        raise TypeError(f"num_train_timesteps: expected an int, got {short_repr(num_train_timesteps)}")
    if not 2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps: expected an int in [2, 2**24] (float32 timesteps are exact up to 2**24),"
            f" got {short_repr(num_train_timesteps)}"
        )
    return int(num_train_timesteps)


def check_strength(strength: Any, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {short_repr(strength)}")
    value = as_float(strength, name)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a finite number in [0, 1], got {short_repr(strength)}")
    return value


def check_timestep_bound(value: Any, name: str, T: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected an integer timestep in [0, {T - 1}], got {short_repr(value)}")
    if not isinstance(value, numbers.Integral) and not as_float(value, name).is_integer():
        raise ValueError(f"{name}: expected an integer timestep, got {short_repr(value)}")
    if not 0 <= value <= T - 1:
        raise ValueError(
            f"{name}: expected a timestep in [0, {T - 1}] (T = num_train_timesteps), got {short_repr(value)}"
        )
    return int(value)


def as_float_list(values: Any, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist"):  # numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}[{i}]: expected a number, got {short_repr(v)}")
        out.append(as_float(v, f"{name}[{i}]"))
    return out


RAMPS = ("constant", "linear", "cosine")


def check_num_inference_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_inference_steps: expected a positive int, got {short_repr(value)}")
    if value < 1:
        raise ValueError(f"num_inference_steps: expected a positive int, got {short_repr(value)}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a fraction of sampling in [0, 1], got {short_repr(value)}")
    x = as_float(value, name)
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{name}: expected a fraction of sampling in [0, 1], got {short_repr(value)}")
    return x


def check_ramp(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {', '.join(RAMPS)}, got {short_repr(value)}")
    if value not in RAMPS:
        raise ValueError(f"{name}: expected one of {', '.join(RAMPS)}, got {value!r}")
    return value
