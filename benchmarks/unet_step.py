"""UNet-step and denoising-loop benchmark: what the bypass costs inside a real UNet call.

Variants: unpatched, patched (per backend), a naive hook that reads λ with .item() each call, and
diffusers' FreeU (a peer training-free method). Modes: eager, compile, compile reduce-overhead,
and a manually captured CUDA graph. Rows: median ms per step, overhead against the unpatched model
in the same mode, kernels per step, peak memory; and a full DDIM loop time.

On a GPU: python benchmarks/unet_step.py --models sd15 sdxl
On a CPU (a smoke run of the same code on a tiny model): python benchmarks/unet_step.py --models tiny-sd
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import append_rows, csv_path, environment, interleaved_median_us, kernels_per_call

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
    for name in names:
        out[f"patched_{name}"] = lambda name=name: bypass_kernels.patch(copy.deepcopy(base), SCHEDULE, backend=name)
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


def ddim_loop_seconds(run, timestep, steps, device):
    """Seconds for a ``steps``-step DDIM loop of ``run``, refilling one timestep buffer in place
    (the pattern that lets a compiled or captured step serve every timestep)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        timestep.fill_(t)  # no recompile, no re-capture
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def prepare(model, inputs, mode, device):
    """``(run, peak MiB)``: the step callable, compiled or captured and warmed up, and the memory it
    took above what was allocated before (weights excluded)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    run = step_fn(model, inputs, mode, device)
    for _ in range(3):
        run()
    if device.type != "cuda":
        return run, 0.0
    torch.cuda.synchronize(device)
    return run, (torch.cuda.max_memory_allocated(device) - before) / 2**20


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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over the variants")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    modes = args.modes or (
        ["eager", "compile", "reduce-overhead", "cuda_graph"] if device.type == "cuda" else ["eager", "compile"]
    )
    env = environment(device)
    path = args.out or csv_path(device, "unet_step")
    for model_name in args.models:
        base = build_unet(model_name, device=device, dtype=dtype)
        models = {v: make() for v, make in variants(base, model_name, device).items() if v in (args.variants or [v])}
        inputs = example_inputs(base, batch=2)
        inputs["timestep"] = torch.full((), 999.0, device=device)  # shared by every variant's step
        for mode in modes:
            names = [v for v in models if mode not in ("compile", "reduce-overhead") or v in args.compile_variants]
            if "unpatched" not in names:
                continue  # overheads are against the unpatched model in the same mode
            torch._dynamo.reset()
            with torch.inference_mode():
                prepared = {v: prepare(models[v], inputs, mode, device) for v in names}
                runs = {v: run for v, (run, _) in prepared.items()}
                # Interleaved rounds: clock and load drift fall on every variant alike.
                us = interleaved_median_us(runs, device, rounds=args.rounds, warmup=3, reps=20, max_seconds=10)
                kernels = {v: kernels_per_call(runs[v], device, calls=3) for v in names}
                loops = {v: ddim_loop_seconds(runs[v], inputs["timestep"], args.loop_steps, device) for v in names}
            rows = []
            for v in names:
                ms, ref_ms = us[v] / 1e3, us["unpatched"] / 1e3
                row = {
                    "model": model_name,
                    "variant": v,
                    "mode": mode,
                    "batch": 2,
                    "dtype": str(dtype)[6:],
                    "latent": f"{inputs['sample'].shape[-2]}x{inputs['sample'].shape[-1]}",
                    "median_ms": round(ms, 4),
                    "overhead_pct": round(100 * (ms / ref_ms - 1), 3),
                    "kernels_per_step": kernels[v],
                    "peak_mib": round(prepared[v][1], 2),
                    "loop_steps": args.loop_steps,
                    "loop_s": round(loops[v], 4),
                    "loop_overhead_pct": round(100 * (loops[v] / loops["unpatched"] - 1), 3),
                    **env,
                }
                rows.append(row)
                print(
                    f"{model_name:>8} {v:>16} {mode:>15}: {ms:9.3f} ms/step ({row['overhead_pct']:+.2f}%), "
                    f"{kernels[v]:g} kernels, peak {row['peak_mib']:.1f} MiB, "
                    f"{args.loop_steps}-step loop {loops[v]:.3f} s"
                )
            append_rows(path, rows)  # per mode: a run cut short keeps what it measured
            del prepared, runs
        del models, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"rows in {path}")


if __name__ == "__main__":
    main()
