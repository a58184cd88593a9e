"""The scheduler check of a patched pipeline: its scheduler's ``num_train_timesteps`` against the table,
and whether the schedule ever acts on the timesteps it gives the model (a continuous noise level reads
table index 0 or 1). Judged once per scheduler object, on a scheduler built from its config."""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the controller imports this module
    from bypass_kernels.schedule import BypassSchedule
    from bypass_kernels.targets import Carrier


def check_scheduler_T(pipeline, schedule: BypassSchedule, carrier: Carrier | None = None) -> None:
    """A pipeline whose scheduler has another ``num_train_timesteps`` than the table, or gives the
    model noise levels where the schedule is 0 at every step (judged once per scheduler object and
    schedule), or whose timesteps cannot be told: refused. ``carrier``: how the model reads t (its scale
    maps what a pipeline gives the model, where that is not the scheduler's timestep)."""
    T = scheduler_T(pipeline)
    if T is not None and schedule.num_train_timesteps != T:
        raise ValueError(
            f"schedule: built for num_train_timesteps={schedule.num_train_timesteps}, but the pipeline's scheduler "
            f"has {T}; build it with num_train_timesteps={T} and call bypass_kernels.set_schedule(pipe, schedule)"
        )
    scheduler = getattr(pipeline, "scheduler", None)
    reads = (carrier.scale, carrier.offset) if carrier is not None else (1.0, 0.0)
    if T is None or scheduler is None or schedule.max_strength == 0 or _judged(scheduler, (schedule, reads)):
        return
    from bypass_kernels.steps import DISCRETE_SCHEDULERS, MODEL_TIMESTEP, continuous_noise_levels, model_timesteps

    try:
        visited, name = model_timesteps(scheduler)
    except ValueError as exc:  # not judged is not accepted: the bypass might never act
        raise ValueError(
            f"bypass_kernels: cannot tell which timesteps the pipeline's scheduler {type(scheduler).__name__} gives "
            f"the model ({exc}), so whether {schedule!r} ever acts is unknown. Patch the model itself "
            "(bypass_kernels.patch(pipe.unet) or patch(pipe.transformer)) to use it without this check"
        ) from None
    if name in MODEL_TIMESTEP:  # the model gets a function of the scheduler's t, read at the carrier's scale
        visited = [reads[0] * t + reads[1] for t in visited]
    why = continuous_noise_levels(visited, T, name)
    if why is not None and all(schedule.weight(t) == 0 for t in visited):
        hint = " (or patch with timestep_scale=1000, which reads the table at 1000·t)" if name in MODEL_TIMESTEP else ""
        raise ValueError(
            f"bypass_kernels: the pipeline's scheduler {why}: {schedule!r} is 0 at every step, so the bypass "
            f"would never act. Use {DISCRETE_SCHEDULERS}, or a schedule that is not 0 at timestep 0 "
            f"(BypassSchedule.constant(0.3), say){hint}"
        )
    with contextlib.suppress(TypeError):  # an object that cannot be weakly referenced is judged on every call
        _JUDGED_SCHEDULERS[scheduler] = (schedule, reads)


# What each scheduler was last judged with: (schedule, the carrier's scale and offset), while it lives
_JUDGED_SCHEDULERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _judged(scheduler, judged_with: tuple) -> bool:
    try:
        judged = _JUDGED_SCHEDULERS.get(scheduler)
    except TypeError:
        return False
    return (
        judged is not None
        and judged[1] == judged_with[1]
        and (judged[0] is judged_with[0] or judged[0] == judged_with[0])
    )


def scheduler_T(pipeline) -> int | None:
    """The pipeline scheduler's num_train_timesteps, or None (a bare model has no scheduler)."""
    config = getattr(getattr(pipeline, "scheduler", None), "config", None)
    T = getattr(config, "num_train_timesteps", None) if config is not None else None
    return T if isinstance(T, int) else None
