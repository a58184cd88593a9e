"""Plots from the benchmark CSVs in benchmarks/results/ (one PNG per CSV, written beside it)."""

from __future__ import annotations

import csv
import glob
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import RESULTS


def read(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def latest(rows, key_fields):
    """Keep the newest row per key (the CSVs are append-only logs)."""
    best = {}
    for row in rows:
        key = tuple(row[k] for k in key_fields)
        if key not in best or row["date"] >= best[key]["date"]:
            best[key] = row
    return list(best.values())


def grouped_bars(ax, categories, series):
    """Bars per category, one colour per series; ``series`` maps label -> {category: value}."""
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [n + k * width for n, c in enumerate(categories) if c in values]
        ax.bar(xs, [values[c] for c in categories if c in values], width, label=label)
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
    rows = latest(read(path), ("model", "variant", "mode"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        by_mode = defaultdict(dict)
        for r in rows:
            if r["model"] == model:
                by_mode[r["mode"]][r["variant"]] = float(r["median_ms"])
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["model"] == model))
        series = {v: {m: by_mode[m][v] for m in by_mode if v in by_mode[m]} for v in variants}
        grouped_bars(ax, list(by_mode), series)
        ax.set_ylabel("median ms per UNet step")
        ax.set_title(model, fontsize=9)
        ax.legend(fontsize=6)
    return save(fig, f"UNet step: {rows[0]['device']} (torch {rows[0]['torch']})", path)


def main():
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.csv"))):
        if path.endswith("-microbench.csv"):
            print("wrote", plot_microbench(path))
        elif path.endswith("-unet_step.csv"):
            print("wrote", plot_unet_step(path))


if __name__ == "__main__":
    main()
