"""λ by fraction of sampling: the timesteps a diffusers scheduler (or pipeline) visits, the λ of
each step, and the per-step table ``BypassSchedule.for_scheduler`` stores.

Step i of N (i = 0 the noisiest) has progress p = i/N; on ``start <= p < end`` its λ follows the
ramp (constant, linear fading from ``strength``, or cosine), 0 outside. A scheduler that calls the
model L > N times (Heun, KDPM2) has call k in step ``k·N // L``. Several calls on one table index
take the λ of the last (least noisy) one. Every other index takes the λ of the nearest visited
index (half a gap beyond the first and last ones, 0 further out), so a model that sees a slightly
different timestep than the scheduler's (a pipeline that rounds t to bfloat16, as Flux's does)
reads its own step's λ.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy
import torch

from bypass_kernels._checks import as_float_list, check_T, short_repr


def timestep_index(t: float, num_train_timesteps: int) -> int:
    """Table index of one timestep: float32, round half to even, clamp to [0, T-1]; NaN reads index 0,
    as every backend, compiled graph and exported graph does."""
    T = check_T(num_train_timesteps)
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


def fresh_copy(scheduler: Any) -> Any:
    """A scheduler built from ``scheduler``'s config alone, to call ``set_timesteps`` on without touching
    the one a pipeline holds. Not a deep copy: that would copy what this package does not own (an
    engine's wrapper whose ``__getattr__`` forwards to the scheduler recursed through it for minutes).
    ``scheduler.from_config`` is found on the instance, so a forwarding wrapper gives its scheduler's."""
    from_config = getattr(scheduler, "from_config", None)
    if callable(from_config):
        with contextlib.suppress(Exception):  # a from_config of another signature: the copy below
            return from_config(scheduler.config)
    return copy.deepcopy(scheduler)


def scheduler_name(scheduler: Any) -> str:
    """The scheduler's class name; a forwarding wrapper's scheduler's (its ``from_config`` is bound to that class)."""
    cls = getattr(getattr(scheduler, "from_config", None), "__self__", None)
    return cls.__name__ if isinstance(cls, type) else type(scheduler).__name__


def visited_timesteps(scheduler: Any, N: int, *, mu: float | None = None, sigmas=None) -> list[float]:
    """``scheduler.timesteps`` after ``set_timesteps(N[, mu=…][, sigmas=…])``, on a fresh copy."""
    work = fresh_copy(scheduler)
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
    except Exception as exc:  # the scheduler's own failure (ZeroDivisionError, KeyError...), named as ours
        hint = ""
        if mu is None and getattr(work.config, "use_dynamic_shifting", False):
            hint = " (this scheduler shifts by image size: pass mu, or use BypassSchedule.for_pipeline)"
        raise ValueError(
            f"num_inference_steps: {type(scheduler).__name__}.set_timesteps({N}) failed: {exc}{hint}"
        ) from None
    timesteps = as_float_list(work.timesteps, "scheduler.timesteps")
    if not timesteps:
        raise ValueError(f"scheduler: set_timesteps({N}) gave no timesteps")
    if work.config.get("invert_sigmas", False):  # Mochi's: the model gets T − t; the table is read at t
        T = work.config["num_train_timesteps"]
        timesteps = [T - t for t in timesteps]
    for i, t in enumerate(timesteps):
        if not math.isfinite(t):
            raise ValueError(f"scheduler.timesteps[{i}]: expected a finite timestep, got {t!r}")
    return timesteps


# Schedulers whose pipelines give the model a function of the scheduler's timestep (SanaSprintPipeline:
# SCMScheduler's angle t becomes sin t / (sin t + cos t) in [0, 1]), by class name
MODEL_TIMESTEP = {"SCMScheduler": lambda t: math.sin(t) / (math.sin(t) + math.cos(t))}
# The step counts (and a flow-matching shift mu) tried until a scheduler gives its timesteps
_PROBES: tuple[tuple[int, float | None], ...] = ((10, None), (10, 0.0), (2, None), (1, None))


def model_timesteps(scheduler: Any) -> tuple[list[float], str]:
    """(the timesteps a pipeline running ``scheduler`` gives its model, the scheduler's class name), from
    the first of a few step counts its ``set_timesteps`` accepts (SCMScheduler takes 2; a scheduler that
    shifts by image size gets mu = 0). ValueError names each failure where none works."""
    failures = []
    for N, mu in _PROBES:
        try:
            visited = visited_timesteps(scheduler, N, mu=mu)
        except ValueError as exc:
            failures.append(str(exc))
            continue
        name = scheduler_name(scheduler)
        to_model = MODEL_TIMESTEP.get(name)
        return ([to_model(t) for t in visited] if to_model else visited), name
    raise ValueError("; ".join(dict.fromkeys(failures)))


DISCRETE_SCHEDULERS = "a scheduler with discrete timesteps (DDIM, DPMSolverMultistep, Euler, UniPC...)"


def continuous_noise_levels(timesteps: list[float], T: int, name: str) -> str | None:
    """Why a scheduler's timesteps are no timesteps in [0, T) but a continuous noise level (EDM's
    ln(σ)/4: EDMEuler, EDMDPMSolverMultistep, Euler with timestep_type="continuous" as SVD and CosXL
    use; a cosine or score-SDE scheduler's t in [0, 1]), or None. The table is read by timestep, so
    every step of such a scheduler reads index 0 or 1."""
    lo, hi = min(timesteps), max(timesteps)
    if lo < -0.5 or (len(set(timesteps)) > 1 and hi < 0.02 * T):
        return (
            f"{name} gives the model timesteps from {lo:.3g} to {hi:.3g}, a continuous noise level (such as "
            f"EDM's ln(sigma)/4), not timesteps in [0, {T}), and λ is read by timestep"
        )
    return None


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


def pipeline_arguments(
    pipe: Any, N: int, height: int | None, width: int | None, num_frames: int | None = None
) -> dict[str, Any]:
    """What the pipeline passes to ``set_timesteps`` besides N (diffusers 0.42): Flux, QwenImage and
    LTX-Video pipelines pass ``sigmas = linspace(1, 1/N, N)`` and ``mu`` from the latent length;
    SD3 passes ``mu`` when its scheduler shifts by image size; HunyuanVideo passes
    ``sigmas = linspace(1, 0, N + 1)[:-1]``; Mochi its linear-quadratic sigmas. Other pipelines pass
    nothing more (one not listed here whose ``__call__`` computes sigmas or ``mu`` itself warns)."""
    config = pipe.scheduler.config
    name = type(pipe).__name__
    height, width, num_frames = _call_defaults(pipe, height, width, num_frames)
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    to_one = numpy.linspace(1.0, 1 / N, N).tolist()
    if name.startswith("Flux"):
        seq = (height // (vae_scale * 2)) * (width // (vae_scale * 2))
        out: dict[str, Any] = {} if getattr(config, "use_flow_sigmas", False) else {"sigmas": to_one}
        out["mu"] = shift_mu(seq, config, max_shift=1.15)
        return out
    if name.startswith("QwenImage"):  # packed 2x2 latents
        seq = (height // vae_scale // 2) * (width // vae_scale // 2)
        return {"sigmas": to_one, "mu": shift_mu(seq, config, max_shift=1.15)}
    if name in ("LTXPipeline", "LTXImageToVideoPipeline"):
        spatial = getattr(pipe, "vae_spatial_compression_ratio", 32)
        temporal = getattr(pipe, "vae_temporal_compression_ratio", 8)
        seq = ((num_frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)
        return {"sigmas": to_one, "mu": shift_mu(seq, config, max_shift=1.15)}
    if name in ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"):
        return {"sigmas": numpy.linspace(1.0, 0.0, N + 1)[:-1].tolist()}
    if name == "MochiPipeline":
        return {"sigmas": linear_quadratic_sigmas(N, 0.025)}
    if name.startswith("StableDiffusion3"):
        if not config.get("use_dynamic_shifting", None):
            return {}
        patch = pipe.transformer.config.patch_size
        seq = (height // vae_scale // patch) * (width // vae_scale // patch)
        return {"mu": shift_mu(seq, config, max_shift=1.16)}
    if _sets_its_own_sigmas(pipe):
        warnings.warn(
            f"BypassSchedule.for_pipeline: how {name} sets its scheduler's sigmas is not known here; the "
            f"table follows set_timesteps({N}). If the pipeline passes its own sigmas or mu, build the "
            "schedule with BypassSchedule.for_scheduler(pipe.scheduler, N, ..., sigmas=..., mu=...)",
            stacklevel=3,
        )
    return {}


def _sets_its_own_sigmas(pipe: Any) -> bool:
    """Whether the pipeline's ``__call__`` computes sigmas or a shift ``mu`` itself (read from its source)."""
    try:
        source = inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return False
    return "sigmas = " in source or "mu = " in source


def _call_defaults(pipe: Any, height, width, num_frames) -> tuple[int, int, int]:
    """The pipeline's own defaults where not given: its ``__call__``'s, else its default sample size."""
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        params = {}

    def default(key, fallback):
        value = params[key].default if key in params else None
        return value if isinstance(value, int) and not isinstance(value, bool) else fallback

    size = getattr(pipe, "default_sample_size", 128) * getattr(pipe, "vae_scale_factor", 8)
    return (
        height or default("height", size),
        width or default("width", size),
        num_frames or default("num_frames", 1),
    )


def linear_quadratic_sigmas(N: int, threshold: float) -> list[float]:
    """Mochi's sampling sigmas: noise falls linearly to ``threshold`` over the first N // 2 steps, then
    along a quadratic that reaches 1 at step N with a continuous slope; σ = 1 − noise."""
    if N < 2:
        raise ValueError(f"num_inference_steps: Mochi's sigmas need at least 2 steps, got {N}")
    half = N // 2
    rest = N - half
    excess = half - threshold * N
    quad = excess / (half * rest**2)
    lin = threshold / half - 2 * excess / rest**2
    noise = [i * threshold / half for i in range(half)]
    noise += [quad * i * i + lin * i + quad * half * half for i in range(half, N)]
    return [1.0 - x for x in noise]


def shift_mu(image_seq_len: int, config: Mapping, *, max_shift: float) -> float:
    """The image-size shift of flow-matching pipelines (diffusers' ``calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    m = (top - base) / (max_len - base_len)
    return image_seq_len * m + base - m * base_len
