"""A schedule per sample: what one batch with 8 schedules costs against one shared schedule and against 8
calls of one sample each.

Op (kind ``op``): ``blend_`` in place on a batch of 8 with a [8, T] table (a row per sample) against
the same call with a [T] table (today's kernel; both with a timestep per sample), per backend, at the
SD1.5 mid-block and a Flux image stream. Target: the 2-D table within 5% of the 1-D one.

Step (kind ``step``): one model call on a batch of 8 under ``per_sample`` with 8 schedules, against
the same call with one shared schedule, and against 8 calls of batch 1 (each with its own schedule,
the only way before per-sample tables). Target: the 8-schedule batch within 2% of the shared call.

Figures are medians over interleaved rounds with an order-statistic interval; overhead_pct is taken
per round against the reference timed in the same round (benchmarks/intervals.py). Rows go to
benchmarks/results/<device>-per_sample.csv.

On a GPU: python benchmarks/per_sample.py --models sd15 flux-reduced
On a CPU: python benchmarks/per_sample.py --models tiny-sd tiny-flux --op-sizes sd15_mid_b8
"""

from __future__ import annotations

import argparse

import dit_presets
import torch
from common import append_rows, csv_path, environment, interleaved_samples_us
from intervals import median_ci, paired_overhead_pct

import bypass_kernels
from bypass_kernels import BypassSchedule, backends
from bypass_kernels.presets import build_unet, example_inputs

BATCH = 8
# 8 schedules that act at every timestep, each different
SCHEDULES = [BypassSchedule.linear(0.1 * (i + 1), t_min=0) for i in range(BATCH)]
OP_SIZES = {"sd15_mid_b8": (BATCH, 1280, 8, 8), "flux_image_b8": (BATCH, 4096, 3072)}


def _row(env, kind, name, variant, backend, samples, reference, target_pct):
    median, lo, hi = median_ci(samples)
    row = dict(kind=kind, case=name, variant=variant, backend=backend, batch=BATCH, median_us=round(median, 2))
    row.update(us_lo=round(lo, 2), us_hi=round(hi, 2))
    if reference is None:
        row.update(overhead_pct="", overhead_lo_pct="", overhead_hi_pct="", target_pct="")
    else:
        pct, plo, phi = paired_overhead_pct(samples, reference)
        row.update(overhead_pct=round(pct, 2), overhead_lo_pct=round(plo, 2), overhead_hi_pct=round(phi, 2))
        row.update(target_pct=target_pct)
    return {**row, **env}


def op_rows(device, dtype, sizes, rounds, env) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    rows_table = BypassSchedule.stack(SCHEDULES).to(device)
    shared_table = SCHEDULES[3].table(device)
    t = torch.linspace(999, 100, BATCH, device=device)
    for name in sizes:
        shape = OP_SIZES[name]
        m = torch.randn(shape, generator=gen).to(device, dtype)
        h = torch.randn(shape, generator=gen).to(device, dtype)
        for backend in backends.NAMES:
            if backend == "auto" or backends._why_unavailable(backend, device.type) is not None:
                continue
            if backend == "triton" and device.type == "cpu":  # the interpreter: for tests, not timings
                continue
            fns = _op_fns(m, h, shared_table, rows_table, t, backend)
            samples = interleaved_samples_us(fns, device, rounds=rounds)
            base = samples["1-D table"]
            rows.append(_row(env, "op", f"{name} {dtype_name(dtype)}", "1-D table", backend, base, None, ""))
            two = samples["2-D table, a row per sample"]
            rows.append(
                _row(env, "op", f"{name} {dtype_name(dtype)}", "2-D table, a row per sample", backend, two, base, 5)
            )
    return rows


def _op_fns(m, h, shared_table, rows_table, t, backend) -> dict:
    return {
        "1-D table": lambda: bypass_kernels.blend_(m, h, shared_table, t, backend=backend),
        "2-D table, a row per sample": lambda: bypass_kernels.blend_(m, h, rows_table, t, backend=backend),
    }


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _model(name, device, dtype):
    """(model, inputs for a batch of BATCH, a function slicing those inputs to sample i)."""
    if name in dit_presets.PRESETS:
        model = dit_presets.build(name, device=device, dtype=dtype)
        inputs = dit_presets.inputs(name, model, device, dtype, batch=BATCH)
        bypass_kernels.patch(model, SCHEDULES[0], span=(1, 2))
    else:
        model = build_unet(name, dtype=dtype, device=device)
        inputs = example_inputs(model, batch=BATCH, timestep=torch.full((BATCH,), 700.0, device=device))
        bypass_kernels.patch(model, SCHEDULES[0])

    def one(i):
        return {
            k: (v[i : i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == BATCH else v)
            for k, v in inputs.items()
        }

    return model, inputs, one


def _step_fns(model, inputs: dict, singles: list[dict]) -> dict:
    def call(kwargs):
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    def per_sample_batch():
        with bypass_kernels.per_sample(model, SCHEDULES):
            return call(inputs)

    def eight_calls():
        for i, kwargs in enumerate(singles):
            with bypass_kernels.per_sample(model, [SCHEDULES[i]]):
                call(kwargs)

    return {"one shared schedule": lambda: call(inputs), "8 schedules": per_sample_batch, "8 calls": eight_calls}


def step_rows(models, device, dtype, rounds, env) -> list[dict]:
    rows = []
    for name in models:
        model, inputs, one = _model(name, device, dtype)
        fns = _step_fns(model, inputs, [one(i) for i in range(BATCH)])
        samples = interleaved_samples_us(fns, device, rounds=rounds, reps=3, warmup=2)
        base = samples["one shared schedule"]
        rows.append(_row(env, "step", name, "batch 8, one shared schedule", "auto", base, None, ""))
        rows.append(_row(env, "step", name, "batch 8, 8 schedules", "auto", samples["8 schedules"], base, 2))
        rows.append(_row(env, "step", name, "8 calls of batch 1", "auto", samples["8 calls"], base, ""))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA")
    parser.add_argument("--models", nargs="*", default=None, help="UNet presets and DiT presets (dit_presets.py)")
    parser.add_argument("--op-sizes", nargs="*", default=list(OP_SIZES), choices=list(OP_SIZES))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32
    )
    models = (
        args.models
        if args.models is not None
        else (["sd15", "flux-reduced"] if device.type == "cuda" else ["tiny-sd", "tiny-flux"])
    )
    env = environment(device)
    rows = op_rows(device, dtype, args.op_sizes, args.rounds, env) + step_rows(models, device, dtype, args.rounds, env)
    path = args.out or csv_path(device, "per_sample")
    append_rows(path, rows)
    for row in rows:
        extra = (
            f"  {row['overhead_pct']:+.2f}% [{row['overhead_lo_pct']}, {row['overhead_hi_pct']}]"
            if row["overhead_pct"] != ""
            else ""
        )
        where = f"{row['kind']:<5} {row['case']:<24} {row['variant']:<30} {row['backend']:<7}"
        print(f"{where} {row['median_us']:>12.1f} µs{extra}")
    print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
