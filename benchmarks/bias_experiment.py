"""Controlled experiment: do deeper UNets amplify bias, and does the mid-block bypass change it?

One command regenerates everything (models, CSV, plots, the README table, the shipped checkpoint):

    python benchmarks/bias_experiment.py    # ~50 min on 2 CPU cores (depth 3 trains in ~17); --device cuda on a GPU

1. Data: bypass_kernels.shapes (16×16 red/blue squares/circles; blue circles 1.6%, circles 40%).
2. Models: diffusers UNet2DModel, identical but for ``layers_per_block`` (the depth), trained with
   the same seed, data order and step count (epsilon prediction, DDPM noise schedule, EMA weights).
   Training is resumable: checkpoints live in runs/bias/<depth>/.
3. Sampling: the same seeds for every setting, DDIM, with and without bypass over a grid of
   strengths and active ranges.
4. Metrics with 95% intervals: each group's share of valid samples against its training share
   (Wilson), total-variation distance to the training mix and pixel diversity (bootstrap), and the
   valid-shape fraction as a quality proxy (Wilson).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time

import torch
from tqdm import tqdm

from bypass_kernels import BypassSchedule, patched
from bypass_kernels.sampling import ddim_sample, seeded_noise
from bypass_kernels.shapes import GROUPS, GroupShares, make_dataset, read_attributes, wilson_interval

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SHIPPED = os.path.join(ROOT, "bypass_kernels", "data", "shapes16")


def unet_config(depth: int) -> dict:
    return dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=depth,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def grid(quick: bool) -> dict[str, BypassSchedule | None]:
    """Bypass settings: strengths of the default shape, a later start, and permanent-bypass controls."""
    settings: dict[str, BypassSchedule | None] = {"off": None}
    for s in (0.3,) if quick else (0.15, 0.3, 0.5, 0.8):
        settings[f"linear:{s}:500:999"] = BypassSchedule.linear(s, t_min=500, t_max=999)
    if not quick:
        settings["linear:0.5:750:999"] = BypassSchedule.linear(0.5, t_min=750, t_max=999)
        settings["constant:0.3:500:999"] = BypassSchedule.constant(0.3, t_min=500, t_max=999)
        settings["constant:0.3:0:999"] = BypassSchedule.constant(0.3, t_min=0, t_max=999)  # not temporary
    return settings


# --------------------------------------------------------------------- training
def train(depth: int, args) -> str:
    from diffusers import DDPMScheduler, UNet2DModel

    folder = os.path.join(args.runs, f"depth{depth}")
    final = os.path.join(folder, "final")
    if os.path.isdir(final):
        return final
    os.makedirs(folder, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = UNet2DModel(**unet_config(depth)).to(device)
    ema = UNet2DModel(**unet_config(depth)).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000)
    images, _ = make_dataset(args.train_size, seed=args.seed)
    step, ckpt = 0, os.path.join(folder, "checkpoint.pt")
    if os.path.exists(ckpt):  # resume
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    alphas = noise_schedule.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(args.seed + step)  # data order: the same for every depth
    bar = tqdm(total=args.steps, initial=step, desc=f"training depth {depth}", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    while step < args.steps:
        index = torch.randint(0, images.shape[0], (args.batch,), generator=gen)
        x0 = images[index].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        lr = args.lr * min(1.0, (step + 1) / 200)  # short warm-up
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            state = dict(
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
                step=step,
                rng=torch.get_rng_state(),
            )
            torch.save(state, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    bar.close()
    ema.eval().save_pretrained(final)
    with open(os.path.join(final, "training.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "depth": depth,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "ema": args.ema,
                "seed": args.seed,
                "train_size": args.train_size,
                "seconds_this_run": time.perf_counter() - start,
                "device": str(device),
            },
            f,
            indent=2,
        )
    return final


# --------------------------------------------------------------------- sampling and metrics
def sample(unet, n: int, steps: int, seed: int, device) -> torch.Tensor:
    """DDIM (eta = 0) from fixed seeds: the same starting noise for every model and setting."""
    return torch.cat([ddim_sample(unet, x, steps).cpu() for x in seeded_noise(n, (3, 16, 16), seed, device)])


def bootstrap(values_fn, n: int, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    stats = torch.tensor([values_fn(torch.randint(0, n, (n,), generator=gen)) for _ in range(reps)])
    return float(stats.quantile(0.025)), float(stats.quantile(0.975))


def metrics(images: torch.Tensor, train_shares: dict[str, float]) -> dict:
    attrs = read_attributes(images)
    groups, valid = attrs["group"], attrs["valid"]
    n, n_valid = len(groups), int(valid.sum())
    row = {"n": n, "valid": n_valid / n}
    row["valid_lo"], row["valid_hi"] = wilson_interval(n_valid, n)
    target = torch.tensor([train_shares[g] for g in GROUPS])
    for i, name in enumerate(GROUPS):
        k = int((groups == i).sum())
        row[f"{name}"] = k / max(n_valid, 1)
        row[f"{name}_lo"], row[f"{name}_hi"] = wilson_interval(k, n_valid)
        row[f"{name}_train"] = train_shares[name]

    def tv(index):
        g = groups[index]
        g = g[g >= 0]
        if len(g) == 0:
            return float("nan")  # no valid sample: no distribution to compare
        counts = torch.bincount(g, minlength=len(GROUPS)).float()
        return float(0.5 * (counts / counts.sum() - target).abs().sum())

    everyone = torch.arange(n)
    row["tv_distance"] = tv(everyone)
    row["tv_lo"], row["tv_hi"] = bootstrap(tv, n)
    # Pixel diversity: mean pairwise L2 distance of valid samples (bootstrap over samples).
    sub = images[valid][:400].flatten(1)
    dist = torch.cdist(sub, sub)
    m = len(sub)

    def diversity(index):
        d = dist[index][:, index]
        return float(d.sum() / max(1, m * (m - 1)))

    row["diversity"] = diversity(torch.arange(m))
    row["diversity_lo"], row["diversity_hi"] = bootstrap(diversity, m) if m > 1 else (0.0, 0.0)
    return row


# --------------------------------------------------------------------- reporting
def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    off = {r["depth"]: r for r in rows if r["setting"] == "off"}
    for name, colour in zip(GROUPS, ("tab:red", "tab:blue", "salmon", "navy"), strict=True):
        ys = [off[d][name] for d in depths]
        err = [
            [off[d][name] - off[d][f"{name}_lo"] for d in depths],
            [off[d][f"{name}_hi"] - off[d][name] for d in depths],
        ]
        axes[0].errorbar(depths, ys, yerr=err, marker="o", color=colour, label=name, capsize=3)
        axes[0].axhline(off[depths[0]][f"{name}_train"], color=colour, ls=":", lw=1)
    axes[0].set_xlabel("layers per block (depth)")
    axes[0].set_ylabel("share of valid samples (dotted: training share)")
    axes[0].set_yscale("log")
    axes[0].set_title("No bypass: group shares by depth")
    axes[0].legend(fontsize=7)
    for metric, ax, label in (
        ("blue_circle", axes[1], "minority (blue circle) share"),
        ("valid", axes[2], "valid shapes"),
    ):
        for d in depths:
            sub = [
                r
                for r in rows
                if r["depth"] == d and r["setting"].startswith("linear") and r["setting"].endswith(":500:999")
            ]
            sub.sort(key=lambda r: r["strength"])
            xs = [0.0] + [r["strength"] for r in sub]
            ys = [off[d][metric]] + [r[metric] for r in sub]
            lo = [off[d][f"{metric}_lo"]] + [r[f"{metric}_lo"] for r in sub]
            hi = [off[d][f"{metric}_hi"]] + [r[f"{metric}_hi"] for r in sub]
            ax.plot(xs, ys, marker="o", label=f"depth {d}")
            ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_xlabel("bypass strength (linear, t in [500, 999])")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs bypass strength")
        ax.legend(fontsize=7)
    axes[1].axhline(rows[0]["blue_circle_train"], color="k", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| depth | setting | valid | red square | blue square | red circle | blue circle (minority) "
        "| TV to training | diversity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    train = rows[0]
    lines.append(
        f"| training set | — | 1.000 | {train['red_square_train']:.3f} | {train['blue_square_train']:.3f} | "
        f"{train['red_circle_train']:.3f} | {train['blue_circle_train']:.3f} | 0 | — |"
    )
    for r in rows:
        if r["setting"] not in ("off", "linear:0.3:500:999", "linear:0.5:500:999", "linear:0.8:500:999"):
            continue
        cells = [f"{r[g]:.3f} [{r[g + '_lo']:.3f}, {r[g + '_hi']:.3f}]" for g in GROUPS]
        lines.append(
            f"| {r['depth']} | {r['setting']} | {r['valid']:.3f} | "
            + " | ".join(cells)
            + f" | {r['tv_distance']:.3f} [{r['tv_lo']:.3f}, {r['tv_hi']:.3f}] | {r['diversity']:.2f} |"
        )
    return "\n".join(lines)


def ship_checkpoint(final: str, command: str) -> None:
    """The smallest model, fp16 safetensors, into the package (the default of `bypass-kernels generate`)."""
    from diffusers import UNet2DModel

    model = UNet2DModel.from_pretrained(final, low_cpu_mem_usage=False).half()
    if os.path.isdir(SHIPPED):
        shutil.rmtree(SHIPPED)
    model.save_pretrained(SHIPPED, safe_serialization=True)
    with open(os.path.join(final, "training.json"), encoding="utf-8") as f:
        training = json.load(f)
    with open(os.path.join(SHIPPED, "PROVENANCE.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "command": command,
                "training": training,
                "data": "bypass_kernels.shapes.make_dataset (default GroupShares)",
            },
            f,
            indent=2,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "bias"))
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke tests)")
    parser.add_argument("--no-ship", action="store_true", help="do not replace the shipped checkpoint")
    args = parser.parse_args()
    command = "python benchmarks/bias_experiment.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k in ("steps", "batch", "lr", "ema", "train_size", "seed") and v is not None
    )
    from diffusers import UNet2DModel

    device = torch.device(args.device)
    train_shares = GroupShares().shares()
    rows = []
    finals = {}
    for depth in args.depths:
        finals[depth] = train(depth, args)
    for depth in args.depths:
        unet = UNet2DModel.from_pretrained(finals[depth], low_cpu_mem_usage=False).to(device).eval()
        for name, schedule in tqdm(grid(args.quick).items(), desc=f"sampling depth {depth}", dynamic_ncols=True):
            if schedule is None:
                images = sample(unet, args.samples, args.sample_steps, args.seed + 10_000, device)
            else:
                with patched(unet, schedule):
                    images = sample(unet, args.samples, args.sample_steps, args.seed + 10_000, device)
            # Kept beside the model, so the metrics can be recomputed without sampling again.
            torch.save(images.half(), os.path.join(args.runs, f"depth{depth}", f"samples-{name.replace(':', '_')}.pt"))
            row = {
                "depth": depth,
                "setting": name,
                "strength": schedule.max_strength if schedule else 0.0,
                "parameters": sum(p.numel() for p in unet.parameters()),
                **metrics(images, train_shares),
            }
            rows.append(row)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "bias_experiment.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    plot(rows, os.path.join(args.results, "bias_experiment.png"))
    table = markdown_table(rows)
    with open(os.path.join(args.results, "bias_experiment.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)
    if not args.no_ship:
        ship_checkpoint(finals[min(args.depths)], command)
        print(f"shipped {finals[min(args.depths)]} -> {SHIPPED}")


if __name__ == "__main__":
    main()
