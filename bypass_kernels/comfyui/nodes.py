"""The ComfyUI node "Mid-Block / Span Bypass": MODEL in, MODEL out (a clone; the input model is never changed)."""

from __future__ import annotations

import re

from bypass_kernels.comfyui.bypass import NODE_NAME, Plan, bypass_model
from bypass_kernels.schedule import BypassSchedule

WINDOWS = ("fraction of sampling", "timesteps")
# What the schedule input takes: a spec or a JSON object, never a file path (a shared workflow must not
# read, or probe for, files on the machine that runs it)
INLINE_SPEC = re.compile(r"\{.*\}|default|off|none|(constant|linear|cosine|for_scheduler):[\w.:+-]*", re.DOTALL)


class MidBlockBypass:
    """Bypass a UNet's middle block (or a span of Flux/SD3 blocks) early in sampling, by λ(t).

    ``window="fraction of sampling"``: start/end are fractions of the sampler's steps (0 = the first,
    noisiest step), λ fades from ``strength`` at start (``linear``/``cosine``) or stays at it
    (``constant``). ``window="timesteps"``: start/end are training timesteps t_min..t_max (0..999), λ
    rising to ``strength`` at t_max. A non-empty ``schedule`` (a spec as ``bypass-kernels schedule``
    takes it, e.g. ``linear:0.3:500``) overrides both. ``span`` (Flux, SD3): ``I-J`` over the blocks in
    execution order, a preset (``sd3.5-slg``), or empty for the default middle span.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "strength": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01}),
                "shape": (["linear", "cosine", "constant"],),
                "window": (list(WINDOWS),),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 999.0, "step": 0.01}),
                "end": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 999.0, "step": 0.01}),
            },
            "optional": {
                "schedule": ("STRING", {"default": "", "multiline": False}),
                "span": ("STRING", {"default": "", "multiline": False}),
                "streams": (["all", "image"],),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "model_patches"
    DESCRIPTION = "Partially bypass the UNet's middle block (or a span of transformer blocks) early in sampling."

    def apply(self, model, strength, shape, window, start, end, schedule="", span="", streams="all"):
        return (bypass_model(model, plan(strength, shape, window, start, end, schedule), span=span, streams=streams),)


def plan(strength: float, shape: str, window: str, start: float, end: float, schedule: str = "") -> Plan:
    """The node's inputs as a ``Plan``; ValueError names a bad input."""
    if schedule and schedule.strip():
        text = schedule.strip()
        if not INLINE_SPEC.fullmatch(text):
            raise ValueError(
                f"schedule: expected a spec such as linear:0.3:500, default, off or a JSON object (the node reads "
                f"no files), got {text[:60]!r}"
            )
        return Plan(BypassSchedule.parse(text, files=False), None)
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {', '.join(WINDOWS)}, got {window!r}")
    if shape not in ("linear", "cosine", "constant"):
        raise ValueError(f"shape: expected linear, cosine or constant, got {shape!r}")
    if window == "timesteps":
        if not (float(start).is_integer() and float(end).is_integer() and 0 <= start < end <= 999):
            raise ValueError(
                f"start and end: with window 'timesteps', whole training timesteps 0 <= start < end <= 999 (t_min, "
                f"t_max), got {start}, {end}"
            )
        return Plan(getattr(BypassSchedule, shape)(strength, int(start), int(end)), None)
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"start and end: fractions of sampling with 0 <= start < end <= 1, got {start}, {end}")
    BypassSchedule.constant(strength)  # the same check of strength as every schedule
    return Plan(None, (shape, float(strength), float(start), float(end)))


NODE_CLASS_MAPPINGS = {"MidBlockBypass": MidBlockBypass}
NODE_DISPLAY_NAME_MAPPINGS = {"MidBlockBypass": NODE_NAME}
