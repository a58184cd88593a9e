"""Host time of one compiled UNet call, patched minus unpatched (issue: GPU truth, item 7).

On a GPU a compiled step that syncs shows its host time when the host is the bottleneck: the H200
run's compiled SD1.5 per-step medians were +1.1% (default) / +1.8% (reduce-overhead) patched, with
identical kernel counts. This isolates the host part on the CPU: a UNet-shaped module so small that
its compute is small, compiled with Inductor (the blend fuses into the mid-block's last kernel, as
on a GPU), called in interleaved rounds. Each variant is its own class, so each has its own
compiled code: with one class, Dynamo would look both variants up in one cache (and before the
marker classes of ``patch``, a model patched after compiling ran the unpatched graph, which made
such a comparison look cheap). Rows go to ``results/cpu-compiled-host-cost.csv``.

    python benchmarks/compiled_host_cost.py [--rounds 15] [--calls 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch
from common import RESULTS, append_rows, environment
from torch import nn

import bypass_kernels


class Mid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, hidden_states, temb=None):
        return self.conv(hidden_states)


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 1)
        self.mid_block = Mid()
        self.conv_out = nn.Conv2d(4, 4, 1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        return (self.conv_out(self.mid_block(self.conv_in(sample))),)


def own_class(name: str) -> type:
    """A TinyUNet subclass whose forward has its own code object, hence its own Dynamo cache."""
    code = TinyUNet.forward.__code__.replace(co_name=f"forward_{name}")
    forward = types.FunctionType(code, TinyUNet.forward.__globals__, f"forward_{name}", TinyUNet.forward.__defaults__)
    return type(f"TinyUNet_{name}", (TinyUNet,), {"forward": forward})


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 2, 2)
    t = torch.tensor(700.0)
    variants = {}
    for name in ("unpatched", "patched"):
        unet = own_class(name)().eval()
        if name == "patched":
            bypass_kernels.patch(unet)
        compiled = torch.compile(unet, fullgraph=True)
        eager = unet

        def compiled_call(m=compiled):
            with torch.no_grad():
                m(x, t)

        def eager_call(m=eager):
            with torch.no_grad():
                m(x, t)

        compiled_call()
        eager_call()
        variants[f"compiled-{name}"] = compiled_call
        variants[f"eager-{name}"] = eager_call
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every variant alike
        for name, fn in variants.items():
            samples[name].append(per_call_us(fn, args.calls))
    env = environment(torch.device("cpu"))
    rows = []
    for mode in ("compiled", "eager"):
        base = samples[f"{mode}-unpatched"]
        patched = samples[f"{mode}-patched"]
        diffs = sorted(p - b for p, b in zip(patched, base, strict=True))
        q1, q3 = diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4]
        row = {
            "mode": mode,
            "unpatched_us": round(statistics.median(base), 2),
            "patched_us": round(statistics.median(patched), 2),
            "extra_us_median": round(statistics.median(diffs), 2),
            "extra_us_q1": round(q1, 2),
            "extra_us_q3": round(q3, 2),
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            **env,
        }
        rows.append(row)
        print(
            f"{mode:9s} unpatched {row['unpatched_us']:8.1f} µs  patched {row['patched_us']:8.1f} µs  "
            f"extra {row['extra_us_median']:6.1f} µs [IQR {row['extra_us_q1']}, {row['extra_us_q3']}]"
        )
    append_rows(os.path.join(RESULTS, "cpu-compiled-host-cost.csv"), rows)


if __name__ == "__main__":
    main()
