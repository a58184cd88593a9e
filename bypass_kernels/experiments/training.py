"""Small unconditional UNets for the bias experiment, trained to a quality gate, resumably.

Every model is a diffusers ``UNet2DModel`` that differs from its siblings only in ``layers_per_block``
(the depth). Training: epsilon prediction, the DDPM noise schedule (1,000 steps), AdamW with a short
warm-up, gradient clipping, EMA weights. The gate is checked on the EMA weights every ``gate.every``
steps by sampling from fixed noise; training stops when the quality reaches ``gate.level``
("gate"), when it has not improved by ``gate.min_delta`` in ``gate.patience`` checks ("plateau"), or
at ``gate.max_steps`` ("max_steps"). A checkpoint is written at every check, so a killed run resumes
from its last check.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from bypass_kernels.experiments.sampling import ddim_sample, seeded_noise


def unet_config(depth: int, *, size: int, channels: int = 3, widths: tuple[int, int] = (16, 32)) -> dict:
    return dict(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=depth,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


@dataclass(frozen=True)
class Gate:
    """When to stop training. ``level=None``: train exactly ``max_steps`` (no gate)."""

    level: float | None = 0.85
    every: int = 250
    samples: int = 256
    sample_steps: int = 10
    patience: int = 3
    min_delta: float = 0.02
    min_steps: int = 500
    max_steps: int = 3000

    def stop_reason(self, history: list[dict]) -> str | None:
        step = history[-1]["step"] if history else 0
        if step >= self.max_steps:
            return "max_steps"
        if self.level is None or not history or step < self.min_steps:
            return None
        if history[-1]["quality"] >= self.level:
            return "gate"
        if len(history) > self.patience:
            best_before = max(h["quality"] for h in history[: -self.patience])
            if max(h["quality"] for h in history[-self.patience :]) < best_before + self.min_delta:
                return "plateau"
        return None


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.995
    warmup: int = 200


def sample(unet, n: int, steps: int, seed: int, device, shape: tuple[int, ...]) -> torch.Tensor:
    """DDIM (eta = 0) from fixed seeds: the same starting noise for every model and setting."""
    return torch.cat([ddim_sample(unet, x, steps).cpu() for x in seeded_noise(n, shape, seed, device)])


def train_unet(
    config: dict,
    images: torch.Tensor,
    *,
    folder: str,
    seed: int,
    device,
    quality: Callable[[torch.Tensor], dict],
    gate: Gate,
    train: TrainConfig,
    info: dict | None = None,
    desc: str = "training",
) -> str:
    """Train (or resume, or find finished) the model in ``folder``; return the folder of its EMA weights.

    ``quality(images)`` scores gate samples: a dict with at least ``quality`` (the gated figure).
    ``final/training.json`` records the gate, the steps taken, why training stopped, the gate history
    and the wall time.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    final = os.path.join(folder, "final")
    if os.path.isfile(os.path.join(final, "training.json")):
        return final
    os.makedirs(folder, exist_ok=True)
    device = torch.device(device)
    torch.manual_seed(seed)
    model = UNet2DModel(**config).to(device)
    ema = UNet2DModel(**config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.0)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(device)
    step, history, seconds, ckpt = 0, [], 0.0, os.path.join(folder, "checkpoint.pt")
    if os.path.exists(ckpt):  # resume from the last gate check
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        torch.set_rng_state(state["rng"])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # data order: a function of (seed, step)
    shape = tuple(images.shape[1:])
    bar = tqdm(total=gate.max_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    reason = gate.stop_reason(history)
    model.train()
    while reason is None:
        index = torch.randint(0, images.shape[0], (train.batch,), generator=gen)
        x0 = images[index].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (train.batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = train.lr * min(1.0, (step + 1) / train.warmup)
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(train.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        if step % gate.every == 0 or step >= gate.max_steps:
            ema.eval()
            scores = quality(sample(ema, gate.samples, gate.sample_steps, 999_999, device, shape))
            history.append({"step": step, "loss": loss.item(), **scores})
            bar.set_postfix(loss=f"{loss.item():.4f}", quality=f"{scores['quality']:.3f}")
            reason = gate.stop_reason(history)
            elapsed = seconds + time.perf_counter() - start
            state = dict(
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
                step=step,
                history=history,
                seconds=elapsed,
                rng=torch.get_rng_state(),
            )
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    bar.close()
    ema.eval().save_pretrained(final)
    record = {
        **(info or {}),
        "seed": seed,
        "steps": step,
        "stop_reason": reason,
        "gate": asdict(gate),
        "train": asdict(train),
        "history": history,
        "train_seconds": seconds + time.perf_counter() - start,
        "device": str(device),
    }
    with open(os.path.join(final, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return final
