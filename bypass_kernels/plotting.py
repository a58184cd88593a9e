"""Plots of schedules (matplotlib is an optional dependency, imported here only) and image grids (Pillow)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bypass_kernels.schedule import BypassSchedule


def plot_schedules(schedules: Mapping[str, BypassSchedule], path: str, *, title: str = "Mid-block bypass λ(t)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for label, schedule in schedules.items():
        ax.plot(schedule.table().numpy(), label=f"{label}: {schedule!r}".replace("BypassSchedule.", ""))
    ax.set_xlabel("timestep t (T-1 = pure noise; sampling runs right to left)")
    ax.set_ylabel("λ(t)  (0 = mid-block, 1 = skipped)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(rows: list[torch.Tensor], path: str, labels: list[str]) -> None:
    """Rows of images in [-1, 1] ([n, 3, H, W] each) into one PNG, a label above each row."""
    from PIL import Image, ImageDraw

    scale, pad, label_h = 4, 2, 14
    n, _, h, w = rows[0].shape
    cols = min(n, 16)
    lines = (n + cols - 1) // cols
    cell_w, cell_h = w * scale + pad, h * scale + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, len(rows) * (lines * cell_h + label_h) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y0 = pad
    for images, label in zip(rows, labels, strict=True):
        draw.text((pad, y0), label, fill="black")
        y0 += label_h
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i, array in enumerate(pixels):
            tile = Image.fromarray(array).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (pad + (i % cols) * cell_w, y0 + (i // cols) * cell_h))
        y0 += lines * cell_h
    canvas.save(path)
