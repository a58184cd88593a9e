"""Run under torchrun with 2 processes (gloo, CPU): tiny Flux and Wan transformers under diffusers' context
parallelism (Ulysses, degree 2), patched before and after enable_parallelism, at spans that start where
each family's parallel plan splits the sequence and inside it, with one schedule for the batch or one per
image (per_sample). Rank 0 prints one JSON line per case:
the largest difference from the same model patched in one process, and from the unpatched model."""

import json
import sys

import torch
import torch.distributed as dist

torch.accelerator.device_count = lambda: 1  # diffusers divides by the device count; the CPU has none

import tiny_transformers as tt  # noqa: E402
from diffusers import ContextParallelConfig  # noqa: E402

import bypass_kernels  # noqa: E402
from bypass_kernels import BypassSchedule  # noqa: E402

SCHEDULE = BypassSchedule.constant(0.5)
PER_SAMPLE = [BypassSchedule.constant(0.5), BypassSchedule.linear(0.9, t_min=300)]  # one per image of the batch
CASES = [
    (name, span, order, False)
    for name, spans in (("flux", [(0, 0), (0, 1), (1, 2)]), ("wan", [(0, 0), (1, 2)]))
    for span in spans
    for order in ("patch first", "parallelism first")
] + [("flux", (0, 1), "patch first", True), ("wan", (0, 0), "parallelism first", True)]


def inputs(name):
    kwargs = tt.inputs(name, [0.7, 0.4] if name == "flux" else [700.0, 400.0])
    if name == "flux":  # the text sequence is split over the ranks too: an even length
        kwargs["encoder_hidden_states"] = torch.cat([kwargs["encoder_hidden_states"]] * 2, 1)[:, :6]
        kwargs["txt_ids"] = torch.zeros(6, 3)
    return kwargs


def run(model, kwargs, per_sample: bool):
    if not per_sample:
        return tt.run(model, kwargs)
    with bypass_kernels.per_sample(model, PER_SAMPLE):
        return tt.run(model, kwargs)


def main():
    dist.init_process_group("gloo")
    for name, span, order, per_sample in CASES:
        model, kwargs = tt.build(name), inputs(name)
        if order == "patch first":
            bypass_kernels.patch(model, SCHEDULE, span=span)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        if order == "parallelism first":
            bypass_kernels.patch(model, SCHEDULE, span=span)
        out = run(model, kwargs, per_sample)
        if dist.get_rank() == 0:
            single, plain = tt.build(name), tt.build(name)
            bypass_kernels.patch(single, SCHEDULE, span=span)
            row = dict(name=name, span=list(span), order=order, per_sample=per_sample)
            row["vs_single"] = float((out - run(single, kwargs, per_sample)).abs().max())
            row["vs_unpatched"] = float((out - tt.run(plain, kwargs)).abs().max())
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
