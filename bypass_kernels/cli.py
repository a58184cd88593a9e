"""The ``bypass-kernels`` command (its help text is ``DESCRIPTION``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

import bypass_kernels
from bypass_kernels.schedule import BypassSchedule

DESCRIPTION = """\
Training-free mid-block bypass for diffusion models: m' = (1 - λ(t))·m + λ(t)·h.

commands:
  run         patch a UNet and run a short DDIM loop, printing timestep, λ and time per step
  generate    images with and without the bypass from a shipped model, offline, with per-group counts
  sweep       schedules side by side from the same seeds, in one batched call, as a labelled grid
  info        which blend backends run here, and why a missing one is missing
  schedule    print a schedule's λ table (and plot it with --plot FILE.png)
  export      export a patched UNet to ONNX (and a TensorRT engine) with the schedule baked in
  triton-repo a Triton Inference Server model repository: batched requests, a schedule each
  comfyui     install the ComfyUI node "Mid-Block / Span Bypass" into a ComfyUI checkout

Run 'bypass-kernels COMMAND --help' for the options of one command.
"""

SCHEDULE_HELP = (
    "'default', 'off', 'constant|linear|cosine:STRENGTH[:T_MIN[:T_MAX]]' (e.g. linear:0.3:500), "
    "'for_scheduler:SCHEDULER:STEPS:STRENGTH[:START[:END[:SHAPE]]]' (λ by fraction of sampling, e.g. "
    "for_scheduler:DDIMScheduler:20:0.3:0:0.4), a JSON object from BypassSchedule.to_dict(), or a JSON file"
)
SCHEDULE_DEFAULT = " (default: 'default', linear:0.3:T/2 with T = num_train_timesteps)"

DEVICE_HELP = "auto (cuda if a GPU is visible, else cpu), cpu, cuda, cuda:1, ..."

MODEL_HELP = "a preset (tiny-sd, tiny-sdxl, tiny-unet2d, sd15, sdxl) or a local diffusers UNet/pipeline folder"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default ("off" for a flag); an option whose default is None says
    in its own help what that means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text  # a required positional has no default
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


class _TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level description (the command list) as written."""


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line of stderr (exit status 2, no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**63), got {text}")
    return value


def _device_name(text: str) -> str:
    """A --device value, checked against this machine before any model is loaded."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{text!r} is not available: {why} (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not callable(getattr(backend, "is_available", None)) or not backend.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available here")
    return text


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cmd_run(args) -> int:
    from bypass_kernels.experiments.sampling import ddim_sample
    from bypass_kernels.presets import example_inputs, load_unet

    device, dtype = _device(args.device), _dtype(args.dtype)
    schedule = BypassSchedule.parse(args.schedule)  # a bad spec fails before the model loads
    unet = load_unet(args.model, dtype=dtype, device=device)
    inputs = example_inputs(unet, batch=args.batch, seed=args.seed)
    noise = inputs.pop("sample")
    inputs.pop("timestep")

    baseline = None if args.no_baseline else ddim_sample(unet, noise, args.steps, extra=inputs)
    bypass_kernels.patch(unet, schedule, backend=args.backend)
    backend = bypass_kernels.backends.resolve(args.backend, device)
    print(f"model {args.model} on {device} ({args.dtype}), batch {args.batch}, {args.steps} DDIM steps")
    print(f"schedule {schedule!r}")
    print(f"blend backend: {backend} (asked for {args.backend!r})")
    print(f"{'step':>4}  {'timestep':>8}  {'lambda':>7}  {'ms':>8}")

    def show(i, t, seconds):
        print(f"{i:>4}  {int(t):>8}  {schedule.weight(t):>7.4f}  {seconds * 1e3:>8.2f}", flush=True)

    latents = ddim_sample(unet, noise, args.steps, extra=inputs, on_step=show)
    if baseline is not None:
        diff = (latents.float() - baseline.float()).abs()
        print("how far the bypass moved the result (same noise and inputs, patched against unpatched; 0 = no change):")
        print(f"final latents vs the unpatched model: mean |diff| {diff.mean():.4g}, max {diff.max():.4g}")
    return 0


def _writable_folder(path: str) -> str:
    """Create ``path`` if needed and check a file can be written there, before any long work."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out: cannot write to {path!r}: {exc.strerror or exc}") from None
    return path


def cmd_generate(args) -> int:
    from diffusers import UNet2DModel

    from bypass_kernels.experiments import datasets
    from bypass_kernels.experiments.metrics import group_counts
    from bypass_kernels.experiments.sampling import ddim_sample, seeded_noise
    from bypass_kernels.plotting import image_grid

    created = not os.path.exists(args.out)
    _writable_folder(args.out)  # first: an unusable --out fails before any work
    try:
        name = args.model or "shapes"
        shipped = name in datasets.NAMES
        folder = datasets.shipped_folder(name) if shipped else name
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(
                f"model: no diffusers model at {folder!r}"
                + (
                    f"; the shipped checkpoint is missing (python benchmarks/bias_experiment.py --dataset {name})"
                    if shipped
                    else ""
                )
            )
        if UNet2DModel.load_config(folder).get("_class_name") != "UNet2DModel":
            raise ValueError("model: generate takes an unconditional UNet2DModel folder (e.g. a DDPM checkpoint)")
    except ValueError:
        if created:  # a wrong --model leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(args.out)
        raise
    device = _device(args.device)
    unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device).float().eval()
    schedule = BypassSchedule.parse(args.schedule)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = seeded_noise(args.n, shape, args.seed, device)
    plain = torch.cat([ddim_sample(unet, x, args.steps) for x in noise])
    with bypass_kernels.patched(unet, schedule):
        bypassed = torch.cat([ddim_sample(unet, x, args.steps) for x in noise])
    path = os.path.join(args.out, "grid.png")
    image_grid([plain[:64], bypassed[:64]], path, ["without bypass", f"with bypass: {schedule!r}"])
    print(f"model {folder}, {args.n} samples, {args.steps} DDIM steps, seed {args.seed}")
    reader = datasets.reader_for(folder, dict(unet.config))
    if reader is not None:
        groups, read = reader
        width = max(len(g) for g in groups) + 2
        counts = [group_counts(read(images.cpu())["group"], groups) for images in (plain, bypassed)]
        print(f"{'group':<{width}} {'without':>8} {'with':>8}")
        for g in (*groups, "invalid"):
            print(f"{g:<{width}} {counts[0][g]:>8} {counts[1][g]:>8}")
    print(f"wrote {path}")
    return 0


def cmd_sweep(args) -> int:
    from bypass_kernels.experiments.sweep import DEFAULT_SCHEDULES, sweep

    schedules = args.schedule or list(DEFAULT_SCHEDULES)
    for spec in schedules:  # a bad spec fails before the model loads
        BypassSchedule.parse(spec)
    _writable_folder(args.out)
    result = sweep(
        args.model,
        schedules,
        out=args.out,
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        prompt=args.prompt,
        device=str(_device(args.device)),
    )
    print(f"model {args.model}: {len(schedules)} schedules x {args.n} seeds (from {args.seed}), one batched call")
    for i, label in enumerate(result.labels):
        print(f"row {i + 1}: {label}")
    print(f"wrote {result.path}")
    return 0


def cmd_info(args) -> int:
    report = bypass_kernels.info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(info_text(report))
    return 0


CPU_ISA_NOTE = {
    "avx2": "AVX2 + F16C, chosen at run time; BYPASS_KERNELS_CPU_ISA=generic forces the portable path",
    "generic": "portable; the CPU lacks AVX2 + F16C, or BYPASS_KERNELS_CPU_ISA=generic",
}


def info_text(report: dict) -> str:
    """``bypass_kernels.info()`` as a report for people."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None)
    native = report["native_extension"]
    lines = [
        f"bypass_kernels {bypass_kernels.__version__}",
        f"  versions:         {versions}" + ("" if report["versions"].get("cuda") else " (a CPU-only torch)"),
        f"  native extension: {'loaded' if native['loaded'] else 'not loaded: ' + _one_line(native['reason'])}",
        f"  CUDA device:      {report['cuda_device'] or 'none visible'}",
    ]
    if native.get("cpu_isa"):
        lines.insert(3, f"  CPU kernel path:  {native['cpu_isa']} ({CPU_ISA_NOTE[native['cpu_isa']]})")
    if report["triton_interpret"]:
        lines.append("  TRITON_INTERPRET=1: Triton kernels run on the CPU through its interpreter (for tests)")
    lines += ["", "backends:"]
    for name, row in report["backends"].items():
        state = "available" if row["available"] else f"unavailable: {_one_line(row['reason'])}"
        lines.append(f"  {name:<7} {state}")
    lines += ["", "auto picks:"]
    for device_type, name in report["auto"].items():
        lines.append(f"  {name:<7} for {device_type.upper()} tensors in eager mode")
    lines.append(f"  {report['traced']} while tracing (torch.compile, torch.export, ONNX export)")
    return "\n".join(lines)


def schedule_text(schedule: BypassSchedule, rows: int = 11) -> str:
    """What a user wants to see of a schedule: where λ is non-zero, its largest value, and a table of λ from
    the noisiest timestep down, with a bar for its shape. The rows are the timesteps a sampler-keyed
    schedule stores (from_steps, for_scheduler), else ``rows`` points spanning the non-zero range with one
    zero entry on each side."""
    table = schedule.table()
    T = schedule.num_train_timesteps
    nonzero = torch.nonzero(table).reshape(-1).tolist()
    lines = [repr(schedule)]
    if not nonzero:
        lines.append(f"λ = 0 at every timestep 0..{T - 1}: the unchanged model")
        return "\n".join(lines)
    lo, hi = nonzero[0], nonzero[-1]
    peak = int(torch.argmax(table))
    top = float(table[peak])
    lines.append(f"λ > 0 at {len(nonzero)} of {T} timesteps, between {lo} and {hi}; max {top:.4g} at t = {peak}")
    params = schedule.to_dict()
    if "timesteps" in params:  # the timesteps the sampler visits, in its order
        points = [float(t) for t in params["timesteps"]]
        label = f"λ at the {len(points)} timesteps the sampler visits"
        if len(points) > 4 * rows:
            stride = -(-len(points) // (4 * rows))
            points = points[::stride]
            label += f" (every {stride}th shown)"
    else:
        first, last = min(hi + 1, T - 1), max(lo - 1, 0)
        count = min(first - last + 1, rows)
        points = sorted({round(first - i * (first - last) / max(count - 1, 1)) for i in range(count)}, reverse=True)
        label = "λ from the noisiest timestep down (0 outside the rows shown)"
    lines += ["", label + ":", f"{'timestep':>9}  {'λ':>7}"]
    for t in points:
        w = schedule.weight(t)
        lines.append(f"{t:>9g}  {w:>7.4f}  {'#' * max(0, round(30 * w / top))}".rstrip())
    return "\n".join(lines)


def cmd_schedule(args) -> int:
    schedule = BypassSchedule.parse(args.schedule, num_train_timesteps=args.num_train_timesteps)
    if args.json:
        print(json.dumps(schedule.to_dict()))
    else:
        print(schedule_text(schedule))
    if args.plot:
        from bypass_kernels.plotting import plot_schedules

        plot_schedules({args.schedule: schedule}, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON only
    return 0


def cmd_export(args) -> int:
    from bypass_kernels.export.cli import run_export

    return run_export(args)


def cmd_triton_repo(args) -> int:
    from bypass_kernels.export.cli import run_triton_repo

    return run_triton_repo(args)


def cmd_comfyui(args) -> int:
    from bypass_kernels.comfyui.install import install

    folder = install(args.path, overwrite=args.overwrite)
    print(f"installed the Mid-Block / Span Bypass node: {folder}")
    print("restart ComfyUI; it loads the node from there (bypass_kernels must be installed in ComfyUI's Python)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bypass-kernels", description=DESCRIPTION, formatter_class=_TopHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands above")

    def command(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        # no help= here: the description above lists the commands once
        return sub.add_parser(name, description=description or summary, formatter_class=HelpFormatter)

    run = command("run", "patch a UNet and run a short DDIM loop (the main job)")
    run.add_argument("--model", default="tiny-sd", help=MODEL_HELP)
    run.add_argument("--schedule", default="default", help=SCHEDULE_HELP + SCHEDULE_DEFAULT)
    run.add_argument("--steps", type=_positive_int, default=20, help="DDIM sampling steps")
    run.add_argument("--batch", type=_positive_int, default=2, help="samples per call (random latents and prompts)")
    run.add_argument("--seed", type=_seed, default=0, help="seed of the random latents and conditioning")
    run.add_argument(
        "--backend",
        default="auto",
        choices=bypass_kernels.backends.NAMES,
        help="blend kernel (see bypass-kernels info)",
    )
    run.add_argument("--device", type=_device_name, default="auto", help=DEVICE_HELP)
    run.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="model and latent precision")
    run.add_argument("--no-baseline", action="store_true", help="skip the unpatched comparison run")
    run.set_defaults(func=cmd_run)

    gen = command(
        "generate",
        "images with and without bypass from the shipped model, offline",
        "Sample the same seeds without and with the bypass, write both rows into OUT/grid.png and, for a shipped "
        "model, print how many samples fall in each group.",
    )
    gen.add_argument("--out", default="generated", help="output folder (grid.png is written there)")
    gen.add_argument(
        "--model",
        default=None,
        help="a shipped model (shapes, the default; digits) or a local UNet2DModel folder",
    )
    gen.add_argument("--schedule", default="default", help=SCHEDULE_HELP + SCHEDULE_DEFAULT)
    gen.add_argument("--n", type=_positive_int, default=256, help="samples per setting")
    gen.add_argument("--steps", type=_positive_int, default=25, help="DDIM sampling steps")
    gen.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise")
    gen.add_argument("--device", type=_device_name, default="auto", help=DEVICE_HELP)
    gen.set_defaults(func=cmd_generate)

    sweep = command(
        "sweep",
        "schedules side by side from the same seeds, in one batched call",
        "Denoise the same seeds under each schedule in one batched call (a schedule per sample) and write "
        "OUT/sweep.png, a row per schedule. Offline on the shipped models; a diffusers pipeline folder with --prompt.",
    )
    sweep.add_argument(
        "--model",
        default="shapes",
        help="a shipped model (shapes, the default; digits), a local UNet2DModel folder or a pipeline folder",
    )
    sweep.add_argument(
        "--schedule",
        action="append",
        help=SCHEDULE_HELP + ". Repeat for each row (default: off, linear:0.15:500, default, linear:0.6:500, "
        "constant:0.3)",
    )
    sweep.add_argument("--n", type=_positive_int, default=8, help="seeds (columns) per schedule")
    sweep.add_argument("--steps", type=_positive_int, default=25, help="sampling steps")
    sweep.add_argument("--seed", type=_seed, default=0, help="column i starts from seed + i")
    sweep.add_argument("--prompt", default=None, help="the prompt, for a text-to-image pipeline folder (default: none)")
    sweep.add_argument("--out", default="sweep", help="output folder (sweep.png is written there)")
    sweep.add_argument("--device", type=_device_name, default="auto", help=DEVICE_HELP)
    sweep.set_defaults(func=cmd_sweep)

    info = command("info", "backends available here", "Which blend backends run here, why a missing one is missing.")
    info.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    info.set_defaults(func=cmd_info)

    sched = command("schedule", "show a schedule", "Print a schedule's λ at a sample of timesteps, or as JSON.")
    sched.add_argument("schedule", nargs="?", default="default", help=SCHEDULE_HELP + SCHEDULE_DEFAULT)
    sched.add_argument(
        "--num-train-timesteps",
        type=int,
        default=1000,
        help="length T of the λ table (the model's scheduler config, num_train_timesteps)",
    )
    sched.add_argument("--json", action="store_true", help="print only to_dict() as JSON")
    sched.add_argument("--plot", metavar="PNG", help="also write a plot of λ(t) to this file (default: no plot)")
    sched.set_defaults(func=cmd_schedule)
    from bypass_kernels.export.cli import add_export_parser, add_triton_parser

    add_export_parser(command, SCHEDULE_HELP, cmd_export)
    add_triton_parser(command, SCHEDULE_HELP, cmd_triton_repo)

    comfy = command(
        "comfyui",
        "install the ComfyUI node",
        "Write custom_nodes/bypass_kernels_node/ into a ComfyUI checkout: the node 'Mid-Block / Span Bypass' "
        "(MODEL in, MODEL out), loaded from this package by ComfyUI at its next start.",
    )
    comfy.add_argument("action", choices=("install",), help="what to do (install)")
    comfy.add_argument("path", help="the ComfyUI checkout (the folder with main.py, nodes.py and custom_nodes/)")
    comfy.add_argument("--overwrite", action="store_true", help="replace a different file already there")
    comfy.set_defaults(func=cmd_comfyui)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except bypass_kernels.BackendUnavailableError as exc:  # the hint names the command, not info()
        message = str(exc)
        if exc.reason is not None:
            message = f"backend {exc.backend!r} is unavailable: {exc.reason}; see `bypass-kernels info`"
        print(f"bypass-kernels {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"bypass-kernels {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
