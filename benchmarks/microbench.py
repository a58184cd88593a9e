"""Microbenchmark: the fused in-place blend against eager baselines.

Baselines, as a user would write them without this package:
  (a) eager_3op:   m + w * (h - m) with a Python float w (three kernels, out of place)
  (b) eager_item:  m.lerp_(h, table[idx].item())   (a host sync per call)
  (c) eager_gather: w = table[idx]; m.lerp_(h, w)   (device gather, cast, lerp: no sync)
Providers of this package: triton, cuda (C++), cpu (C++), torch (plain ops) through blend_().
Floor: add_floor is m.add_(h), the cheapest in-place op that moves the blend's bytes (read two
tensors, write one); no blend, eager or fused, can beat it by more than its fixed per-call cost.

Rows go to benchmarks/results/<device>-microbench.csv; plot them with benchmarks/plot.py.
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import (
    append_rows,
    copy_bandwidth_gbps,
    csv_path,
    environment,
    graph_time_us,
    interleaved_median_us,
    kernels_per_call,
)

import bypass_kernels
from bypass_kernels import backends
from bypass_kernels.ops import timestep_index_tensor

SIZES = {
    "sd15_mid": (2, 1280, 8, 8),
    "sd15_mid_b8": (8, 1280, 8, 8),
    "sdxl_mid": (2, 1280, 32, 32),
    "64M": (4, 1024, 128, 128),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def providers(device: torch.device, table, t):
    def eager_3op(m, h):
        w = 0.3
        return m + w * (h - m)

    def eager_item(m, h):
        return m.lerp_(h, table[timestep_index_tensor(t, table.shape[0])[0]].item())  # one λ: t is uniform here

    def eager_gather(m, h):
        w = table[timestep_index_tensor(t, table.shape[0])].to(m.dtype)
        return m.lerp_(h, w.reshape(-1, *([1] * (m.dim() - 1))))

    def add_floor(m, h):
        return m.add_(h)

    rows = {"eager_3op": eager_3op, "eager_item": eager_item, "eager_gather": eager_gather, "add_floor": add_floor}
    for name in ("triton", "cuda", "cpu", "torch"):
        try:
            backends.require(name, device.type)
        except bypass_kernels.BackendUnavailableError:
            continue
        if name == "triton" and backends._triton_interpret():
            continue  # the interpreter is for correctness, not speed
        rows[name] = lambda m, h, name=name: bypass_kernels.blend_(m, h, table, t, backend=name)
    return rows


def measure(provider, call, plain_us, m, device, args, size_name, dtype_name, copy_gbps, env) -> list[dict]:
    """Rows for one provider's ``call`` on ``m``'s (size, dtype): plain launches (timed by the caller,
    interleaved with the other providers), and CUDA-graph replay on a GPU."""
    big = m.numel() >= (1 << 24)
    nbytes = 3 * m.numel() * m.element_size()  # read m and h, write m
    timings = {"plain": plain_us}
    if device.type == "cuda" and not args.no_graph and provider != "eager_item":  # .item() cannot be captured
        timings["cuda_graph"] = graph_time_us(call, device, calls_per_graph=2 if big else 20)
    kernels = kernels_per_call(call, device)
    rows = []
    for mode, us in timings.items():
        gbps = nbytes / (us * 1e-6) / 1e9
        rows.append(
            {
                "kernel": "blend",
                "provider": provider,
                "size": size_name,
                "shape": "x".join(map(str, m.shape)),
                "numel": m.numel(),
                "dtype": dtype_name,
                "mode": mode,
                "median_us": round(us, 3),
                "gbps": round(gbps, 1),
                "copy_share": round(gbps / copy_gbps, 4),
                "copy_gbps": round(copy_gbps, 1),
                "kernels_per_call": kernels,
                **env,
            }
        )
        print(
            f"{size_name:>12} {dtype_name} {provider:>13} {mode:>10}: {us:10.2f} us "
            f"{gbps:8.1f} GB/s ({100 * gbps / copy_gbps:5.1f}% of copy), {kernels:g} kernels/call"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timings")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/<device>-microbench.csv)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"{env['device']}: copy bandwidth {copy_gbps:.0f} GB/s (read + write); torch {env['torch']}")
    table = bypass_kernels.default_schedule().table(device)
    rows = []
    for size_name in args.sizes:
        shape = SIZES[size_name]
        t = torch.full((shape[0],), 999.0, device=device)  # one timestep per sample, as a CFG batch has
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            m = torch.randn(shape, device=device, dtype=dtype)
            h = torch.randn(shape, device=device, dtype=dtype)
            calls = {name: functools.partial(fn, m, h) for name, fn in providers(device, table, t).items()}
            big = m.numel() >= (1 << 24)
            timing = dict(rounds=3, reps=10, min_reps=2, warmup=2) if big else dict(rounds=7, reps=40, warmup=5)
            plain = interleaved_median_us(calls, device, max_seconds=1.0, **timing)
            for provider, call in calls.items():
                rows += measure(provider, call, plain[provider], m, device, args, size_name, dtype_name, copy_gbps, env)
    path = args.out or csv_path(device, "microbench")
    append_rows(path, rows)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
