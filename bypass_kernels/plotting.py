"""Plots of schedules (matplotlib is an optional dependency, imported here only)."""

from __future__ import annotations

from collections.abc import Mapping

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
