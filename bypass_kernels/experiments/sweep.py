"""A schedule sweep in one batched call: N schedules from the same seeds side by side, as an image grid
with a row per schedule (``bypass-kernels sweep``).

Every schedule gets the same starting noise (seed i for column i), and all N·n images are denoised
in one batch with ``bypass_kernels.per_sample``, so the rows differ by the schedule alone.
Offline on the shipped models (``shapes``, ``digits``: unconditional UNets, a DDIM loop); any
diffusers pipeline folder otherwise (text-to-image, with a prompt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import bypass_kernels
from bypass_kernels.schedule import BypassSchedule

# What a sweep shows by default: no bypass, this package's default and two strengths around it, and one that
# acts at every step
DEFAULT_SCHEDULES = ("off", "linear:0.15:500", "default", "linear:0.6:500", "constant:0.3")


@dataclass
class SweepResult:
    path: str  # the grid PNG
    labels: list[str]  # one per row, the schedule of that row
    images: torch.Tensor  # [rows, n, 3, H, W] in [-1, 1]


def _noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Column i's starting noise from seed + i: the same on every device and for any number of columns."""
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def sweep_unet(unet, schedules: list[BypassSchedule], *, n: int, steps: int, seed: int) -> torch.Tensor:
    """[len(schedules), n, C, H, W]: an unconditional UNet's DDIM samples, every schedule from the same n
    seeds, in one batch of len(schedules)·n samples."""
    from bypass_kernels.experiments.sampling import ddim_sample

    device = next(unet.parameters()).device
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = _noise(n, shape, seed).to(device).repeat(len(schedules), 1, 1, 1)  # schedule-major: row r, column i
    per_image = [s for s in schedules for _ in range(n)]
    patched_here = not bypass_kernels.is_patched(unet)
    if patched_here:
        bypass_kernels.patch(unet, schedules[0])
    try:
        with (
            _progress(steps, f"{len(schedules)} schedules x {n} seeds") as bar,
            bypass_kernels.per_sample(unet, per_image),
        ):
            images = ddim_sample(unet, noise, steps, on_step=lambda *_: bar.update())
    finally:
        if patched_here:
            bypass_kernels.unpatch(unet)
    return images.reshape(len(schedules), n, *images.shape[1:])


def sweep_pipeline(pipe, schedules: list[BypassSchedule], *, prompt: str, n: int, steps: int, seed: int, **call):
    """[len(schedules), n, 3, H, W] in [-1, 1]: a text-to-image pipeline's images, every schedule from the
    same n seeds, in one call of len(schedules)·n images (the pipeline shows its own progress bar)."""
    per_image = [s for s in schedules for _ in range(n)]
    generators = [torch.Generator().manual_seed(seed + i) for _ in schedules for i in range(n)]
    patched_here = not bypass_kernels.is_patched(pipe)
    if patched_here:
        bypass_kernels.patch(pipe, schedules[0])
    try:
        with bypass_kernels.per_sample(pipe, per_image):
            out = pipe(
                [prompt] * len(per_image), num_inference_steps=steps, generator=generators, output_type="pt", **call
            )
    finally:
        if patched_here:
            bypass_kernels.unpatch(pipe)
    images = out.images * 2 - 1  # [0, 1] -> [-1, 1]
    return images.reshape(len(schedules), n, *images.shape[1:])


def sweep(
    model: str = "shapes",
    schedules=DEFAULT_SCHEDULES,
    *,
    out: str = "sweep",
    n: int = 8,
    steps: int = 25,
    seed: int = 0,
    prompt: str | None = None,
    device: str = "cpu",
) -> SweepResult:
    """Run ``schedules`` (each a BypassSchedule or a spec) from the same ``n`` seeds in one batched call of
    ``model``: a shipped model name (``shapes``, ``digits``), a local unconditional ``UNet2DModel``
    folder, or a diffusers text-to-image pipeline folder (then ``prompt`` is required). Writes
    ``out/sweep.png``, a row per schedule labelled with it."""
    from bypass_kernels.experiments import datasets
    from bypass_kernels.plotting import image_grid

    if not schedules:
        raise ValueError("schedules: give at least one")
    folder = datasets.shipped_folder(model) if model in datasets.NAMES else model
    if not os.path.isdir(folder):
        raise ValueError(f"model: no shipped model or folder {model!r} (shipped: {', '.join(datasets.NAMES)})")
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(os.path.join(folder, "model_index.json")):  # a pipeline folder
        if not prompt:
            raise ValueError("prompt: a pipeline folder needs a prompt (--prompt)")
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder).to(device)
        T = pipe.scheduler.config.num_train_timesteps
        parsed = [BypassSchedule.parse(s, num_train_timesteps=T) for s in schedules]
        images = sweep_pipeline(pipe, parsed, prompt=prompt, n=n, steps=steps, seed=seed)
    else:
        from diffusers import UNet2DModel

        if UNet2DModel.load_config(folder).get("_class_name") != "UNet2DModel":
            raise ValueError(
                "model: expected a shipped model, an unconditional UNet2DModel folder or a pipeline folder"
            )
        unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device).float().eval()
        parsed = [BypassSchedule.parse(s) for s in schedules]
        images = sweep_unet(unet, parsed, n=n, steps=steps, seed=seed)
    labels = [str(s) if isinstance(s, str) else repr(p) for s, p in zip(schedules, parsed, strict=True)]
    labels = [label if label not in ("off", "none") else "off (no bypass)" for label in labels]
    path = os.path.join(out, "sweep.png")
    image_grid(list(images), path, labels)
    return SweepResult(path, labels, images)
