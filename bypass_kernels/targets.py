"""What a patch attaches to: the model, the span of blocks it bypasses, and where the timestep is.

:func:`resolve` turns what the user passed (a model, a compiled model, a pipeline) into a
:class:`Target`. A UNet's span is its mid-block; the timestep is read where the UNet's forward
hands it to its timestep projection (``time_proj``), inside the forward. A module this package
does not know is read through its own ``timestep`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bypass_kernels.attach import Carrier, Span, Stream

# diffusers UNets whose forward passes the [batch] timesteps to ``self.time_proj`` before any other
# use of that module (a second use, for class labels or fps, comes later in the same call).
UNET_CARRIERS = frozenset(
    {
        "UNet2DConditionModel",
        "UNet2DModel",
        "UNet3DConditionModel",
        "UNetMotionModel",
        "UNetSpatioTemporalConditionModel",
        "I2VGenXLUNet",
    }
)


@dataclass(frozen=True)
class Target:
    owner: nn.Module  # the model whose forward runs the span
    pipeline: object | None  # the pipeline it was reached through, if any
    carrier: Carrier
    span: Span
    trigger: nn.Module  # the module whose class is swapped so compiled code sees the patch
    family: str  # "unet" or "module" (a model this package does not know by class)


def find_owner(model, caller: str = "patch") -> tuple[nn.Module, object | None]:
    """(the model to patch, the pipeline it came from or None)."""
    pipeline = None
    target = model
    if not isinstance(model, nn.Module) and hasattr(model, "unet"):  # a DiffusionPipeline
        pipeline, target = model, model.unet
    target = getattr(target, "_orig_mod", target)  # a torch.compile'd module: patch the original
    if not isinstance(target, nn.Module) or not hasattr(target, "mid_block"):
        raise TypeError(
            f"bypass_kernels.{caller}: expected a diffusers UNet (UNet2DConditionModel, UNet2DModel, video UNets), "
            f"a DiffusionPipeline with a .unet, or an nn.Module with a .mid_block; got {type(model).__name__}, "
            "which has no mid-block"
        )
    return target, pipeline


def resolve(model, caller: str = "patch", *, timestep_module: str | None = None) -> Target:
    """``timestep_module``: the name of the submodule whose first argument is the call's timestep, for
    a model this package does not know (default: the family's, else the model's own argument)."""
    owner, pipeline = find_owner(model, caller)
    mid = owner.mid_block
    if mid is None:
        raise ValueError(
            f"bypass_kernels.{caller}: {type(owner).__name__} has no mid-block (mid_block is None, e.g. "
            "mid_block_type=None in its config), so there is nothing to bypass"
        )
    if not isinstance(mid, nn.Module):
        raise TypeError(f"bypass_kernels.{caller}: mid_block must be an nn.Module, got {type(mid).__name__}")
    span = Span(first=mid, last=mid, streams=(Stream("hidden_states", 0, None),), modules=(mid,))
    carrier_module = _named_carrier(owner, timestep_module, caller) if timestep_module else _unet_carrier(owner)
    family = "unet" if carrier_module is not None else "module"
    carrier = Carrier(carrier_module)
    return Target(owner, pipeline, carrier, span, carrier_module or owner, family)


def _named_carrier(owner: nn.Module, name: str, caller: str) -> nn.Module:
    try:
        module = owner.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"bypass_kernels.{caller}: timestep_module={name!r}: {type(owner).__name__} has no such submodule"
        ) from None
    if module is owner:
        raise ValueError(f"bypass_kernels.{caller}: timestep_module must name a submodule, not the model itself")
    return module


def _unet_carrier(owner: nn.Module) -> nn.Module | None:
    """``owner.time_proj`` where ``owner`` is (a subclass of) a diffusers UNet known to call it
    with the timesteps first; None otherwise."""
    known = any(
        cls.__name__ in UNET_CARRIERS and cls.__module__.startswith("diffusers.") for cls in type(owner).__mro__
    )
    time_proj = owner._modules.get("time_proj")
    return time_proj if known and isinstance(time_proj, nn.Module) else None
