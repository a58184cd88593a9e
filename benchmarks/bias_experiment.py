"""Controlled experiment: do deeper UNets amplify bias, and does the mid-block bypass change it?

One command per data set regenerates everything (models, CSV, plots, the tables, the shipped
checkpoint); see docs/evidence.md for the committed runs and their times:

    python benchmarks/bias_experiment.py --dataset digits     # --device cuda on a GPU
    python benchmarks/bias_experiment.py --dataset shapes

1. Data (bypass_kernels.experiments): ``digits``, real 8×8 handwritten 0s and 1s from scikit-learn's
   bundled ``load_digits`` in red or blue ink, read back by a classifier trained on a held-out split;
   ``shapes``, 16×16 red/blue squares/circles read back analytically. Both: minority 1.6%, majority 47%.
2. Models: diffusers UNet2DModel, identical but for ``layers_per_block`` (the depth), several training
   seeds each, every model trained to the same quality gate (valid fraction of gate samples), not a
   fixed step count. Resumable: checkpoints in runs/bias/<dataset>/depth<d>-seed<s>/.
3. Sampling: the same starting noise for every model and setting, DDIM, with and without bypass over
   a grid of strengths and active ranges, temporary and constant. Samples are kept, so a rerun only
   recomputes metrics.
4. Metrics: per model and setting (one CSV row each), quality (valid fraction, classifier confidence),
   group shares, total-variation distance to the training mix, diversity, pixel variance against the
   training set's, distance to the nearest training image; across seeds, Student-t intervals of the
   per-seed values and of paired differences (deeper minus shallower, bypass minus off).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time

import torch
from common import environment
from tqdm import tqdm

from bypass_kernels import BypassSchedule, patched
from bypass_kernels.experiments import datasets
from bypass_kernels.experiments.metrics import sample_metrics, t_interval
from bypass_kernels.experiments.training import Gate, TrainConfig, sample, train_unet, unet_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
EVAL_SEED = 10_000
DEFAULT_SETTING = "linear:0.3:500:999"  # default_schedule() on a 1,000-step model


def grid(quick: bool) -> dict[str, BypassSchedule | None]:
    """Bypass settings: strengths of the default shape, a later start, and constant controls (temporary and not)."""
    settings: dict[str, BypassSchedule | None] = {"off": None}
    for s in (0.3,) if quick else (0.15, 0.3, 0.5, 0.8):
        settings[f"linear:{s}:500:999"] = BypassSchedule.linear(s, t_min=500, t_max=999)
    if not quick:
        settings["linear:0.5:750:999"] = BypassSchedule.linear(0.5, t_min=750, t_max=999)
        settings["constant:0.3:500:999"] = BypassSchedule.constant(0.3, t_min=500, t_max=999)
        settings["constant:0.3:0:999"] = BypassSchedule.constant(0.3, t_min=0, t_max=999)  # not temporary
    return settings


def model_folder(args, depth: int, seed: int) -> str:
    return os.path.join(args.runs, args.dataset, f"depth{depth}-seed{seed}")


# --------------------------------------------------------------------- the runs
def train_all(args, spec, train_images) -> dict[tuple[int, int], str]:
    def quality(images):
        attrs = spec.read(images)
        row = {"quality": float(attrs["valid"].float().mean())}
        if "confidence" in attrs:
            conf = attrs["confidence"]
            row |= {"confidence_median": float(conf.median()), "confidence_q10": float(conf.quantile(0.1))}
        return row

    gate = Gate(
        level=None if args.steps else args.gate_level,
        every=args.gate_every,
        samples=args.gate_samples,
        sample_steps=args.gate_sample_steps,
        min_steps=args.min_steps,
        max_steps=args.steps or args.max_steps,
    )
    train = TrainConfig(batch=args.batch, lr=args.lr, ema=args.ema)
    finals = {}
    for seed in args.seeds:  # seed-major: a short run still covers every depth
        for depth in args.depths:
            if args.finished_only:
                final = os.path.join(model_folder(args, depth, seed), "final")
                if os.path.isfile(os.path.join(final, "training.json")):
                    finals[depth, seed] = final
                continue
            finals[depth, seed] = train_unet(
                unet_config(depth, size=spec.shape[-1], channels=spec.shape[0], widths=tuple(args.widths)),
                train_images,
                folder=model_folder(args, depth, seed),
                seed=seed,
                device=args.device,
                quality=quality,
                gate=gate,
                train=train,
                info={"dataset": args.dataset, "depth": depth, "train_size": args.train_size},
                desc=f"{args.dataset} depth {depth} seed {seed}",
            )
    return finals


def mid_block_reliance(unet, shape, device, ts=(900, 700, 500)) -> float:
    """How much the model's noise prediction rests on its mid-block: mean |ε(full bypass) − ε| / mean |ε|
    over fixed noisy inputs at high-noise timesteps (0: the bypass cannot change anything)."""
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(EVAL_SEED)).to(device)
    ratios = []
    with torch.inference_mode():
        for t in ts:
            plain = unet(x, t).sample
            with patched(unet, BypassSchedule.constant(1.0)):
                skipped = unet(x, t).sample
            ratios.append(float((skipped - plain).abs().mean() / plain.abs().mean()))
    return sum(ratios) / len(ratios)


def evaluate(args, spec, train_images, finals) -> list[dict]:
    from diffusers import UNet2DModel

    rows = []
    settings = grid(args.quick)
    bar = tqdm(total=len(finals) * len(settings), desc="sampling", dynamic_ncols=True)
    for (depth, seed), final in finals.items():
        with open(os.path.join(final, "training.json"), encoding="utf-8") as f:
            training = json.load(f)
        unet = UNet2DModel.from_pretrained(final, low_cpu_mem_usage=False).to(args.device).eval()
        reliance = mid_block_reliance(unet, spec.shape, args.device)
        for name, schedule in settings.items():
            path = os.path.join(os.path.dirname(final), f"samples-{args.samples}-{args.sample_steps}-{name}.pt")
            if os.path.exists(path):  # resume: sampled before
                images = torch.load(path).float()
            else:
                with patched(unet, schedule or BypassSchedule.constant(0.0)):
                    # Stored in fp16 and read back from the stored copy, so a resumed run gives the same figures.
                    images = sample(unet, args.samples, args.sample_steps, EVAL_SEED, args.device, spec.shape).half()
                tmp = f"{path}.{os.getpid()}.tmp"  # another process may be sampling the same model
                torch.save(images, tmp)
                os.replace(tmp, path)
                images = images.float()
            kind, strength, t_min, t_max = name.split(":") if schedule else ("off", 0, 0, 0)
            rows.append(
                {
                    "dataset": args.dataset,
                    "depth": depth,
                    "seed": seed,
                    "setting": name,
                    "shape": kind,
                    "strength": float(strength),
                    "t_min": int(t_min),
                    "t_max": int(t_max),
                    "parameters": sum(p.numel() for p in unet.parameters()),
                    "train_steps": training["steps"],
                    "stop_reason": training["stop_reason"],
                    "gate_level": training["gate"]["level"],
                    "gate_quality_at_stop": training["history"][-1]["quality"] if training["history"] else math.nan,
                    "train_seconds": round(training["train_seconds"], 1),
                    "mid_block_reliance": reliance,
                    **sample_metrics(images, spec.read(images), spec.groups, spec.shares, train_images),
                }
            )
            bar.update(1)
    bar.close()
    return rows


# --------------------------------------------------------------------- summaries across seeds
METRICS = ("valid", "confidence", "tv_distance", "diversity", "variance_ratio", "nn_train")


def by_key(rows):
    return {(r["depth"], r["seed"], r["setting"]): r for r in rows}


def summarize(rows: list[dict], groups: tuple[str, ...]) -> list[dict]:
    """Per (depth, setting): the seed mean and t-interval of every metric."""
    out = []
    keys = sorted({(r["depth"], r["setting"]) for r in rows}, key=lambda k: (k[0], list(grid(False)).index(k[1])))
    for depth, setting in keys:
        sub = [r for r in rows if r["depth"] == depth and r["setting"] == setting]
        row = {"depth": depth, "setting": setting, "seeds": len(sub)}
        for m in (*METRICS, *groups):
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = t_interval([r[m] for r in sub])
        out.append(row)
    return out


def paired(rows, metric: str, pairs) -> tuple[float, float, float, int]:
    """t-interval of per-pair differences ``a - b`` for ``pairs`` of row keys present in ``rows``."""
    table = by_key(rows)
    diffs = [table[a][metric] - table[b][metric] for a, b in pairs if a in table and b in table]
    return (*t_interval(diffs), len(diffs))


def fmt(mean, lo, hi, digits=3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def verdicts(rows: list[dict], groups: tuple[str, ...]) -> list[str]:
    """The two claims, as paired differences with t-intervals over training seeds."""
    depths = sorted({r["depth"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    settings = [s for s in grid(False) if s in {r["setting"] for r in rows}]
    majority, minority = groups[0], groups[-1]
    lines = ["**Deeper minus shallower, no bypass** (paired by training seed; 95% t-intervals over seeds):", ""]
    lines += ["| comparison | majority share | minority share | TV to training | variance ratio | valid |"]
    lines += ["|---|---|---|---|---|---|"]
    for a, b in [(d, depths[0]) for d in depths[1:]]:
        pairs = [((a, s, "off"), (b, s, "off")) for s in seeds]
        cells = []
        for m in (majority, minority, "tv_distance", "variance_ratio", "valid"):
            mean, lo, hi, _ = paired(rows, m, pairs)
            cells.append(fmt(mean, lo, hi))
        lines.append(f"| depth {a} − depth {b} | " + " | ".join(cells) + " |")
    lines += ["", "**Bypass minus off**, paired by model (all depths × seeds; 95% t-intervals over models):", ""]
    lines += ["| setting | valid | diversity | variance ratio | minority share | TV to training | models |"]
    lines += ["|---|---|---|---|---|---|---|"]
    models = sorted({(r["depth"], r["seed"]) for r in rows})
    for setting in settings[1:]:
        pairs = [((d, s, setting), (d, s, "off")) for d, s in models]
        cells = []
        for m, digits in (("valid", 3), ("diversity", 3), ("variance_ratio", 3), (minority, 3), ("tv_distance", 3)):
            mean, lo, hi, n = paired(rows, m, pairs)
            cells.append(fmt(mean, lo, hi, digits))
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {n} |")
    return lines


def markdown(rows, summary, groups, report) -> str:
    lines = []
    if report:
        lines += [
            f"Classifier ({report['classifier']}): held-out test accuracy {report['test_accuracy']:.3f} on "
            f"{report['test_images']} digits never seen by the diffusion models (0 vs 1: "
            f"{report['test_accuracy_0_1']:.3f}); real test 0s and 1s accepted as valid at confidence ≥ "
            f"{report['min_confidence']}: {report['real_0_1_accepted_as_valid']:.3f}.",
            "",
            "Confusion matrix (rows: true digit 0–9; columns: " + ", ".join(report["confusion_columns"]) + "):",
            "",
            "| true | " + " | ".join(report["confusion_columns"]) + " |",
            "|---|" + "---|" * len(report["confusion_columns"]),
        ]
        lines += [f"| {i} | " + " | ".join(map(str, row)) + " |" for i, row in enumerate(report["confusion_matrix"])]
        lines.append("")
    lines += [
        "Training to the gate, one line per model. Reliance: mean |ε(full bypass) − ε| / mean |ε| at t = 900, 700"
        " and 500, how much the noise prediction rests on the mid-block at all.",
        "",
        "| depth | seed | parameters | steps | stopped by | gate quality at stop | valid at eval | min | reliance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["setting"] == "off"), key=lambda r: (r["depth"], r["seed"])):
        lines.append(
            f"| {r['depth']} | {r['seed']} | {r['parameters']:,} | {r['train_steps']} | {r['stop_reason']} | "
            f"{r['gate_quality_at_stop']:.3f} | {r['valid']:.3f} | {r['train_seconds'] / 60:.1f} | "
            f"{r['mid_block_reliance']:.3f} |"
        )
    lines += ["", "Seed means with 95% t-intervals over training seeds (shares are of valid samples):", ""]
    header = ["depth", "setting", "valid", *groups, "TV to training", "diversity", "variance ratio", "NN distance"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines.append(
        "| training set | — | 1 | " + " | ".join(f"{rows[0][f'{g}_train']:.3f}" for g in groups) + " | 0 | — | 1 | — |"
    )
    shown = ("off", DEFAULT_SETTING, "linear:0.8:500:999", "constant:0.3:0:999")
    for s in summary:
        if s["setting"] not in shown:
            continue
        cells = [fmt(s[m], s[f"{m}_lo"], s[f"{m}_hi"]) for m in ("valid", *groups, "tv_distance")]
        cells += [fmt(s[m], s[f"{m}_lo"], s[f"{m}_hi"], 2) for m in ("diversity", "variance_ratio", "nn_train")]
        lines.append(f"| {s['depth']} | {s['setting']} | " + " | ".join(cells) + " |")
    lines += ["", *verdicts(rows, groups)]
    return "\n".join(lines)


# --------------------------------------------------------------------- plots
def plot(rows, summary, groups, finals, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.flatten()
    off = {s["depth"]: s for s in summary if s["setting"] == "off"}
    colours = ("tab:red", "tab:blue", "salmon", "navy")
    for g, colour in zip(groups, colours, strict=True):
        ys = [off[d][g] for d in depths]
        err = [[off[d][g] - off[d][f"{g}_lo"] for d in depths], [off[d][f"{g}_hi"] - off[d][g] for d in depths]]
        axes[0].errorbar(depths, ys, yerr=err, marker="o", color=colour, label=g, capsize=3)
        for r in rows:
            if r["setting"] == "off":
                axes[0].scatter(r["depth"] + 0.05, max(r[g], 1e-3), color=colour, s=8, alpha=0.5)
        axes[0].axhline(rows[0][f"{g}_train"], color=colour, ls=":", lw=1)
    axes[0].set(xlabel="layers per block (depth)", ylabel="share of valid samples (dotted: training)", yscale="log")
    axes[0].set_title("No bypass: group shares (seed mean, 95% t; dots: seeds)")
    axes[0].legend(fontsize=7)
    panels = (("valid", "valid fraction (quality)"), ("diversity", "diversity (mean pairwise L2)"))
    panels += (("variance_ratio", "pixel variance / training"), (groups[-1], f"minority ({groups[-1]}) share"))
    for ax, (metric, label) in zip(axes[1:5], panels, strict=True):
        for d in depths:
            sub = [s for s in summary if s["depth"] == d and s["setting"].startswith("linear")]
            sub = [s for s in sub if s["setting"].endswith(":500:999")]
            sub.sort(key=lambda s: float(s["setting"].split(":")[1]))
            xs = [0.0] + [float(s["setting"].split(":")[1]) for s in sub]
            pts = [off[d], *sub]
            ax.plot(xs, [p[metric] for p in pts], marker="o", label=f"depth {d}")
            ax.fill_between(xs, [p[f"{metric}_lo"] for p in pts], [p[f"{metric}_hi"] for p in pts], alpha=0.15)
        ax.set(xlabel="bypass strength (linear, t in [500, 999])", ylabel=label, title=f"{label} vs strength")
        ax.legend(fontsize=7)
    axes[4].axhline(rows[0][f"{groups[-1]}_train"], color="k", ls=":", lw=1)
    for (depth, seed), final in finals.items():
        with open(os.path.join(final, "training.json"), encoding="utf-8") as f:
            history = json.load(f)["history"]
        label = f"depth {depth}" if seed == min(s for _, s in finals) else None
        steps, quality = [h["step"] for h in history], [h["quality"] for h in history]
        axes[5].plot(steps, quality, color=f"C{depths.index(depth)}", label=label)
    if rows[0]["gate_level"] is not None:
        axes[5].axhline(rows[0]["gate_level"], color="k", ls=":", lw=1)
    axes[5].set(xlabel="training step", ylabel="valid fraction of gate samples", title="training to the gate (dotted)")
    axes[5].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ship_checkpoint(final: str, spec, command: str, report: dict | None, classifier_path: str | None) -> str:
    """The shallowest model of the first seed, fp16 safetensors, into the package (for `generate`)."""
    from diffusers import UNet2DModel

    target = datasets.shipped_folder(spec.name)
    model = UNet2DModel.from_pretrained(final, low_cpu_mem_usage=False).half()
    if os.path.isdir(target):
        shutil.rmtree(target)
    model.save_pretrained(target, safe_serialization=True)
    if classifier_path:
        shutil.copy(classifier_path, os.path.join(target, "classifier.json"))
    with open(os.path.join(final, "training.json"), encoding="utf-8") as f:
        training = json.load(f)
    provenance = {"command": command, "training": training, "data": spec.description}
    if report:
        provenance["classifier"] = {k: v for k, v in report.items() if k != "confusion_matrix"}
    with open(os.path.join(target, "PROVENANCE.json"), "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=datasets.NAMES)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gate-level", type=float, default=0.85, help="valid fraction of gate samples to reach")
    parser.add_argument("--gate-every", type=int, default=250, help="steps between gate checks (and checkpoints)")
    parser.add_argument("--gate-samples", type=int, default=256)
    parser.add_argument("--gate-sample-steps", type=int, default=10)
    parser.add_argument("--min-steps", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (no gate)")
    parser.add_argument("--widths", type=int, nargs=2, default=[16, 32], help="block_out_channels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--runs", default=os.path.join(ROOT, "runs", "bias"))
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke tests)")
    parser.add_argument("--no-ship", action="store_true", help="do not replace the shipped checkpoint")
    parser.add_argument(
        "--finished-only", action="store_true", help="train nothing: evaluate the models already trained to the end"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {"device", "runs", "results", "no_ship", "threads", "finished_only"}
    command = "python benchmarks/bias_experiment.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in skip and v is not False
    ).replace(" True", "")
    workdir = os.path.join(args.runs, args.dataset)
    spec, report = datasets.load(args.dataset, workdir)
    train_images, _ = spec.make(args.train_size, 0)  # one data set for every depth and seed
    finals = train_all(args, spec, train_images)
    rows = evaluate(args, spec, train_images, finals)
    env = environment(torch.device(args.device))  # device, versions and date in every row, as the other results
    rows = [{**r, **env} for r in rows]
    summary = summarize(rows, spec.groups)
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"bias_experiment_{args.dataset}")
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    plot(rows, summary, spec.groups, finals, stem + ".png")
    text = markdown(rows, summary, spec.groups, report)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(f"`{command}`\n\n{text}\n")
    print(text)
    if not args.no_ship:
        first = finals[min(args.depths), min(args.seeds)]
        classifier = os.path.join(workdir, "classifier.json") if args.dataset == "digits" else None
        print(f"shipped {first} -> {ship_checkpoint(first, spec, command, report, classifier)}")
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (this invocation)")


if __name__ == "__main__":
    main()
