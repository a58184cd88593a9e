"""Microbenchmark: the fused in-place blend against eager baselines.

Baselines, as a user would write them without this package:
  (a) eager_3op:   m + w * (h - m) with a Python float w (three kernels, out of place)
  (b) eager_item:  m.lerp_(h, table[idx].item())   (a host sync per call)
  (c) eager_gather: w = table[idx]; m.lerp_(h, w)   (device gather, cast, lerp: no sync)
Providers of this package: triton, cuda (C++), cpu (C++), torch (plain ops) through blend_().
Floor: add_floor is m.add_(h), the cheapest in-place op that moves the blend's bytes (read two
tensors, write one); no blend, eager or fused, can beat it by more than its fixed per-call cost.

Host cost (--host-cost-out, on by default; --host-cost-only for just this): the host time per call
of blend_ (its Python checks and dispatch; on the CPU the kernel's work too) against one m.add_(h)
on tensors of the same shape and dtype, as a ratio (target: at most 1.5x at the SD1.5 mid-block).
Each call is timed on the host clock within batches of back-to-back calls (on a GPU the device
keeps up: a blend takes a few µs there, a launch tens); a batch gives the median call, batches are
interleaved over rounds, and the ratio is taken per round, then its median and interval
(benchmarks/intervals.py). Rows also time the C++ op called directly (torch.ops.bypass_kernels.blend_,
no Python checks), and a tiny tensor where the CPU's compute is negligible. Re-run on another
version of the package (rows carry its last code commit) with
    python benchmarks/microbench.py --host-cost-only --device cpu --threads 1 --host-cost-out PATH.csv

Rows go to benchmarks/results/<device>-microbench.csv and <device>-host_cost.csv; plot them with
benchmarks/plot.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import time

import torch
from common import (
    append_rows,
    copy_bandwidth_gbps,
    csv_path,
    environment,
    graph_time_us,
    interleaved_median_us,
    interleaved_samples_us,
    kernels_per_call,
)
from intervals import median_ci, paired_overhead_pct

import bypass_kernels
from bypass_kernels import backends
from bypass_kernels.ops import timestep_index_tensor

SIZES = {
    "sd15_mid": (2, 1280, 8, 8),
    "sd15_mid_b8": (8, 1280, 8, 8),
    "sdxl_mid": (2, 1280, 32, 32),
    "64M": (4, 1024, 128, 128),
    # transformer streams [batch, tokens, width]: Flux at 1024² (4096 packed image tokens, 512 text
    # tokens, width 3072, batch 1: its guidance is embedded) and SD3.5 Medium at 1024² (a CFG batch of 2)
    "flux_image": (1, 4096, 3072),
    "flux_text": (1, 512, 3072),
    "sd35_image": (2, 4096, 1536),
    "sd35_text": (2, 333, 1536),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HOST_SIZES = {"sd15_mid": SIZES["sd15_mid"], "tiny": (2, 4, 1, 1)}


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
    for name in timed_backends(device):
        rows[name] = lambda m, h, name=name: bypass_kernels.blend_(m, h, table, t, backend=name)
    return rows


def timed_backends(device: torch.device, names=("triton", "cuda", "cpu", "torch")) -> list[str]:
    """The backends among ``names`` that run on ``device`` here, Triton's interpreter left out (it is
    for correctness, not speed)."""
    out = []
    for name in names:
        try:
            backends.require(name, device.type)
        except bypass_kernels.BackendUnavailableError:
            continue
        if not (name == "triton" and backends._triton_interpret()):
            out.append(name)
    return out


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


def host_calls(device: torch.device, table, t, m, h) -> dict:
    """``{(call, backend): fn}`` for the host-cost rows: add_ (the reference), blend_ per backend
    here and ``auto``, and the C++ op called directly where the extension serves this device."""
    m_add = m.clone()
    calls = {("add_", ""): functools.partial(m_add.add_, h)}
    for name in timed_backends(device, ("auto", "cuda", "triton", "cpu", "torch")):
        calls[("blend_", name)] = functools.partial(bypass_kernels.blend_, m, h, table, t, backend=name)
    if ("blend_", device.type) in calls:  # the C++ kernel of this device type ("cuda", "cpu") is built
        calls[("op", device.type)] = functools.partial(torch.ops.bypass_kernels.blend_, m, h, table, t)
    return calls


def host_time_us(fn, device: torch.device, calls: int) -> float:
    """Median host microseconds of ``calls`` back-to-back calls, each timed on the host clock (the
    median discards the calls a busy machine preempted; on a GPU each call returns once launched)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock = time.perf_counter
    times = []
    for _ in range(calls):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1e6


def package_commit() -> str:
    """The last commit that changed the package's code (``+dirty`` with uncommitted changes to it),
    or '' outside a git checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(bypass_kernels.__file__)))
    code = ["--", "bypass_kernels", "csrc", "export", "setup.py"]
    try:
        git = ["git", "-C", repo]
        head = subprocess.run([*git, "log", "-1", "--format=%h", *code], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", *code], capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def host_cost_rows(device, table, sizes, dtypes, *, rounds: int, calls: int, env: dict) -> list[dict]:
    rows = []
    commit = package_commit()
    for size_name in sizes:
        shape = HOST_SIZES[size_name]
        t = torch.full((shape[0],), 999.0, device=device)
        for dtype_name in dtypes:
            m = torch.randn(shape, device=device, dtype=DTYPES[dtype_name])
            h = torch.randn(shape, device=device, dtype=DTYPES[dtype_name])
            fns = host_calls(device, table, t, m, h)
            for fn in fns.values():
                for _ in range(5):  # warm-up: auto's choice cached, Triton compiled
                    fn()
            samples = interleaved_samples_us(fns, device, rounds=rounds, timer=host_time_us, calls=calls)
            ref = samples[("add_", "")]
            for (call, backend), values in samples.items():
                us, lo, hi = median_ci(values)
                pct, pct_lo, pct_hi = paired_overhead_pct(values, ref)
                rows.append(
                    {
                        "kernel": "blend",
                        "call": call,
                        "backend": backend,
                        "size": size_name,
                        "shape": "x".join(map(str, shape)),
                        "numel": m.numel(),
                        "dtype": dtype_name,
                        "calls_per_round": calls,
                        "rounds": rounds,
                        "median_us": round(us, 3),
                        "lo_us": round(lo, 3),
                        "hi_us": round(hi, 3),
                        "ratio_to_add": round(1 + pct / 100, 3),
                        "ratio_lo": round(1 + pct_lo / 100, 3),
                        "ratio_hi": round(1 + pct_hi / 100, 3),
                        "commit": commit,
                        **env,
                    }
                )
                label = f"{call}({backend})" if backend else call
                print(
                    f"host cost {size_name:>9} {dtype_name} {label:>14}: {us:8.2f} us per call [{lo:.2f}, {hi:.2f}], "
                    f"{1 + pct / 100:.2f}x add_ [{1 + pct_lo / 100:.2f}, {1 + pct_hi / 100:.2f}]"
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
    parser.add_argument("--host-cost-out", default=None, help="default: benchmarks/results/<device>-host_cost.csv")
    parser.add_argument("--host-cost-only", action="store_true", help="only the host-cost rows")
    parser.add_argument("--no-host-cost", action="store_true", help="no host-cost rows")
    parser.add_argument("--host-sizes", nargs="*", default=list(HOST_SIZES), choices=list(HOST_SIZES))
    parser.add_argument("--host-rounds", type=int, default=9, help="interleaved rounds of host-cost batches")
    parser.add_argument("--host-calls", type=int, default=200, help="back-to-back calls per host-cost batch")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    table = bypass_kernels.default_schedule().table(device)
    if not args.host_cost_only:
        blend_benchmark(device, table, env, args)
    if not args.no_host_cost:
        rows = host_cost_rows(
            device, table, args.host_sizes, args.dtypes, rounds=args.host_rounds, calls=args.host_calls, env=env
        )
        path = args.host_cost_out or csv_path(device, "host_cost")
        append_rows(path, rows)
        print(f"appended {len(rows)} rows to {path}")


def blend_benchmark(device, table, env, args) -> None:
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"{env['device']}: copy bandwidth {copy_gbps:.0f} GB/s (read + write); torch {env['torch']}")
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
