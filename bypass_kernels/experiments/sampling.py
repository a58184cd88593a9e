"""A plain DDIM loop shared by the CLI's main job, ``generate`` and the bias experiment."""

from __future__ import annotations

import time

import torch


def ddim_sample(
    unet, noise: torch.Tensor, steps: int, *, extra: dict | None = None, on_step=None, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Denoise ``noise`` with DDIM (eta = 0) in ``steps`` steps; ``extra`` goes to every UNet call.

    ``on_step(i, t, seconds)`` is called after each step (the time includes a device sync).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    extra = extra or {}
    for i, t in enumerate(scheduler.timesteps):
        start = time.perf_counter()
        with torch.inference_mode():
            out = unet(scheduler.scale_model_input(latents, t), t, **extra, return_dict=False)[0]
            latents = scheduler.step(out, t, latents).prev_sample
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        if on_step is not None:
            on_step(i, t, time.perf_counter() - start)
    return latents


def seeded_noise(n: int, shape: tuple[int, ...], seed: int, device, batch: int = 500) -> list[torch.Tensor]:
    """Starting noise in batches, the same for a given (seed, n) on every device."""
    chunks = []
    for first in range(0, n, batch):
        gen = torch.Generator().manual_seed(seed + first)
        chunks.append(torch.randn(min(batch, n - first), *shape, generator=gen).to(device))
    return chunks
