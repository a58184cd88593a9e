"""λ by fraction of sampling: the timesteps a diffusers scheduler (or pipeline) visits, the λ of
each step, and the per-step table :meth:`BypassSchedule.for_scheduler` stores.

Step i of N (i = 0 the noisiest) has progress p = i/N; on ``start <= p < end`` its λ follows the
ramp (constant, linear fading from ``strength``, or cosine), 0 outside. A scheduler that calls the
model L > N times (Heun, KDPM2) has call k in step ``k·N // L``. Several calls on one table index
take the λ of the last (least noisy) one. Every other index takes the λ of the nearest visited
index (half a gap beyond the first and last ones, 0 further out), so a model that sees a slightly
different timestep than the scheduler's (a pipeline that rounds t to bfloat16, as Flux's does)
reads its own step's λ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy
import torch

from bypass_kernels._checks import as_float_list, check_T, short_repr


def check_scheduler(scheduler: Any) -> tuple[int, str]:
    config = getattr(scheduler, "config", None)
    if (
        isinstance(scheduler, type)
        or not callable(getattr(scheduler, "set_timesteps", None))
        or not isinstance(config, Mapping)
    ):
        raise TypeError(f"scheduler: expected a diffusers scheduler instance, got {short_repr(scheduler)}")
    if "num_train_timesteps" not in config:
        raise ValueError("scheduler: its config has no num_train_timesteps")
    try:
        T = check_T(config["num_train_timesteps"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"scheduler.config.{exc}") from None
    return T, type(scheduler).__name__


def visited_timesteps(scheduler: Any, N: int, *, mu: float | None = None, sigmas=None) -> list[float]:
    """``scheduler.timesteps`` after ``set_timesteps(N[, mu=…][, sigmas=…])``, on a deep copy."""
    work = copy.deepcopy(scheduler)
    kwargs: dict[str, Any] = {"device": "cpu"}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is not None:
        kwargs["sigmas"] = list(sigmas)
    try:
        if sigmas is not None:
            work.set_timesteps(**kwargs)
        else:
            work.set_timesteps(N, **kwargs)
    except (TypeError, ValueError) as exc:
        hint = ""
        if mu is None and getattr(work.config, "use_dynamic_shifting", False):
            hint = " (this scheduler shifts by image size: pass mu, or use BypassSchedule.for_pipeline)"
        raise ValueError(
            f"num_inference_steps: {type(scheduler).__name__}.set_timesteps({N}) failed: {exc}{hint}"
        ) from None
    timesteps = as_float_list(work.timesteps, "scheduler.timesteps")
    if not timesteps:
        raise ValueError(f"scheduler: set_timesteps({N}) gave no timesteps")
    for i, t in enumerate(timesteps):
        if not math.isfinite(t):
            raise ValueError(f"scheduler.timesteps[{i}]: expected a finite timestep, got {t!r}")
    return timesteps


def ramp(shape: str, s: float, a: float, b: float, p: float) -> float:
    if not a <= p < b:
        return 0.0
    if shape == "constant":
        return s
    if shape == "linear":
        return s * (b - p) / (b - a)
    return s * (1.0 + math.cos(math.pi * (p - a) / (b - a))) / 2.0


def per_step_table(timesteps: list[float], N: int, s: float, a: float, b: float, shape: str, T: int) -> torch.Tensor:
    """The float32 table: each visited index its step's λ (the last call's), others the nearest's."""
    from bypass_kernels.schedule import timestep_index

    L = len(timesteps)
    by_index: dict[int, float] = {}
    for k, t in enumerate(timesteps):  # later calls overwrite: the least noisy wins
        by_index[timestep_index(min(max(t, 0.0), T - 1.0), T)] = ramp(shape, s, a, b, (k * N // L) / N)
    return nearest_fill(by_index, T)


def nearest_fill(by_index: dict[int, float], T: int) -> torch.Tensor:
    """A table of length T from values at some indices: each index takes the value of the nearest
    given index (a tie takes the lower, less noisy one), up to half a gap beyond the outermost; 0 further out."""
    indices = sorted(by_index)
    values = torch.tensor([by_index[i] for i in indices], dtype=torch.float32)
    at = torch.tensor(indices, dtype=torch.long)
    table = torch.zeros(T, dtype=torch.float32)
    if len(indices) == 1:
        table[at] = values
        return table
    lo = max(0, indices[0] - (indices[1] - indices[0]) // 2)
    hi = min(T - 1, indices[-1] + (indices[-1] - indices[-2]) // 2)
    k = torch.arange(lo, hi + 1)
    right = torch.searchsorted(at, k).clamp(max=len(indices) - 1)  # first given index >= k
    left = (right - 1).clamp(min=0)
    nearer_left = (k - at[left]) <= (at[right] - k)
    table[lo : hi + 1] = torch.where(nearer_left, values[left], values[right])
    return table


def build_scheduler(spec: Any, T: int | None) -> Any:
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
        raise TypeError(f"scheduler: expected a diffusers scheduler class name or config, got {short_repr(spec)}")
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
        raise ValueError(f"scheduler: cannot build {name} from {short_repr(config)}: {exc}") from None


def pipeline_arguments(pipe: Any, N: int, height: int | None, width: int | None) -> dict[str, Any]:
    """What the pipeline passes to ``set_timesteps`` besides N (diffusers 0.42): Flux-family pipelines
    pass ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from the packed latent length; SD3 passes ``mu``
    when its scheduler shifts by image size; other pipelines pass nothing more."""
    scheduler = pipe.scheduler
    config = scheduler.config
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    size = getattr(pipe, "default_sample_size", 128) * vae_scale
    height, width = height or size, width or size
    name = type(pipe).__name__
    if name.startswith("Flux"):
        seq = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        out: dict[str, Any] = {"sigmas": numpy.linspace(1.0, 1 / N, N).tolist()}
        if getattr(config, "use_flow_sigmas", False):
            out = {}
        out["mu"] = shift_mu(seq, config, max_shift=1.15)
        return out
    if name.startswith("StableDiffusion3") and config.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        seq = (height // vae_scale // patch) * (width // vae_scale // patch)
        return {"mu": shift_mu(seq, config, max_shift=1.16)}
    return {}


def shift_mu(image_seq_len: int, config: Mapping, *, max_shift: float) -> float:
    """The image-size shift of flow-matching pipelines (diffusers' ``calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len
