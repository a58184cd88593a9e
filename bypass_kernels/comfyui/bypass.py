"""The bypass on a ComfyUI MODEL: a clone of its ModelPatcher with the span blended by λ(t).

Nothing here imports ComfyUI at module level; the functions take ComfyUI objects.

- The λ of each model call comes from an ``APPLY_MODEL`` wrapper, which sees every call's sigmas:
  with a schedule, ``(table, t)`` with t = ``model_sampling.timestep(sigma)`` in table units (Flux's
  model sampling gives σ itself: ×1000); by fraction of sampling, ``(λ per step, step index)`` with
  the steps read from the sampler's ``sample_sigmas``. The blend kernel reads ``table[round(t)]``
  either way.
- SD1.x/SD2.x/SDXL UNets: the span is ``middle_block`` (its first layer's input, its last layer's
  output: ComfyUI calls its layers one by one), blended by two hooks that exist only while the clone
  is loaded (a ComfyUI injection), before ``apply_control(h, control, 'middle')`` adds a ControlNet's
  middle residual.
- Flux (``double_blocks`` then ``single_blocks``) and SD3 (``joint_blocks``): ComfyUI's own block
  replacement (``patches_replace["dit"]``) at blocks i and j, spans indexed over the blocks in
  execution order as on the diffusers path, with the same default span and presets.
"""

from __future__ import annotations

import math

import torch

from bypass_kernels.ops import blend_
from bypass_kernels.schedule import BypassSchedule
from bypass_kernels.targets import default_span

KEY = "bypass_kernels"  # wrapper, injection and model_options key
NODE_NAME = "Mid-Block / Span Bypass"  # what ComfyUI shows, and what the node's errors start with
# Model samplings whose timestep is a continuous noise level (CosXL, Playground v2.5): it reads table index 0 or 1
CONTINUOUS = {"ModelSamplingContinuousEDM", "ModelSamplingContinuousV"}
PRESETS = {"sd3": {"sd3.5-slg": (7, 9)}, "flux": {}}


def family_of(model) -> str:
    """``"unet"``, ``"flux"`` or ``"sd3"`` for a ComfyUI ModelPatcher; TypeError otherwise."""
    net = model.get_model_object("diffusion_model")
    names = {cls.__name__ for cls in type(net).__mro__}
    if "UNetModel" in names and getattr(net, "middle_block", None) is not None:
        return "unet"
    if "Flux" in names and hasattr(net, "double_blocks"):
        return "flux"
    if "MMDiT" in names and hasattr(net, "joint_blocks"):
        return "sd3"
    raise TypeError(
        f"{NODE_NAME}: {type(net).__name__} is not supported (SD1.x/SD2.x/SDXL UNets with a middle block, "
        "Flux and SD3 are)"
    )


def dit_blocks(net, family: str) -> list[tuple[str, int]]:
    """ComfyUI's block keys in execution order: ``("double_block", i)``, then ``("single_block", i)``."""
    if family == "flux":
        return [("double_block", i) for i in range(len(net.double_blocks))] + [
            ("single_block", i) for i in range(len(net.single_blocks))
        ]
    return [("double_block", i) for i in range(len(net.joint_blocks))]


def parse_span(text: str, n: int, family: str) -> tuple[int, int]:
    """``""`` (the default span), ``"I"``, ``"I-J"`` (inclusive, over the blocks in execution order) or
    a preset name (``sd3.5-slg``)."""
    text = (text or "").strip()
    if not text:
        return default_span(n)
    presets = PRESETS.get(family, {})
    if text in presets:
        i, j = presets[text]
    else:
        try:
            parts = [int(p) for p in text.replace(" ", "").split("-", 1)]
        except ValueError:
            raise ValueError(
                f"span: expected I or I-J (block indices 0..{n - 1}) or a preset ({', '.join(presets) or 'none'}), "
                f"got {text!r}"
            ) from None
        i, j = parts[0], parts[-1]
    if not 0 <= i <= j < n:
        raise ValueError(f"span: {text!r} is not within the model's blocks 0..{n - 1} (first before last)")
    return i, j


def step_lambdas(shape: str, strength: float, start: float, end: float, steps: int, device) -> torch.Tensor:
    """λ of steps 0..steps-1 by fraction of sampling p = i/steps (the ramps of ``for_scheduler``)."""
    p = torch.arange(steps, device=device, dtype=torch.float32) / steps
    if shape == "constant":
        lam = torch.full_like(p, strength)
    elif shape == "linear":
        lam = strength * (end - p) / (end - start)
    else:
        lam = strength * (1.0 + torch.cos(math.pi * (p - start) / (end - start))) / 2.0
    return torch.where((p >= start) & (p < end), lam, torch.zeros_like(p))


class Plan:
    """What the wrapper needs to give each call its (table, t): a schedule, or a ramp by fraction."""

    def __init__(self, schedule: BypassSchedule | None, fraction: tuple[str, float, float, float] | None):
        self.schedule = schedule
        self.fraction = fraction
        self._tables: dict[torch.device, torch.Tensor] = {}
        # λ = 0 at table indices 0 and 1, all a continuous noise level reads (host table: no sync per call)
        self.zero_at_t0 = schedule is not None and not bool(schedule.table()[:2].any())

    def table_on(self, device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.schedule.table(device)
        return table

    def for_call(self, base_model, sigma: torch.Tensor, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.schedule is not None:
            sampling = base_model.model_sampling
            # ComfyUI builds its model-sampling classes on the fly (ModelSampling(s, c), ModelSamplingAdvanced):
            # the class it names is a base
            kinds = {cls.__name__ for cls in type(sampling).__mro__}
            T = _timesteps_of(sampling, kinds)
            built = self.schedule.num_train_timesteps
            if T is not None and built != T:
                raise ValueError(
                    f"{NODE_NAME}: the schedule is built for num_train_timesteps={built}, but this model has {T} "
                    f"timesteps, so its table would be read at the wrong places; give the schedule "
                    f"num_train_timesteps={T} (or leave it out)"
                )
            t = sampling.timestep(sigma).float()
            if "ModelSamplingFlux" in kinds:
                t = t * 1000.0  # Flux's model sampling gives σ itself; the model scales by 1000 inside
            elif kinds & CONTINUOUS and self.zero_at_t0:
                raise ValueError(
                    f"{NODE_NAME}: this model samples with continuous noise levels (ModelSamplingContinuousEDM "
                    "or ModelSamplingContinuousV: its timestep is ln(sigma)/4 or a value in [0, 1], never a training "
                    "timestep), where this schedule is 0, so the bypass would never act; use window = 'fraction of "
                    "sampling'"
                )
            return self.table_on(sigma.device), t
        shape, strength, start, end = self.fraction
        sigmas = options.get("sample_sigmas")
        if sigmas is None:
            raise ValueError(f"{NODE_NAME}: the sampler gave no sample_sigmas, so the fraction of sampling is unknown")
        sigmas = sigmas.to(sigma.device, torch.float32)
        steps = max(1, sigmas.numel() - 1)
        index = (sigmas[:steps].reshape(1, -1) - sigma.float().reshape(-1, 1)).abs().argmin(dim=1)  # nearest step
        return step_lambdas(shape, strength, start, end, steps, sigma.device), index.float()


def _timesteps_of(sampling, kinds: set[str]) -> int | None:
    """How many training timesteps the table of a model with this model sampling spans (its ``timestep(σ)``
    in table units): None where its timestep is a continuous noise level."""
    if "ModelSamplingFlux" in kinds:
        return 1000  # σ · 1000 (see for_call)
    if "ModelSamplingDiscreteFlow" in kinds:
        return round(getattr(sampling, "multiplier", 1000))
    if "ModelSamplingDiscrete" in kinds:
        return getattr(sampling, "num_timesteps", None)
    return None


def bypass_model(model, plan: Plan, *, span: str = "", streams: str = "all"):
    """A clone of the ComfyUI ModelPatcher ``model`` with the bypass; ``model`` is not changed. A model
    that already has one gets it replaced."""
    if streams not in ("all", "image"):
        raise ValueError(f"streams must be 'all' or 'image', got {streams!r}")
    family = family_of(model)
    m = model.clone()
    _remove(m)
    state: dict = {}

    def apply_model(executor, x, t, *args, **kwargs):
        # apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        options = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        table, timestep = plan.for_call(executor.class_obj, t, options)
        state["call"] = (table, timestep)
        context = kwargs.get("c_crossattn", args[1] if len(args) > 1 else None)
        # Flux's single blocks take [txt; img] as one sequence, the text as long as the context
        state["text_tokens"] = context.shape[1] if isinstance(context, torch.Tensor) and context.dim() == 3 else None
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            state.pop("call", None)
            state.pop("entered", None)
            state.pop("text_tokens", None)

    import comfy.patcher_extension as extension

    m.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, KEY, apply_model)
    net = m.get_model_object("diffusion_model")
    if family == "unet":
        if span.strip():
            raise ValueError("span: a UNet's span is its middle block; leave span empty")
        m.set_injections(KEY, [_middle_block_hooks(state)])
        where = None
    else:
        blocks = dit_blocks(net, family)
        i, j = parse_span(span, len(blocks), family)
        where = (blocks[i], blocks[j])
        _dit_replace(m, state, blocks[i], blocks[j], text=streams == "all")
    m.model_options[KEY] = {"family": family, "blocks": where}
    return m


def _remove(m) -> None:
    """Take a previous bypass off the clone ``m`` (re-application replaces, never stacks)."""
    import comfy.patcher_extension as extension

    previous = m.model_options.pop(KEY, None)
    m.remove_wrappers_with_key(extension.WrappersMP.APPLY_MODEL, KEY)
    m.remove_injections(KEY)
    if previous and previous.get("blocks"):
        dit = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for key in previous["blocks"]:
            dit.pop(key, None)


def _blend(m: torch.Tensor, h: torch.Tensor, call) -> None:
    table, t = call
    blend_(m, h, table, t)


def _middle_block_hooks(state: dict):
    import comfy.patcher_extension as extension

    handles = []

    def enter(module, args):
        if "call" in state:
            state["entered"] = args[0]

    def leave(module, args, output):
        h = state.pop("entered", None)
        if h is not None and "call" in state:
            _blend(output, h, state["call"])

    def inject(patcher):
        middle = patcher.model.diffusion_model.middle_block
        handles.append(middle[0].register_forward_pre_hook(enter))
        handles.append(middle[-1].register_forward_hook(leave))

    def eject(patcher):
        while handles:
            handles.pop().remove()

    return extension.PatcherInjection(inject=inject, eject=eject)


def _dit_replace(m, state: dict, first: tuple[str, int], last: tuple[str, int], *, text: bool) -> None:
    crosses = first[0] == "double_block" and last[0] == "single_block"  # Flux: txt and img become one sequence
    joint = first[0] == "single_block"  # Flux's single blocks: "img" is the joint [txt; img] in and out

    def enter(args, extra):
        # Flux's blocks add into their inputs in place: keep copies
        state["entered"] = {k: args[k].clone() for k in ("img", "txt") if args.get(k) is not None}
        return leave(args, extra) if first == last else extra["original_block"](args)

    def leave(args, extra):
        out = extra["original_block"](args)
        h = state.pop("entered", None)
        call = state.get("call")
        if h is None or call is None:
            return out
        if crosses:
            if text:
                _blend(out["img"], torch.cat((h["txt"], h["img"]), 1) if "txt" in h else h["img"], call)
            else:
                _blend_image_of_joint(out["img"], h, call)
            return out
        if joint and not text:
            n_txt = state.get("text_tokens")
            if n_txt is None:
                raise ValueError(
                    f"{NODE_NAME}: streams='image' inside Flux's single blocks needs the text length, and this "
                    "call gave no text context; use streams='all' or a span that starts in the double blocks"
                )
            _blend(out["img"][:, n_txt:], h["img"][:, n_txt:], call)
            return out
        _blend(out["img"], h["img"], call)
        if text and out.get("txt") is not None and "txt" in h:
            _blend(out["txt"], h["txt"], call)
        return out

    m.set_model_patch_replace(enter, "dit", first[0], first[1])
    if last != first:
        m.set_model_patch_replace(leave, "dit", last[0], last[1])


def _blend_image_of_joint(joint: torch.Tensor, h: dict, call) -> None:
    """Image stream only, in a joint [txt; img] sequence: the image tokens after the text ones."""
    n_txt = h["txt"].shape[1] if "txt" in h else 0
    _blend(joint[:, n_txt:], h["img"], call)
