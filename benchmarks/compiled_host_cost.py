"""Host time of one model call, patched against unpatched and against the floor (CPU, Inductor).

On a GPU a compiled step shows its host time when the host is the bottleneck. This isolates the
host part on the CPU, where a model small enough that its compute is small is called over and over:

- *unpatched*: the model as it is;
- *patched*: ``bypass_kernels.patch(model)``;
- *floor*: the same model with the blend written by hand into its forward (the timestep from the
  forward's own argument, the same torch ops the patch traces), so no patch can cost less.

Models: ``toy`` (conv in, a timestep projection, a one-conv mid-block, conv out) and ``tiny-sd``
(a diffusers UNet2DConditionModel). Modes: ``compiled`` (``torch.compile(model)``, Inductor) and
``eager``. Each variant is its own class, so each has its own compiled code. Time per call is the
calling thread's CPU time (``time.thread_time``: other processes on a shared machine add little),
over interleaved rounds; the differences are paired per round, with an order-statistic interval
(``intervals.median_ci``). Rows go to ``results/cpu-compiled-host-cost.csv``.

    python benchmarks/compiled_host_cost.py [--models toy tiny-sd] [--rounds 15] [--calls 300]

Timing on a shared machine moves with everything else running there. ``--instructions`` counts
instead: each variant runs compiled in its own process under valgrind's callgrind, with
instrumentation switched on only around N calls (after compiling and warming up), twice (N1 and
N2 calls); (I2 − I1) / (N2 − N1) is the instructions one call costs, the same however loaded the
machine is. Rows go to ``results/cpu-compiled-host-instructions.csv``.

    python benchmarks/compiled_host_cost.py --instructions [--models toy] [--calls 100 600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types

import torch
from common import RESULTS, append_rows, environment
from intervals import median_ci
from torch import nn

import bypass_kernels
from bypass_kernels.ops import blend_reference
from bypass_kernels.presets import build_unet, example_inputs

SCHEDULE = bypass_kernels.default_schedule()


class Timesteps(nn.Module):
    def forward(self, timesteps):
        return timesteps[:, None].float() * 1e-3


class Mid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, hidden_states, temb=None):
        return self.conv(hidden_states)


class Toy(nn.Module):
    """UNet-shaped and as small as it gets: what is left is the host's time per call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time_proj = Timesteps()
        self.conv_in = nn.Conv2d(4, 4, 1)
        self.mid_block = Mid()
        self.conv_out = nn.Conv2d(4, 4, 1)

    def forward(self, sample, timestep):
        temb = self.time_proj(timestep.expand(sample.shape[0]))
        return (self.conv_out(self.mid_block(self.conv_in(sample), temb)),)


class ToyFloor(Toy):
    """The blend inlined by hand: the least any patch can add."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", SCHEDULE.table(), persistent=False)

    def forward(self, sample, timestep):
        t = timestep.expand(sample.shape[0])
        temb = self.time_proj(t)
        h = self.conv_in(sample)
        m = blend_reference(self.mid_block(h, temb), h, self.table, t)
        return (self.conv_out(m),)


def unet_floor(unet: nn.Module) -> nn.Module:
    """The diffusers UNet with the blend written into a copy of its mid-block's forward."""
    table = SCHEDULE.table()
    mid = unet.mid_block
    plain_forward = type(mid).forward
    keep = {}

    def time_proj_forward(self, timesteps):  # the floor takes the [batch] timesteps where diffusers passes them
        keep["t"] = timesteps
        return type(self).forward(self, timesteps)

    def mid_forward(self, hidden_states, *args, **kwargs):
        return blend_reference(plain_forward(self, hidden_states, *args, **kwargs), hidden_states, table, keep["t"])

    unet.mid_block.forward = types.MethodType(mid_forward, mid)
    unet.time_proj.forward = types.MethodType(time_proj_forward, unet.time_proj)
    return unet


def own_class(model: nn.Module, name: str) -> nn.Module:
    """``model`` as an instance of a subclass whose forward has its own code object (its own Dynamo cache)."""
    base = type(model)
    forward = base.forward
    code = forward.__code__.replace(co_name=f"forward_{name}")
    fn = types.FunctionType(code, forward.__globals__, f"forward_{name}", forward.__defaults__, forward.__closure__)
    fn.__kwdefaults__ = forward.__kwdefaults__
    model.__class__ = type(f"{base.__name__}_{name}", (base,), {"forward": fn, "__module__": base.__module__})
    return model


def build(model_name: str, variant: str) -> tuple[nn.Module, dict]:
    if model_name == "toy":
        model = (ToyFloor if variant == "floor" else Toy)().eval()
        inputs = {"sample": torch.randn(2, 4, 2, 2), "timestep": torch.tensor(700.0)}
    else:
        model = build_unet(model_name).eval()
        inputs = example_inputs(model, batch=2, timestep=torch.tensor(700.0))
        if variant == "floor":
            model = unet_floor(model)
    model = own_class(model, variant)
    if variant == "patched":
        bypass_kernels.patch(model, SCHEDULE, timestep_module="time_proj")
    return model, inputs


def per_call_us(fn, calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


def _child(model_name: str, variant: str, calls: int, flag: str) -> None:
    """Inside valgrind: compile and warm up, then make ``calls`` calls between the parent's signals."""
    torch.set_num_threads(1)
    model, inputs = build(model_name, variant)
    compiled = torch.compile(model)
    with torch.no_grad():
        for _ in range(5):
            compiled(**inputs)
        _signal(flag + ".ready", flag + ".go")
        for _ in range(calls):
            compiled(**inputs)
        _signal(flag + ".done", flag + ".stop")


def _signal(mine: str, theirs: str) -> None:
    open(mine, "w").close()
    while not os.path.exists(theirs):
        time.sleep(0.05)


def instructions(model_name: str, variant: str, calls: int, workdir: str) -> int:
    """Instructions callgrind counted over ``calls`` compiled calls of one variant (its own process)."""
    import shutil
    import tempfile

    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("--instructions needs valgrind (e.g. apt-get install valgrind)")
    flag = tempfile.mktemp(prefix=f"{variant}-{calls}-", dir=workdir)
    out = flag + ".callgrind"
    child = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            model_name,
            variant,
            str(calls),
            flag,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for mine, theirs, switch in ((".ready", ".go", "on"), (".done", ".stop", "off")):
            while not os.path.exists(flag + mine):
                if child.poll() is not None:
                    raise RuntimeError(f"{model_name}/{variant}: the process under valgrind ended early")
                time.sleep(0.5)
            subprocess.run(["callgrind_control", "-i", switch, str(child.pid)], capture_output=True, check=True)
            open(flag + theirs, "w").close()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    # "totals:" is what was counted while instrumentation was on; "summary:" can read 0 when
    # instrumentation starts off (--instr-atstart=no), so it is not used
    totals = []
    with open(out, encoding="utf-8") as f:
        for line in f:
            if line.startswith("totals:"):
                totals.append(int(line.split()[1]))
    if not totals:
        raise RuntimeError(f"no totals in {out}")
    return sum(totals)


def instruction_rows(models, calls: tuple[int, int], env: dict) -> list[dict]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in models:
            per_call = {}
            for variant in ("unpatched", "patched", "floor"):
                low, high = (instructions(model_name, variant, n, workdir) for n in calls)
                per_call[variant] = (high - low) / (calls[1] - calls[0])
                print(
                    f"{model_name:8s} {variant:10s} {per_call[variant]:12.0f} instructions per compiled call",
                    flush=True,
                )
            row = {"model": model_name, "mode": "compiled"}
            row.update({f"{v}_instructions": round(n) for v, n in per_call.items()})
            row["patched_minus_unpatched"] = round(per_call["patched"] - per_call["unpatched"])
            row["floor_minus_unpatched"] = round(per_call["floor"] - per_call["unpatched"])
            row["patched_minus_floor"] = round(per_call["patched"] - per_call["floor"])
            row.update(calls_low=calls[0], calls_high=calls[1], **env)
            rows.append(row)
    return rows


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "tiny-sd"])
    parser.add_argument("--modes", nargs="+", default=["compiled", "eager"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind instead")
    parser.add_argument("--counts", type=int, nargs=2, default=(100, 600), help="N1 N2 calls (--instructions)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_name, variant, calls, flag = args.child
        return _child(model_name, variant, int(calls), flag)
    torch.set_num_threads(args.threads)
    env = {**environment(torch.device("cpu")), "commit": git_commit()}
    if args.instructions:
        rows = instruction_rows(args.models, tuple(args.counts), env)
        if not args.no_write:
            append_rows(os.path.join(RESULTS, "cpu-compiled-host-instructions.csv"), rows)
        return None
    rows = []
    for model_name in args.models:
        for mode in args.modes:
            calls = {}
            for variant in ("unpatched", "patched", "floor"):
                model, inputs = build(model_name, variant)
                runnable = torch.compile(model) if mode == "compiled" else model

                def call(m=runnable, inputs=inputs):
                    with torch.no_grad():
                        m(**inputs)

                for _ in range(3):
                    call()  # compile, warm up
                calls[variant] = call
            samples = {v: [] for v in calls}
            for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every variant alike
                for variant, fn in calls.items():
                    samples[variant].append(per_call_us(fn, args.calls))
            row = {"model": model_name, "mode": mode}
            for variant, values in samples.items():
                row[f"{variant}_us"] = round(median_ci(values)[0], 2)
            for name, a, b in (
                ("patched_minus_unpatched", "patched", "unpatched"),
                ("floor_minus_unpatched", "floor", "unpatched"),
                ("patched_minus_floor", "patched", "floor"),
            ):
                med, lo, hi = median_ci([x - y for x, y in zip(samples[a], samples[b], strict=True)])
                row.update({f"{name}_us": round(med, 2), f"{name}_lo": round(lo, 2), f"{name}_hi": round(hi, 2)})
            row.update(rounds=args.rounds, calls_per_round=args.calls, **env)
            rows.append(row)
            print(
                f"{model_name:8s} {mode:8s} unpatched {row['unpatched_us']:8.1f}  patched {row['patched_us']:8.1f}  "
                f"floor {row['floor_us']:8.1f} µs | patched-unpatched {row['patched_minus_unpatched_us']:+6.1f} "
                f"[{row['patched_minus_unpatched_lo']:+.1f}, {row['patched_minus_unpatched_hi']:+.1f}]  "
                f"patched-floor {row['patched_minus_floor_us']:+6.1f} "
                f"[{row['patched_minus_floor_lo']:+.1f}, {row['patched_minus_floor_hi']:+.1f}]",
                flush=True,
            )
    if not args.no_write:
        append_rows(os.path.join(RESULTS, "cpu-compiled-host-cost.csv"), rows)


if __name__ == "__main__":
    main()
