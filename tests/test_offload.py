"""Patched pipelines under diffusers' offloading: enable_model_cpu_offload, enable_sequential_cpu_offload
and enable_group_offload (block and leaf level, with and without CUDA streams), patched before or after offload is
enabled. Each gives the images of the non-offloaded patched pipeline, over several calls, and a set_schedule
between calls takes effect.

On the CPU the offload mechanisms run with the CPU as their execution/onload device: the hooks, the weight
movement to and from ``meta`` (sequential offload) and the per-call re-installation (model offload) are
exercised, but a table left on the wrong device cannot show (every device is the CPU) — except with sequential
offload, whose offloaded weights live on ``meta``. The GPU tests (marked ``gpu``) are the real check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HAS_CUDA, gpu

import bypass_kernels
from bypass_kernels import BypassSchedule

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="diffusers' offloading needs accelerate")

import tiny_pipelines  # noqa: E402

FIRST = BypassSchedule.linear(0.8, t_min=300)
SECOND = BypassSchedule.constant(0.9)
ORDERS = ["patch_first", "offload_first"]
GPU = [gpu]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer")


def expected_images(folder, device):
    """The non-offloaded patched pipeline on ``device``: images with FIRST, then with SECOND, and unpatched."""
    pipe = tiny_pipelines.sd_pipeline(folder).to(device)
    bypass_kernels.patch(pipe, FIRST)
    first = tiny_pipelines.run_pipeline(pipe)
    bypass_kernels.set_schedule(pipe, SECOND)
    second = tiny_pipelines.run_pipeline(pipe)
    bypass_kernels.unpatch(pipe)
    plain = tiny_pipelines.run_pipeline(pipe)
    assert np.abs(first - plain).max() > 1e-2 and np.abs(second - first).max() > 1e-2  # the checks can fail
    return first, second


@pytest.fixture(scope="module")
def expected_cpu(folder):
    return expected_images(folder, "cpu")


@pytest.fixture(scope="module")
def expected_cuda(folder):
    return expected_images(folder, "cuda") if HAS_CUDA else None


def enable(pipe, how: str, device: str):
    if how == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif how == "sequential" and device == "cpu":
        # pipe.enable_sequential_cpu_offload(device="cpu") executes on torch.device("cpu:0"), and accelerate 1.15
        # cannot move a weight from "cpu:0" back to meta (set_module_tensor_to_device raises TypeError, patched
        # or not). So do what it does (diffusers 0.42 pipeline_utils.py:1349-1359) with the device "cpu".
        from accelerate import cpu_offload

        for model in pipe.components.values():
            if isinstance(model, torch.nn.Module):
                cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    elif how == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        level, _, stream = how.partition("+")
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type=level,
            num_blocks_per_group=1 if level == "block_level" else None,
            use_stream=stream == "stream",
        )


def check_offloaded(folder, how, order, device, expected):
    first, second = expected
    pipe = tiny_pipelines.sd_pipeline(folder)
    if order == "patch_first":
        bypass_kernels.patch(pipe, FIRST)
        enable(pipe, how, device)
    else:
        enable(pipe, how, device)
        bypass_kernels.patch(pipe, FIRST)
    got = [tiny_pipelines.run_pipeline(pipe), tiny_pipelines.run_pipeline(pipe)]  # hooks re-applied after a call
    bypass_kernels.set_schedule(pipe, SECOND)
    got += [tiny_pipelines.run_pipeline(pipe), tiny_pipelines.run_pipeline(pipe)]
    atol = 1e-5 if device == "cpu" else 1e-3
    for images, want in zip(got, [first, first, second, second], strict=True):
        np.testing.assert_allclose(images, want, atol=atol)


# ------------------------------------------------------------------------------------------- on the CPU
CPU_MECHANISMS = ["model", "sequential", "block_level", "leaf_level"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("how", CPU_MECHANISMS)
def test_offload_on_cpu(folder, expected_cpu, how, order):
    check_offloaded(folder, how, order, "cpu", expected_cpu)


def _group_tensors(unet):
    """{id(tensor): group} for every tensor a diffusers group-offloading hook moves."""
    owner = {}
    for module in unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is None:
            continue
        group = hook.group
        tensors = [*group.parameters, *group.buffers]
        for member in group.modules:
            tensors += [*member.parameters(), *member.buffers()]
        for tensor in tensors:
            owner[id(tensor)] = group
    return owner


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("level", ["block_level", "leaf_level"])
def test_group_offload_never_manages_the_table(folder, level, order):
    """What the CPU cannot show by the images: a table that a group-offloading group managed could be left on
    the offload device (leaf level: its group's onload module is never called) or overwritten by a stale pinned
    copy (streams). patch() adds no tensor to the UNet, so no group holds it; the blend reads a copy on the
    device of the mid-block's output."""
    pipe = tiny_pipelines.sd_pipeline(folder)
    unet = pipe.unet
    before = {id(t) for t in [*unet.parameters(), *unet.buffers()]}
    if order == "patch_first":
        bypass_kernels.patch(pipe, FIRST)
        enable(pipe, level, "cpu")
    else:
        enable(pipe, level, "cpu")
        bypass_kernels.patch(pipe, FIRST)
    assert [t for t in [*unet.parameters(), *unet.buffers()] if id(t) not in before] == []
    controller = unet._bypass
    owners = _group_tensors(unet)
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: seen.append(out.device))
    try:
        tiny_pipelines.run_pipeline(pipe, steps=2)
    finally:
        handle.remove()
    assert seen and all(id(table) not in owners for table in controller._tables.values())
    assert all(controller.table_on(device).device == device for device in seen)
    assert all(table.device == device for device, table in controller._tables.items())


def test_patch_after_sequential_offload_does_not_put_the_table_on_meta(folder):
    """enable_sequential_cpu_offload leaves the weights on ``meta``; a table placed by the first parameter's
    device would land there too, and the blend could not read it."""
    pipe = tiny_pipelines.sd_pipeline(folder)
    enable(pipe, "sequential", "cpu")
    bypass_kernels.patch(pipe, FIRST)
    assert all(t.device.type != "meta" for t in pipe.unet._bypass._tables.values())


# ------------------------------------------------------------------------------------------- on a GPU
GPU_MECHANISMS = [
    "model",
    "sequential",
    "block_level",
    "leaf_level",
    "block_level+stream",
    "leaf_level+stream",
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("how", GPU_MECHANISMS)
@pytest.mark.gpu
@gpu
def test_offload_on_gpu(folder, expected_cuda, how, order):
    check_offloaded(folder, how, order, "cuda", expected_cuda)


@pytest.mark.parametrize("level", ["block_level+stream", "leaf_level+stream"])
@pytest.mark.gpu
@gpu
def test_set_schedule_inside_a_streamed_call_is_not_undone(folder, expected_cuda, level):
    """A set_schedule made while the table's group is onloaded (here: from a step-end callback, i.e.
    between two UNet calls of one pipeline call) holds for the rest of the call and the next call: the
    pinned CPU copy that streamed group offload keeps must not overwrite it."""
    second = expected_cuda[1]
    pipe = tiny_pipelines.sd_pipeline(folder)
    bypass_kernels.patch(pipe, FIRST)
    enable(pipe, level, "cuda")

    def switch(pipeline, step, timestep, kwargs):
        if step == 0:
            bypass_kernels.set_schedule(pipeline, SECOND)
        return {}

    tiny_pipelines.run_pipeline(pipe, callback_on_step_end=switch)
    np.testing.assert_allclose(tiny_pipelines.run_pipeline(pipe), second, atol=1e-3)


# ------------------------------------------------------------------------------------------- a transformer
def flux_images(pipe, steps: int = 3):
    with torch.no_grad():
        return pipe(
            "a red square",
            height=32,
            width=32,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **tiny_pipelines.DIT_CALL["flux"],
        ).images


@pytest.fixture(scope="module")
def flux_expected(tmp_path_factory):
    pipe = tiny_pipelines.flux_pipeline(tmp_path_factory.mktemp("flux-ref"))
    bypass_kernels.patch(pipe, FIRST, span=(1, 2))  # the last dual block into the first single block
    first = flux_images(pipe)
    bypass_kernels.set_schedule(pipe, SECOND)
    second = flux_images(pipe)
    bypass_kernels.unpatch(pipe)
    plain = flux_images(pipe)
    assert np.abs(first - plain).max() > 1e-3 and np.abs(second - first).max() > 1e-3
    return first, second


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("how", CPU_MECHANISMS)
def test_flux_span_under_offload_on_cpu(tmp_path, flux_expected, how, order):
    pipe = tiny_pipelines.flux_pipeline(tmp_path)
    if order == "patch_first":
        bypass_kernels.patch(pipe, FIRST, span=(1, 2))
        enable(pipe, how, "cpu")
    else:
        enable(pipe, how, "cpu")
        bypass_kernels.patch(pipe, FIRST, span=(1, 2))
    got = [flux_images(pipe), flux_images(pipe)]
    bypass_kernels.set_schedule(pipe, SECOND)
    got.append(flux_images(pipe))
    for images, want in zip(got, [flux_expected[0], flux_expected[0], flux_expected[1]], strict=True):
        np.testing.assert_allclose(images, want, atol=1e-5)
