"""``bypass-kernels export``: ONNX (and optionally a TensorRT engine) with the schedule baked in."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

from bypass_kernels.export.onnx_export import CHECK_TIMESTEPS, DEFAULT_OPSET, MIN_OPSET

ONNX_NAME = "unet.onnx"
ENGINE_NAME = "unet.plan"


class Progress:
    """One line per step, with its time: enough to see where a long export is."""

    def __init__(self, total: int):
        self.total, self.step, self.start = total, 0, None

    def begin(self, what: str) -> None:
        self.step += 1
        self.start = time.perf_counter()
        print(f"[{self.step}/{self.total}] {what} ...", flush=True)

    def end(self, detail: str = "") -> None:
        seconds = time.perf_counter() - self.start
        print(f"      done in {seconds:.1f} s{'; ' + detail if detail else ''}", flush=True)


def add_export_parser(command, schedule_help: str, func) -> None:
    """Add the ``export`` subcommand; ``command(name, summary, description)`` makes a subparser."""
    p = command(
        "export",
        "export a patched UNet to ONNX (and a TensorRT engine)",
        f"Export a UNet with the bypass schedule baked in: OUT/{ONNX_NAME} (checked with ONNX Runtime), "
        f"config.json, bypass_schedule.json and, with --engine, OUT/{ENGINE_NAME}.",
    )
    p.add_argument("--model", required=True, help="a preset (tiny-sd, tiny-sdxl, tiny-unet2d, sd15, sdxl) or folder")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--schedule", default=None, help=schedule_help + " (default: default_schedule())")
    p.add_argument("--fp16", action="store_true", help="half-precision graph (timestep stays float32)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt and a GPU)")
    p.add_argument("--batch", default=None, help="engine batch range: N or MIN:OPT:MAX (default: 1:2:8)")
    p.add_argument(
        "--resolution",
        default=None,
        help="engine image size range in pixels: N or MIN:OPT:MAX (default: ½× to 2× the exported size)",
    )
    p.add_argument(
        "--text-len", default=None, help="engine text length range: N or MIN:OPT:MAX (default: the exported length)"
    )
    p.add_argument("--schedule-as-input", action="store_true", help="make bypass_schedule a graph input")
    p.add_argument(
        "--per-sample",
        action="store_true",
        help="make bypass_schedule a graph input [batch, T]: a schedule per sample (for servers that batch requests)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset version, at least {MIN_OPSET} (default: {DEFAULT_OPSET})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    p.set_defaults(func=func)

    def one_line_error(message: str):  # argparse would print the usage first: user errors are one line
        p.exit(2, f"{p.prog}: error: {message} (see --help)\n")

    p.error = one_line_error


def _prepare_out(folder: str, names: list[str], overwrite: bool) -> tuple[str, bool]:
    """The output folder (created if missing: the flag says so), checked before any work."""
    folder = os.path.abspath(folder)
    created = False
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(f"--out: {folder!r} is a file, not a folder")
        try:
            os.makedirs(folder)
            created = True
        except OSError as exc:
            raise PermissionError(f"--out: cannot create {folder!r} ({exc.strerror})") from None
    try:
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"--out: {folder!r} is not writable")
        existing = [n for n in names if os.path.lexists(os.path.join(folder, n))]
        if existing and not overwrite:
            verb = "exists" if len(existing) == 1 else "exist"
            raise FileExistsError(f"--out: {', '.join(existing)} {verb} in {folder}; pass --overwrite to replace")
    except BaseException:
        _remove_if_created(folder, created)
        raise
    return folder, created


def _remove_if_created(folder: str, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty: never anything else's files


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM ends the export through the normal clean-up (staging removed, no folder left)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> BaseException:
    """User errors print as one line (the first of a long message)."""
    text = str(exc).strip()
    if "\n" not in text:
        return exc
    first = text.splitlines()[0]
    try:
        return type(exc)(first)
    except Exception:
        return RuntimeError(first)


def run_export(args) -> int:
    try:
        with _terminate_as_exit():
            return _run_export(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise _one_line(exc) from None


def _engine_ranges(options: dict, enabled: bool, needs: str) -> dict:
    """The engine shape ranges given on the command line (``--text-len`` -> ``text_len``), checked;
    each is refused unless the engine is built (``needs``: the option that builds it)."""
    from bypass_kernels.export.profiles import parse_range

    ranges = {}
    for option, value in options.items():
        if value is not None:
            if not enabled:
                raise ValueError(f"{option}: an engine shape range; it needs {needs}")
            ranges[option.lstrip("-").replace("-", "_")] = parse_range(option, value)
    return ranges


def _schedule_option(text: str | None):
    """``--schedule`` as a schedule (default: ``default_schedule()``); errors name the option."""
    from bypass_kernels.schedule import BypassSchedule, default_schedule

    try:
        return BypassSchedule.parse(text) if text else default_schedule()
    except (KeyError, OverflowError, ValueError, TypeError) as exc:
        message = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc}"
        raise ValueError(f"--schedule: {message}") from None


def _run_export(args) -> int:
    from bypass_kernels.export import staging
    from bypass_kernels.export.onnx_export import export_to_staging, verify_export

    from bypass_kernels.presets import load_unet

    options = {"--batch": args.batch, "--resolution": args.resolution, "--text-len": args.text_len}
    ranges = _engine_ranges(options, args.engine, "--engine")
    if args.engine:
        from bypass_kernels.export.tensorrt import require_installed

        require_installed("--engine")
    schedule = _schedule_option(args.schedule)
    names = [ONNX_NAME, "config.json", "bypass_schedule.json"] + ([ENGINE_NAME] if args.engine else [])
    folder, created = _prepare_out(args.out, names, args.overwrite)
    progress = Progress(4 + (not args.no_check) + bool(args.engine))
    try:
        with staging.Staging(folder) as stage:
            progress.begin(f"loading {args.model}")
            unet = load_unet(args.model)
            progress.end(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")

            progress.begin(f"exporting ONNX ({'fp16' if args.fp16 else 'fp32'}) with {schedule!r}")
            result = export_to_staging(
                unet,
                stage,
                ONNX_NAME,
                schedule,
                opset=args.opset,
                fp16=args.fp16,
                schedule_as_input=args.schedule_as_input,
                per_sample=args.per_sample,
                check=False,
            )
            progress.end(f"inputs {', '.join(result.input_names)}")
            if not args.no_check:
                progress.begin(f"checking with ONNX Runtime at {len(CHECK_TIMESTEPS)} timestep sets")
                error = verify_export(
                    result.path,
                    unet,
                    schedule,
                    schedule_as_input=result.schedule_as_input,
                    fp16=args.fp16,
                    per_sample=args.per_sample,
                )
                progress.end(f"max relative error {error:.3g}")

            progress.begin("writing config.json and bypass_schedule.json")
            config = dict(unet.config)
            config["_bypass_kernels"] = {
                "text_len": result.text_len,
                "fp16": args.fp16,
                "schedule_as_input": result.schedule_as_input,
                "per_sample": args.per_sample,
                "inputs": result.input_names,
            }
            with open(stage.file("config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, default=list)
            with open(stage.file("bypass_schedule.json"), "w", encoding="utf-8") as f:
                json.dump(schedule.to_dict(), f)
            progress.end()
            staged = [*result.files, "config.json", "bypass_schedule.json"]
            if args.engine:
                from bypass_kernels.export.tensorrt import engine_bytes

                progress.begin("building the TensorRT engine")
                serialized = engine_bytes(result.path, **ranges)
                with open(stage.file(ENGINE_NAME), "wb") as f:
                    f.write(serialized)
                staged.append(ENGINE_NAME)
                progress.end()
            progress.begin(f"publishing into {folder}")
            written = stage.publish(staged, overwrite=args.overwrite, graph=ONNX_NAME)
            progress.end()
    except BaseException:
        _remove_if_created(folder, created)
        raise
    print("wrote " + ", ".join(written))  # absolute paths: --out made absolute before any work
    return 0


def add_triton_parser(command, schedule_help: str, func) -> None:
    """Add the ``triton-repo`` subcommand (a Triton Inference Server model repository)."""
    from bypass_kernels.export.triton_repo import DENOISER_BACKENDS

    p = command(
        "triton-repo",
        "write a Triton Inference Server model repository (batched requests, a schedule each)",
        "Write OUT as a Triton model repository: unet/ (exported with a schedule per sample, dynamic batching) "
        "and, for SD 1.x/2.x-shaped UNets, pipeline/ (the denoising loop in the python backend, calling unet/ "
        "each step). Every config.pbtxt is Triton's ModelConfig.",
    )
    p.add_argument("--model", required=True, help="a preset (tiny-sd, sd15, ...), a UNet folder or a pipeline folder")
    p.add_argument("--out", required=True, help="the repository folder (written whole, or not at all)")
    p.add_argument(
        "--schedule", default=None, help=schedule_help + " (the repository's default; requests may send theirs)"
    )
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=DENOISER_BACKENDS,
        help="the denoiser's Triton backend: onnxruntime; python (ONNX Runtime in the python backend); tensorrt "
        "(builds the engine here: needs TensorRT and the serving GPU)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="rows the dynamic batcher joins into one denoiser call")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="how long the batcher waits for more requests")
    p.add_argument("--instances", type=int, default=1, help="denoiser model instances")
    p.add_argument("--pipeline-instances", type=int, default=4, help="denoising loops that run at once")
    p.add_argument("--steps", type=int, default=50, help="the pipeline model's default num_inference_steps")
    p.add_argument("--guidance", type=float, default=7.5, help="the pipeline model's default guidance_scale")
    p.add_argument(
        "--scheduler",
        default="DDIMScheduler",
        help="the loop's diffusers scheduler class where --model is not a pipeline folder (which brings its own); "
        "with StableDiffusionPipeline's corrections (steps_offset 1, clip_sample off)",
    )
    p.add_argument("--no-pipeline", action="store_true", help="write the denoiser model only")
    p.add_argument("--fp16", action="store_true", help="half-precision graph")
    p.add_argument(
        "--resolution",
        default=None,
        help="tensorrt: image size range in pixels, N or MIN:OPT:MAX (default: ½× to 2× the exported size)",
    )
    p.add_argument(
        "--text-len", default=None, help="tensorrt: text length range, N or MIN:OPT:MAX (default: the exported length)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository at --out")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison of the export")
    p.set_defaults(func=func)


def _scheduler_for(model: str, class_name: str):
    import diffusers

    folder = os.path.join(model, "scheduler")
    if os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        config = diffusers.SchedulerMixin.load_config(folder)
        return getattr(diffusers, config["_class_name"]).from_config(config)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(f"--scheduler: {class_name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    scheduler = cls(num_train_timesteps=1000)
    # what StableDiffusionPipeline corrects in any scheduler it is given (diffusers warns and changes them)
    fixes = {k: v for k, v in (("steps_offset", 1), ("clip_sample", False)) if k in scheduler.config}
    settings = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # _use_default_values: no
    return cls.from_config({**settings, **fixes})


def run_triton_repo(args) -> int:
    from bypass_kernels.export.triton_repo import write_model_repository

    from bypass_kernels.presets import load_unet

    options = {"--resolution": args.resolution, "--text-len": args.text_len}
    ranges = _engine_ranges(options, args.backend == "tensorrt", "--backend tensorrt")
    schedule = _schedule_option(args.schedule)
    with _terminate_as_exit():
        scheduler = None if args.no_pipeline else _scheduler_for(args.model, args.scheduler)
        print(f"exporting {args.model} (a schedule per sample) and writing the repository ...", flush=True)
        result = write_model_repository(
            load_unet(args.model),
            args.out,
            schedule,
            backend=args.backend,
            pipeline=False if args.no_pipeline else None,
            scheduler=scheduler,
            max_batch_size=args.max_batch,
            instances=args.instances,
            pipeline_instances=args.pipeline_instances,
            queue_delay_us=args.queue_delay_us,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            fp16=args.fp16,
            overwrite=args.overwrite,
            check=not args.no_check,
            **ranges,
        )
    checked = "" if result.max_error is None else f"; ONNX Runtime vs PyTorch {result.max_error:.2g}"
    print(f"wrote {result.folder}: {', '.join(result.models)} ({result.backend} denoiser{checked})")
    return 0
