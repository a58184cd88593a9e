"""The ``bypass-kernels`` command.

bypass-kernels run       patch a UNet and run a short DDIM loop, printing timestep, λ and time per step
bypass-kernels info      which backends run here, and why a missing one is missing
bypass-kernels schedule  print a schedule's table (and plot it with --plot FILE.png)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import bypass_kernels
from bypass_kernels.schedule import BypassSchedule

SCHEDULE_HELP = (
    "'default', 'off', 'constant|linear|cosine:STRENGTH[:T_MIN[:T_MAX]]' (e.g. linear:0.3:500), "
    "a JSON object from BypassSchedule.to_dict(), or a JSON file"
)

MODEL_HELP = "a preset (tiny-sd, tiny-sdxl, tiny-unet2d, sd15, sdxl) or a local diffusers UNet/pipeline folder"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def denoise(unet, scheduler, inputs: dict, steps: int, *, on_step=None) -> torch.Tensor:
    """A plain DDIM loop over ``inputs`` (from presets.example_inputs); returns the final latents."""
    scheduler.set_timesteps(steps, device=inputs["sample"].device)
    latents = inputs["sample"] * scheduler.init_noise_sigma
    extra = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    for i, t in enumerate(scheduler.timesteps):
        start = time.perf_counter()
        with torch.inference_mode():
            noise = unet(scheduler.scale_model_input(latents, t), t, **extra, return_dict=False)[0]
            latents = scheduler.step(noise, t, latents).prev_sample
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        if on_step is not None:
            on_step(i, t, time.perf_counter() - start)
    return latents


def cmd_run(args) -> int:
    from diffusers import DDIMScheduler

    from bypass_kernels.presets import example_inputs, load_unet

    device, dtype = _device(args.device), _dtype(args.dtype)
    unet = load_unet(args.model, dtype=dtype, device=device)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    schedule = BypassSchedule.parse(args.schedule, num_train_timesteps=scheduler.config.num_train_timesteps)
    inputs = example_inputs(unet, batch=args.batch, seed=args.seed)

    baseline = None if args.no_baseline else denoise(unet, scheduler, inputs, args.steps)
    bypass_kernels.patch(unet, schedule, backend=args.backend)
    backend = bypass_kernels.backends.resolve(args.backend, device)
    print(f"model {args.model} on {device} ({args.dtype}), batch {args.batch}, {args.steps} DDIM steps")
    print(f"schedule {schedule!r}")
    print(f"blend backend: {backend} (asked for {args.backend!r})")
    print(f"{'step':>4}  {'timestep':>8}  {'lambda':>7}  {'ms':>8}")

    def show(i, t, seconds):
        print(f"{i:>4}  {int(t):>8}  {schedule.weight(t):>7.4f}  {seconds * 1e3:>8.2f}", flush=True)

    latents = denoise(unet, scheduler, inputs, args.steps, on_step=show)
    if baseline is not None:
        diff = (latents.float() - baseline.float()).abs()
        print(f"final latents vs the unpatched model: mean |diff| {diff.mean():.4g}, max {diff.max():.4g}")
    return 0


def cmd_info(args) -> int:
    report = bypass_kernels.info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    print(f"bypass_kernels {bypass_kernels.__version__}  ({versions})")
    for name, row in report["backends"].items():
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {name:<7} {state}")
    print(f"  auto    picks {report['auto']} in eager mode; {report['traced']} while tracing")
    return 0


def cmd_schedule(args) -> int:
    schedule = BypassSchedule.parse(args.schedule, num_train_timesteps=args.num_train_timesteps)
    print(repr(schedule))
    if args.json:
        print(json.dumps(schedule.to_dict()))
    if args.plot:
        from bypass_kernels.plotting import plot_schedules

        plot_schedules({args.schedule: schedule}, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_export(args) -> int:
    from bypass_kernels.export.cli import run_export

    return run_export(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bypass-kernels", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="patch a UNet and run a short DDIM loop (the main job)")
    run.add_argument("--model", default="tiny-sd", help=MODEL_HELP)
    run.add_argument("--schedule", default="default", help=SCHEDULE_HELP)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--batch", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", default="auto", choices=bypass_kernels.backends.NAMES)
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    run.add_argument("--no-baseline", action="store_true", help="skip the unpatched comparison run")
    run.set_defaults(func=cmd_run)

    info = sub.add_parser("info", help="backends available here")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    sched = sub.add_parser("schedule", help="show a schedule")
    sched.add_argument("schedule", nargs="?", default="default", help=SCHEDULE_HELP)
    sched.add_argument("--num-train-timesteps", type=int, default=1000)
    sched.add_argument("--json", action="store_true", help="print to_dict() as JSON")
    sched.add_argument("--plot", metavar="PNG", help="write a plot of λ(t)")
    sched.set_defaults(func=cmd_schedule)
    from bypass_kernels.export.cli import add_export_parser

    add_export_parser(sub, SCHEDULE_HELP, cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"bypass-kernels: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
