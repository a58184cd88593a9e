"""Per-step time of the exported graph in ONNX Runtime (OnnxRuntimeUNet) against the PyTorch UNet.

Each model is exported with the bypass baked in (``to_onnx``), then one UNet call (batch 2, the
preset's latent size, the pipeline-style call ``unet(sample, t, encoder_hidden_states=..., ...)``) is
timed for: the unpatched PyTorch UNet, the patched PyTorch UNet, and OnnxRuntimeUNet on the CPU
provider with thread spinning off (spinning ORT threads slow the PyTorch calls timed in between;
its per-call cost includes the torch → numpy → torch copies a pipeline pays). Interleaved
rounds, medians; rows appended to results/<device>-ort-step.csv.

    python benchmarks/ort_step.py --models tiny-sd tiny-sdxl
"""

from __future__ import annotations

import argparse
import os
import tempfile

import onnxruntime
import torch
from bypass_kernels.export import OnnxRuntimeUNet, to_onnx
from common import append_rows, csv_path, environment, interleaved_median_us

import bypass_kernels
from bypass_kernels import BypassSchedule
from bypass_kernels.presets import build_unet, example_inputs

SCHEDULE = BypassSchedule.linear(0.3, t_min=0)  # non-zero at every timestep: the blend always runs


def measure(name: str, rounds: int, threads: int | None) -> list[dict]:
    device = torch.device("cpu")
    unet = build_unet(name)
    inputs = example_inputs(unet, batch=2)
    inputs.pop("timestep")
    sample = inputs.pop("sample")
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/unet.onnx"
        to_onnx(unet, path, SCHEDULE)
        options = onnxruntime.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads steal the CPU
        if threads:
            options.intra_op_num_threads = threads
        runner = OnnxRuntimeUNet(path, providers=["CPUExecutionProvider"], session_options=options)
        patched = build_unet(name)
        bypass_kernels.patch(patched, SCHEDULE)

        def call(model):
            def fn():
                with torch.no_grad():
                    return model(sample, torch.tensor(700), return_dict=False, **inputs)[0]

            return fn

        fns = {"pytorch unpatched": call(unet), "pytorch patched": call(patched), "onnxruntime": call(runner)}
        times = interleaved_median_us(fns, device, rounds=rounds)
    load = os.getloadavg()[0]  # the machine is shared: other work's load, for reading the figures
    env = environment(device)
    base = times["pytorch unpatched"]
    return [
        {
            "model": name,
            "variant": variant,
            "batch": 2,
            "latent": sample.shape[-1],
            "ms_per_step": round(us / 1e3, 4),
            "vs_unpatched": round(us / base, 3),
            "threads": torch.get_num_threads(),
            "load_1min": round(load, 2),
            "onnxruntime": onnxruntime.__version__,
            **env,
        }
        for variant, us in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-sdxl"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="threads for PyTorch and ONNX Runtime alike")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += measure(name, args.rounds, args.threads)
    for row in rows:
        print(f"{row['model']:<10} {row['variant']:<18} {row['ms_per_step']:>8.3f} ms  ({row['vs_unpatched']:.2f}x)")
    append_rows(csv_path(torch.device("cpu"), "ort-step"), rows)


if __name__ == "__main__":
    main()
