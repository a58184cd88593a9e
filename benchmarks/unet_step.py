"""Model-step and denoising-loop benchmark: what the bypass costs inside a real UNet or transformer call.

Variants: unpatched, patched (per backend), a naive hook that reads λ with .item() each call, and
diffusers' FreeU (a peer training-free method). Modes: eager, compile, compile reduce-overhead,
and a manually captured CUDA graph. One row per variant and mode:

- status: ``ok``, or why the variant has no figures in this mode (``skipped: ...`` when it cannot
  run there, e.g. a step that syncs with the host cannot be captured in a CUDA graph; ``error:
  ...`` when it failed); the other variants go on.
- median_ms [ms_lo, ms_hi]: median step time over interleaved rounds (each round times every
  variant once), with an order-statistic interval of that median (benchmarks/intervals.py).
- overhead_pct [overhead_lo_pct, overhead_hi_pct]: against the unpatched model timed in the same
  round, per round, then the median and its interval; ``overhead`` says "within noise" when the
  interval includes 0.
- kernels_per_step (profiler), host_syncs (CUDA, eager: synchronizing CUDA calls in one step,
  counted with torch.cuda.set_sync_debug_mode), peak_mib (memory a step allocates above what was
  allocated before it, measured for every variant after all were prepared and warmed up, so each
  starts from the same allocator state; under graph replay it is the graph's private pool, taken at
  capture, that holds the step's memory), and a single timed DDIM loop (no sync per step).

Transformers (benchmarks/dit_presets.py: real widths, fewer blocks) are patched over blocks 1..2 and
have the unpatched and patched variants.

On a GPU: python benchmarks/unet_step.py --models sd15 sdxl flux-reduced sd35-reduced
On a CPU (a smoke run of the same code on tiny models): python benchmarks/unet_step.py --models tiny-sd tiny-flux
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import dit_presets
import torch
from common import append_rows, csv_path, environment, interleaved_samples_us, kernels_per_call
from intervals import median_ci, overhead_text, paired_overhead_pct

import bypass_kernels
from bypass_kernels import BypassSchedule, backends
from bypass_kernels.presets import build_unet, example_inputs

SCHEDULE = BypassSchedule.linear(0.3, t_min=0)  # non-zero at every step: the blend always runs
FREEU = {"sd15": dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6), "sdxl": dict(s1=0.6, s2=0.4, b1=1.1, b2=1.2)}


def naive_item_hook(unet, schedule):
    """What a hand-written hook usually does: λ as a Python float via .item() (a host sync)."""
    table = schedule.table(next(unet.parameters()).device)
    state = {}

    def keep(module, args, kwargs):
        state["t"] = kwargs["timestep"] if "timestep" in kwargs else args[1]

    def mix(module, args, out):
        t = torch.as_tensor(state["t"]).reshape(-1)[0]
        lam = table[t.float().round().clamp(0, table.numel() - 1).long()].item()
        return out.lerp_(args[0], lam)

    unet.register_forward_pre_hook(keep, with_kwargs=True)
    unet.mid_block.register_forward_hook(mix)
    return unet


def variants(base, model_name, device):
    out = {"unpatched": lambda: base}
    names = ["auto"] + [n for n in ("triton", "cuda", "cpu", "torch") if _available(n, device)]
    where = {"span": dit_presets.SPAN} if model_name in dit_presets.PRESETS else {}
    for name in names:
        out[f"patched_{name}"] = lambda name=name: bypass_kernels.patch(
            copy.deepcopy(base), SCHEDULE, backend=name, **where
        )
    if model_name in dit_presets.PRESETS:
        return out
    out["naive_item_hook"] = lambda: naive_item_hook(copy.deepcopy(base), SCHEDULE)
    if model_name in FREEU:

        def freeu():
            model = copy.deepcopy(base)
            model.enable_freeu(**FREEU[model_name])
            return model

        out["freeu"] = freeu
    return out


def _available(name, device):
    try:
        backends.require(name, device.type)
        return not (name == "triton" and backends._triton_interpret())
    except bypass_kernels.BackendUnavailableError:
        return False


def step_fn(model, inputs, mode, device):
    """A zero-argument callable running one UNet step in ``mode`` (compiled/captured on first use)."""
    if mode == "eager":
        return lambda: model(**inputs, return_dict=False)[0]
    if mode in ("compile", "reduce-overhead"):
        compiled = torch.compile(model, fullgraph=True, mode=None if mode == "compile" else "reduce-overhead")

        return lambda: compiled(**inputs, return_dict=False)[0]
    # manual CUDA graph: capture once, refill the timestep buffer in place before each replay
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(**inputs, return_dict=False)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**inputs, return_dict=False)
    return graph.replay


def ddim_loop_seconds(run, timestep, steps, device, units: float = 1.0):
    """Seconds for a ``steps``-step DDIM loop of ``run``, refilling one timestep buffer in place
    (the pattern that lets a compiled or captured step serve every timestep); ``units``: pipeline
    units per training timestep (Flux: 1/1000)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        timestep.fill_(float(t) * units)  # no recompile, no re-capture
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def host_syncs(step, device) -> int | None:
    """Synchronizing CUDA calls made by one call of ``step`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def why_not(model, inputs, mode, device) -> str | None:
    """Why ``model`` cannot run in ``mode`` here (checked before trying), or None."""
    if mode == "cuda_graph":
        if device.type != "cuda":
            return "skipped: CUDA graphs need a CUDA device"
        with torch.inference_mode():
            model(**inputs, return_dict=False)  # first call unmonitored: lazy set-up (kernel loading) is not a step
            syncs = host_syncs(lambda: model(**inputs, return_dict=False), device)
        if syncs:
            return f"skipped: its eager step syncs with the host ({syncs} synchronizing calls); capture forbids that"
    return None


def prepare(model, inputs, mode, device):
    """The step callable of ``model`` in ``mode``, compiled or captured and warmed up."""
    run = step_fn(model, inputs, mode, device)
    for _ in range(3):
        run()
    return run


def step_peak_mib(run, device) -> float | None:
    """MiB one call of ``run`` allocates above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: {type(exc).__name__}: {first}".rstrip(": ")


def _try(fn, status: dict, name: str):
    """``fn()``, or None with ``status[name]`` set to the error (when it was still ``ok``)."""
    try:
        return fn()
    except Exception as exc:
        if status.get(name, "ok") == "ok":
            status[name] = _error(exc)
        return None


def measure_mode(
    models, inputs, mode, device, *, rounds=7, reps=10, loop_steps=20, errors=None, units: float = 1.0
) -> dict:
    """Every variant of ``models`` in ``mode``: ``{"status", "samples" (µs per round), "kernels",
    "syncs", "peak", "loop"}``, each a dict by variant. A variant that cannot run or fails gets its
    reason in ``status`` (``errors``: reasons found before, e.g. when the variant was built) and the
    others go on."""
    status = {v: (errors or {}).get(v) or "ok" for v in models}
    runs = {}
    with torch.inference_mode():
        for v, model in models.items():
            if status[v] == "ok":
                status[v] = _try(lambda model=model: why_not(model, inputs, mode, device), status, v) or status[v]
            if status[v] == "ok":
                runs[v] = _try(lambda model=model: prepare(model, inputs, mode, device), status, v)
        runs = {v: run for v, run in runs.items() if status[v] == "ok"}
        failed = {}
        samples = interleaved_samples_us(
            runs, device, rounds=rounds, errors=failed, warmup=2, reps=reps, max_seconds=10
        )
        for v, exc in failed.items():
            status[v] = _error(exc)
        ok = [v for v in runs if status[v] == "ok"]
        # Same allocator state for every variant: all prepared and warmed up before any is measured.
        peak = {v: _try(lambda v=v: step_peak_mib(runs[v], device), status, v) for v in ok}
        syncs = {v: _try(lambda v=v: host_syncs(runs[v], device), status, v) for v in ok if mode == "eager"}
        kernels = {v: _try(lambda v=v: kernels_per_call(runs[v], device, calls=3), status, v) for v in ok}
        loop = {
            v: _try(lambda v=v: ddim_loop_seconds(runs[v], inputs["timestep"], loop_steps, device, units), status, v)
            for v in ok
        }
    return {"status": status, "samples": samples, "kernels": kernels, "syncs": syncs, "peak": peak, "loop": loop}


def _r(x, digits):
    return "" if x is None else round(x, digits)


def rows_for(result: dict, *, model: str, mode: str, common: dict) -> list[dict]:
    """CSV rows from :func:`measure_mode`'s result; overheads against ``unpatched`` in the same rounds."""
    status, samples = result["status"], result["samples"]
    ref = samples.get("unpatched") if status.get("unpatched") == "ok" else None
    ref_loop = result["loop"].get("unpatched")
    rows = []
    for v in status:
        ok = status[v] == "ok" and bool(samples.get(v))
        ms = lo = hi = pct = pct_lo = pct_hi = None
        overhead = ""
        if ok:
            ms, lo, hi = (x / 1e3 for x in median_ci(samples[v]))
            if v == "unpatched":
                pct, overhead = 0.0, "reference"
            elif ref is not None and len(ref) == len(samples[v]):
                pct, pct_lo, pct_hi = paired_overhead_pct(samples[v], ref)
                overhead = overhead_text(pct, pct_lo, pct_hi)
            else:
                overhead = "no unpatched reference"
        loop = result["loop"].get(v)
        rows.append(
            {
                "model": model,
                "variant": v,
                "mode": mode,
                "status": status[v] if status[v] != "ok" or ok else "error: no timings",
                **{k: common[k] for k in ("batch", "dtype", "latent")},
                "rounds": len(samples.get(v) or []),
                "median_ms": _r(ms, 4),
                "ms_lo": _r(lo, 4),
                "ms_hi": _r(hi, 4),
                "overhead_pct": _r(pct, 3),
                "overhead_lo_pct": _r(pct_lo, 3),
                "overhead_hi_pct": _r(pct_hi, 3),
                "overhead": overhead,
                "kernels_per_step": _r(result["kernels"].get(v), 1),
                "host_syncs": _r(result["syncs"].get(v), 0),
                "peak_mib": _r(result["peak"].get(v), 2),
                "loop_steps": common["loop_steps"],
                "loop_s": _r(loop, 4),
                "loop_overhead_pct": _r(100 * (loop / ref_loop - 1), 3) if loop and ref_loop else "",
                **{k: common[k] for k in ("device", "torch", "triton", "cuda", "date")},
            }
        )
    return rows


def warm(models, names, inputs, mode, device, model_name) -> None:
    for v in names:
        if models[v] is None:
            continue
        start = time.perf_counter()
        status = {}
        with torch.inference_mode():
            _try(lambda v=v: prepare(models[v], inputs, mode, device), status, v)
        print(f"{model_name:>8} {v:>16} {mode:>15}: {status.get(v, 'warmed')} in {time.perf_counter() - start:.1f} s")


def describe(row: dict) -> str:
    head = f"{row['model']:>8} {row['variant']:>16} {row['mode']:>15}: "
    if row["status"] != "ok":
        return head + row["status"]
    return head + (
        f"{row['median_ms']:9.3f} ms/step [{row['ms_lo']}, {row['ms_hi']}], overhead {row['overhead']}, "
        f"{row['kernels_per_step']} kernels, syncs {row['host_syncs']}, peak {row['peak_mib']} MiB, "
        f"{row['loop_steps']}-step loop {row['loop_s']} s"
    )


def build(model_name, device, dtype):
    """The preset with its seeded random weights, initialised on the GPU there (seconds instead of
    tens of seconds at SDXL size); on the CPU, or if that fails, built on the CPU and moved."""
    if model_name in dit_presets.PRESETS:
        return dit_presets.build(model_name, device, dtype)
    if device.type == "cuda":
        try:
            with torch.device(device):
                return build_unet(model_name, device=device, dtype=dtype)
        except Exception as exc:
            print(f"building {model_name} on {device} failed ({_error(exc)}); building on the CPU")
    return build_unet(model_name, device=device, dtype=dtype)


def make_variants(base, model_name, device, wanted):
    """``({variant: model}, {variant: why it could not be built})``."""
    models, errors = {}, {}
    for v, make in variants(base, model_name, device).items():
        if wanted and v not in wanted:
            continue
        try:
            models[v] = make()
        except Exception as exc:
            models[v], errors[v] = None, _error(exc)
    return models, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["sd15", "sdxl"])
    parser.add_argument("--modes", nargs="*", default=None, help="eager compile reduce-overhead cuda_graph")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of variant names")
    parser.add_argument(
        "--compile-variants",
        nargs="*",
        default=["unpatched", "patched_auto"],
        help="variants also run compiled (each compile costs about a minute at SD1.5 size)",
    )
    parser.add_argument("--loop-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds over the variants")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="only compile/capture and warm up each variant, no timing and no rows (fills Inductor's on-disk "
        "caches, so a later run in compile modes loads its graphs instead of compiling them)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    modes = args.modes or (
        ["eager", "compile", "reduce-overhead", "cuda_graph"] if device.type == "cuda" else ["eager", "compile"]
    )
    env = environment(device)
    path = args.out or csv_path(device, "unet_step")
    for model_name in args.models:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        if device.type == "cuda" and model_name in dit_presets.PRESETS:
            dtype = torch.bfloat16  # as Flux and SD3.5 are run
        base = build(model_name, device, dtype)
        wanted = args.variants
        if all(mode in ("compile", "reduce-overhead") for mode in modes):  # build only what will run
            wanted = [v for v in args.compile_variants if not args.variants or v in args.variants]
        models, build_errors = make_variants(base, model_name, device, wanted)
        units = 1.0
        if model_name in dit_presets.PRESETS:
            inputs = dit_presets.inputs(model_name, base, device, dtype)
            units = dit_presets.timestep_units(model_name)
            latent = "x".join(str(d) for d in inputs["hidden_states"].shape[1:])
        else:
            inputs = example_inputs(base, batch=2)
            inputs["timestep"] = torch.full((), 999.0, device=device)  # shared by every variant's step
            latent = f"{inputs['sample'].shape[-2]}x{inputs['sample'].shape[-1]}"
        common = {
            "batch": next(iter(inputs.values())).shape[0],
            "dtype": str(dtype)[6:],
            "latent": latent,
            "loop_steps": args.loop_steps,
            **env,
        }
        for mode in modes:
            names = [v for v in models if mode not in ("compile", "reduce-overhead") or v in args.compile_variants]
            torch._dynamo.reset()
            if args.warm_only:
                warm(models, names, inputs, mode, device, model_name)
                continue
            result = measure_mode(
                {v: models[v] for v in names},
                inputs,
                mode,
                device,
                rounds=args.rounds,
                reps=args.reps,
                loop_steps=args.loop_steps,
                errors=build_errors,
                units=units,
            )
            rows = rows_for(result, model=model_name, mode=mode, common=common)
            for row in rows:
                print(describe(row))
            append_rows(path, rows)  # per mode: a run cut short keeps what it measured
            del result
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del models, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.warm_only:
        print(f"rows in {path}")


if __name__ == "__main__":
    main()
