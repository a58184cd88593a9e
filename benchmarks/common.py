"""Shared benchmark helpers: environment row, timing (CUDA events / host clock), CSV rows."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def csv_path(device: torch.device, kind: str) -> str:
    base = "cpu" if device.type == "cpu" else slug(torch.cuda.get_device_name(device))
    return os.path.join(RESULTS, f"{base}-{kind}.csv")


def append_rows(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(rows[0])
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has other columns than these rows ({header} vs {fields}): pass another --out")
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def median_time_us(
    fn, device: torch.device, *, warmup: int = 10, reps: int = 100, max_seconds: float = 2.0, min_reps: int = 5
) -> float:
    """Median microseconds per call: CUDA events around each call on a GPU, the host clock on the CPU.
    Stops after ``reps`` calls, or after ``max_seconds`` once ``min_reps`` calls are in."""
    for _ in range(warmup):
        fn()
    samples = []
    budget = time.perf_counter() + max_seconds
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
            if time.perf_counter() > budget and len(samples) >= min_reps:
                break
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
            if time.perf_counter() > budget and len(samples) >= min_reps:
                break
    return statistics.median(samples)


def interleaved_samples_us(
    fns: dict, device: torch.device, *, rounds: int = 5, errors=None, timer=None, **timing
) -> dict:
    """``{name: [median µs per call in each round]}``, measured in interleaved rounds so that drift in
    clock speed or in a shared machine's load falls on every function alike. ``timer(fn, device,
    **timing)`` times one function in one round (default :func:`median_time_us`). With an ``errors``
    dict, a function that raises is dropped (its exception recorded there) and the others go on."""
    timer = timer or median_time_us
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if errors is not None and name in errors:
                continue
            try:
                samples[name].append(timer(fn, device, **timing))
            except Exception as exc:
                if errors is None:
                    raise
                errors[name] = exc
    return {name: values for name, values in samples.items() if errors is None or name not in errors}


def interleaved_median_us(fns: dict, device: torch.device, *, rounds: int = 5, **timing) -> dict:
    """``{name: median µs per call}``: the median of each round's median (:func:`interleaved_samples_us`)."""
    samples = interleaved_samples_us(fns, device, rounds=rounds, **timing)
    return {name: statistics.median(values) for name, values in samples.items()}


def graph_time_us(fn, device: torch.device, *, calls_per_graph: int = 20, reps: int = 50) -> float:
    """Median microseconds per call when ``calls_per_graph`` calls are captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    return median_time_us(graph.replay, device, warmup=3, reps=reps) / calls_per_graph


def kernels_per_call(fn, device: torch.device, calls: int = 5) -> float:
    """Device kernels per call (CUDA), or top-level operators per call (CPU), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        n = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower())
    else:
        n = sum(1 for e in events if e.cpu_parent is None and not e.name.startswith("ProfilerStep"))
    return n / calls


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device copy bandwidth in GB/s, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = median_time_us(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * nbytes / (us * 1e-6) / 1e9
