"""Plots from the benchmark CSVs in benchmarks/results/ (one PNG per CSV, written beside it)."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import RESULTS
from rows import latest, number, read


def grouped_bars(ax, categories, series, errors=None):
    """Bars per category, one colour per series; ``series`` maps label -> {category: value};
    ``errors`` (optional) maps label -> {category: (lo, hi)}, drawn as error bars."""
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        cats = [c for c in categories if c in values]
        xs = [categories.index(c) + k * width for c in cats]
        heights = [values[c] for c in cats]
        bounds = (errors or {}).get(label, {})
        yerr = None
        if bounds and all(c in bounds for c in cats):
            yerr = [
                [h - bounds[c][0] for h, c in zip(heights, cats, strict=True)],
                [bounds[c][1] - h for h, c in zip(heights, cats, strict=True)],
            ]
        ax.bar(xs, heights, width, label=label, color=f"C{k % 10}", yerr=yerr, capsize=2 if yerr else 0)
    ax.set_xticks([n + 0.4 - width / 2 for n in range(len(categories))], categories, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def save(fig, title, csv_path):
    """The figure beside its CSV, as PNG; returns the PNG's path."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = csv_path.replace(".csv", ".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_microbench(path):
    rows = latest(read(path), ("provider", "size", "dtype", "mode"))
    modes = sorted({r["mode"] for r in rows})
    dtypes = [d for d in ("fp32", "fp16", "bf16") if any(r["dtype"] == d for r in rows)]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(5 * len(dtypes), 3.6 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            series = {
                provider: {
                    r["size"]: float(r["median_us"])
                    for r in rows
                    if r["mode"] == mode and r["dtype"] == dtype and r["provider"] == provider
                }
                for provider in providers
            }
            grouped_bars(ax, sizes, series)
            ax.set_yscale("log")
            ax.set_ylabel("median µs per blend (log)")
            ax.set_title(f"{dtype}, {mode}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    return save(fig, f"bypass blend: {rows[0]['device']} (torch {rows[0]['torch']})", path)


def plot_unet_step(path):
    """Per model: median ms per step, and the overhead against unpatched in the same mode (with
    the rows' intervals as error bars where they have them). Rows without figures are left out."""
    rows = [r for r in latest(read(path), ("model", "variant", "mode")) if number(r.get("median_ms")) is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        modes = list(dict.fromkeys(r["mode"] for r in mine))
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        ms, pct, ms_err, pct_err = (defaultdict(dict) for _ in range(4))
        for r in mine:
            v, m = r["variant"], r["mode"]
            ms[v][m] = float(r["median_ms"])
            if number(r.get("ms_lo")) is not None:
                ms_err[v][m] = (float(r["ms_lo"]), float(r["ms_hi"]))
            if v != "unpatched" and number(r.get("overhead_pct")) is not None:
                pct[v][m] = float(r["overhead_pct"])
                if number(r.get("overhead_lo_pct")) is not None:
                    pct_err[v][m] = (float(r["overhead_lo_pct"]), float(r["overhead_hi_pct"]))
        grouped_bars(axes[0][j], modes, {v: ms[v] for v in variants}, ms_err)
        axes[0][j].set_ylabel("median ms per UNet step")
        axes[0][j].set_title(model, fontsize=9)
        axes[0][j].legend(fontsize=6)
        grouped_bars(axes[1][j], modes, {v: pct[v] for v in variants}, pct_err)  # unpatched: no bars, same colours
        axes[1][j].axhline(0, color="k", linewidth=0.6)
        axes[1][j].set_yscale("symlog", linthresh=1)
        axes[1][j].set_ylabel("% over unpatched, same mode (symlog)")
        axes[1][j].legend(fontsize=6)
    return save(fig, f"UNet step: {rows[0]['device']} (torch {rows[0]['torch']})", path)


def plot_host_cost(path):
    """Host µs per call of each call (add_, blend_ per backend, the C++ op) per size, one panel per dtype."""
    rows = latest(read(path), ("call", "backend", "size", "dtype"))
    dtypes = [d for d in ("fp32", "fp16", "bf16") if any(r["dtype"] == d for r in rows)]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r["dtype"] == dtype]
        labels = list(dict.fromkeys(_call_label(r) for r in mine))
        series = {lab: {r["size"]: float(r["median_us"]) for r in mine if _call_label(r) == lab} for lab in labels}
        errors = {
            lab: {r["size"]: (float(r["lo_us"]), float(r["hi_us"])) for r in mine if _call_label(r) == lab}
            for lab in labels
        }
        grouped_bars(ax, sizes, series, errors)
        ax.set_yscale("log")
        ax.set_ylabel("host µs per call (log)")
        ax.set_title(dtype, fontsize=9)
        ax.legend(fontsize=7)
    return save(fig, f"host cost per call: {rows[0]['device']} (torch {rows[0]['torch']})", path)


def _call_label(row):
    return f"{row['call']}({row['backend']})" if row["backend"] else row["call"]


def main():
    kinds = {"-microbench.csv": plot_microbench, "-unet_step.csv": plot_unet_step, "-host_cost.csv": plot_host_cost}
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        for suffix, plot in kinds.items():
            if path.endswith(suffix):
                print("wrote", plot(path))


if __name__ == "__main__":
    main()
