"""``bypass-kernels export``: ONNX (and optionally a TensorRT engine) with the schedule baked in."""

from __future__ import annotations

import json
import os
import time

ONNX_NAME = "unet.onnx"
ENGINE_NAME = "unet.plan"
CHECK_TIMESTEPS = ([999.0], [980.5, 620.25], [499.5, 500.5], [2000.0, -3.0], [750.0, 10.0])


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


def add_export_parser(sub, schedule_help: str, func) -> None:
    p = sub.add_parser("export", help="export a patched UNet to ONNX (and a TensorRT engine)")
    p.add_argument("--model", required=True, help="a preset (tiny-sd, tiny-sdxl, tiny-unet2d, sd15, sdxl) or folder")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--schedule", default=None, help=schedule_help + " (default: default_schedule())")
    p.add_argument("--fp16", action="store_true", help="half-precision graph (timestep stays float32)")
    p.add_argument("--engine", action="store_true", help="also build a TensorRT engine (needs tensorrt and a GPU)")
    p.add_argument("--schedule-as-input", action="store_true", help="make bypass_schedule a graph input")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    p.set_defaults(func=func)


def _prepare_out(folder: str, names: list[str], overwrite: bool) -> list[str]:
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"--out: cannot create {folder!r} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--out: {folder!r} is not writable")
    paths = [os.path.join(folder, n) for n in names]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"--out: {', '.join(existing)} exist(s); pass --overwrite to replace")
    return paths


def _check_onnx(unet, path: str, schedule, schedule_as_input: bool) -> float:
    """Largest error of ONNX Runtime against the patched PyTorch model, relative to the output's range."""
    from bypass_kernels.export.onnx_export import SCHEDULE_NAME, export_inputs, max_relative_error, onnxruntime_session

    import bypass_kernels

    with bypass_kernels.patched(unet, schedule, backend="torch"):
        inputs = export_inputs(unet)
        if schedule_as_input:
            inputs[SCHEDULE_NAME] = schedule.table()
        return max_relative_error(onnxruntime_session(path), unet, inputs, CHECK_TIMESTEPS)


def run_export(args) -> int:
    from bypass_kernels.export import build_engine, to_onnx

    from bypass_kernels.presets import load_unet
    from bypass_kernels.schedule import BypassSchedule, default_schedule

    names = [ONNX_NAME, ONNX_NAME + ".data", "config.json", "bypass_schedule.json"] + (
        [ENGINE_NAME] if args.engine else []
    )
    onnx_path, _data, config_path, schedule_path, *engine = _prepare_out(args.out, names, args.overwrite)
    if args.engine:
        import importlib.util

        if importlib.util.find_spec("tensorrt") is None:
            raise ValueError("--engine: TensorRT is not installed here (`pip install tensorrt`, needs an NVIDIA GPU)")
    schedule = BypassSchedule.parse(args.schedule) if args.schedule else default_schedule()
    progress = Progress(3 + (not args.no_check) + bool(args.engine))

    progress.begin(f"loading {args.model}")
    unet = load_unet(args.model)
    progress.end(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")

    progress.begin(f"exporting ONNX ({'fp16' if args.fp16 else 'fp32'}) with {schedule!r}")
    result = to_onnx(
        unet,
        onnx_path,
        schedule,
        opset=args.opset,
        fp16=args.fp16,
        overwrite=args.overwrite,
        schedule_as_input=args.schedule_as_input,
    )
    progress.end(f"inputs {', '.join(result.input_names)}")
    written = list(result.files)
    try:
        progress.begin("writing config.json and bypass_schedule.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(dict(unet.config), f, indent=2, default=list)
        written.append(config_path)
        with open(schedule_path, "w", encoding="utf-8") as f:
            json.dump(schedule.to_dict(), f)
        written.append(schedule_path)
        progress.end()
        if not args.no_check:
            progress.begin(f"checking with ONNX Runtime at {len(CHECK_TIMESTEPS)} timestep sets")
            error = _check_onnx(unet, onnx_path, schedule, args.schedule_as_input)
            limit = 2e-2 if args.fp16 else 1e-4
            if error > limit:
                raise RuntimeError(f"ONNX Runtime differs from PyTorch by {error:.3g} (limit {limit:g})")
            progress.end(f"max relative error {error:.3g}")
        if args.engine:
            progress.begin("building the TensorRT engine")
            written.append(build_engine(onnx_path, engine[0], fp16=True, overwrite=args.overwrite))
            progress.end()
    except BaseException:
        for path in written:  # no partial export left behind
            if os.path.exists(path):
                os.remove(path)
        raise
    print("wrote " + ", ".join(os.path.relpath(p) for p in written if os.path.exists(p)))
    return 0
