"""torch.compile on patched UNets (Inductor on the CPU here; the GPU parts run in benchmarks/gpu_check.sh).

Compiles are slow on two cores, so each compiled model is built once and shared by several checks. The
tests of Inductor's code (its output, its kernel count) share one Inductor compile of a one-level SD UNet; the tests
of Dynamo's rules (graph breaks, recompiles) use the AOT-eager backend, which traces the same graph
(Dynamo, then AOTAutograd's functionalization of the in-place blend) without generating C++.
"""

import pytest
import torch
from conftest import example_inputs, gpu, hand_hook, run_unet
from tiny_models import graph_unet, one_level_sd
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor import metrics

import bypass_kernels
from bypass_kernels import BypassSchedule
from bypass_kernels.presets import build_unet

SCHEDULE = BypassSchedule.linear(0.8, t_min=300)


def compiled_run(model, calls, backend="inductor", **compile_kwargs):
    """Compile ``model`` fresh; return (outputs, frames compiled, Inductor kernels generated)."""
    torch._dynamo.reset()
    metrics.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, **compile_kwargs)
    outputs = [run_unet(compiled, inputs) for inputs in calls]
    return outputs, counter.frame_count, metrics.generated_kernel_count, compiled, counter


def loop_inputs(unet, timesteps, batch=2):
    base = example_inputs(unet, batch=batch)
    return [{**base, "timestep": t} for t in timesteps]


@pytest.fixture(scope="module")
def sd_compiled():
    """A one-level SD-style UNet compiled unpatched and patched with Inductor, over a loop of
    different timesteps (the smallest model with a cross-attention mid-block: a quicker compile)."""
    unet = one_level_sd()
    timesteps = [torch.tensor(t) for t in (999, 857, 714, 571, 428, 285, 142, 0)]
    calls = loop_inputs(unet, timesteps)
    _, _, plain_kernels, _, _ = compiled_run(unet, calls[:1])
    bypass_kernels.patch(unet, SCHEDULE)
    outputs, frames, kernels, compiled, counter = compiled_run(unet, calls)
    return dict(
        unet=unet,
        calls=calls,
        outputs=outputs,
        frames=frames,
        kernels=kernels,
        plain_kernels=plain_kernels,
        compiled=compiled,
        counter=counter,
    )


def test_fullgraph_one_compile_for_a_whole_loop(sd_compiled):
    assert sd_compiled["frames"] == 1  # fullgraph=True: no graph break; one frame: no recompile per timestep


def test_compiled_patched_equals_eager_reference(sd_compiled):
    unet = sd_compiled["unet"]
    bypass_kernels.unpatch(unet)
    try:
        for inputs, got in zip(sd_compiled["calls"], sd_compiled["outputs"], strict=True):
            handles = hand_hook(unet, SCHEDULE.weight)
            expected = run_unet(unet, inputs)
            for h in handles:
                h.remove()
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        bypass_kernels.patch(unet, SCHEDULE)


def test_blend_fuses_no_extra_kernels(sd_compiled):
    assert sd_compiled["kernels"] <= sd_compiled["plain_kernels"], (
        sd_compiled["kernels"],
        sd_compiled["plain_kernels"],
    )


def test_set_schedule_between_loops_does_not_recompile(sd_compiled):
    unet, compiled, counter = sd_compiled["unet"], sd_compiled["compiled"], sd_compiled["counter"]
    other = BypassSchedule.constant(1.0)
    bypass_kernels.set_schedule(unet, other)
    try:
        inputs = sd_compiled["calls"][0]
        got = run_unet(compiled, inputs)
        assert counter.frame_count == 1
        bypass_kernels.unpatch(unet)
        handles = hand_hook(unet, other.weight)  # λ = 1: the mid-block skipped
        try:
            expected = run_unet(unet, inputs)
        finally:
            for h in handles:
                h.remove()
            bypass_kernels.patch(unet, other)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        bypass_kernels.set_schedule(unet, SCHEDULE)


def test_per_sample_and_float_timesteps_compile_once_more_at_most(sd_compiled):
    """A [batch] timestep is a new input shape (one more graph); its values never recompile. (Dynamo's
    rule: AOT-eager, compiled first at a 0-d timestep like the shared Inductor model; per-sample λ in
    Inductor's code: test_ops_edges.py::test_nan_timesteps_compiled_read_index_zero.)"""
    unet = sd_compiled["unet"]
    base = sd_compiled["calls"][0]
    counter = CompileCounterWithBackend("aot_eager")  # a backend of its own: a cache entry of its own
    compiled = torch.compile(unet, backend=counter, fullgraph=True)
    run_unet(compiled, base)
    before = counter.frame_count
    assert before == 1
    for pair in ([999.0, 10.0], [500.5, 501.5], [0.0, 2000.0], [333.3, 777.7]):
        inputs = {**base, "timestep": torch.tensor(pair)}
        got = run_unet(compiled, inputs)
        bypass_kernels.unpatch(unet)
        handles = hand_hook(unet, SCHEDULE.weight)
        expected = run_unet(unet, inputs)
        for h in handles:
            h.remove()
        bypass_kernels.patch(unet, SCHEDULE)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert counter.frame_count <= before + 1


def test_vectorized_inductor_code_blends_as_eager(vectorized):
    """The suite compiles Inductor's scalar CPU code (conftest); its default vectorized code here, the
    blend fused into a convolution's output (rows of 11: a vector loop and a tail), with per-sample
    fractions, a tie, an out-of-range value, NaN (index 0), and one timestep for the batch."""
    from test_reliability import Toy

    toy = Toy()
    bypass_kernels.patch(toy, SCHEDULE)
    torch._dynamo.reset()
    compiled = torch.compile(toy, fullgraph=True)
    x = torch.randn(4, 4, 9, 11)
    with torch.no_grad():
        with_nan = torch.tensor([600.5, 123.4, float("nan"), 5000.0])
        for t in (with_nan, torch.tensor(700)):
            torch.testing.assert_close(compiled(x, t), toy(x, t), atol=1e-6, rtol=1e-6)
        zero = torch.tensor([600.5, 123.4, 0.0, 5000.0])  # NaN reads index 0, as timestep 0 does
        torch.testing.assert_close(compiled(x, with_nan), toy(x, zero), atol=1e-6, rtol=1e-6)


def test_sdxl_shaped_fullgraph_no_recompile():
    """SDXL's added conditioning traces in one graph with no recompile across timesteps (Dynamo's rules:
    AOT-eager; Inductor's code is checked on a one-level SD UNet above). A one-level SDXL UNet: the
    added conditioning is what this test is about, and it traces in half the time of tiny-sdxl."""
    unet = bypass_kernels.patch(graph_unet("sdxl"), SCHEDULE)
    calls = loop_inputs(unet, [torch.tensor(t) for t in (999, 640, 320, 0)])
    outputs, frames, _, _, _ = compiled_run(unet, calls, backend="aot_eager")
    assert frames == 1
    bypass_kernels.unpatch(unet)
    handles = hand_hook(unet, SCHEDULE.weight)
    for inputs, got in zip(calls, outputs, strict=True):
        torch.testing.assert_close(got, run_unet(unet, inputs), atol=1e-4, rtol=1e-4)
    for h in handles:
        h.remove()


def test_explicit_native_backend_compiles_without_graph_break():
    """backend='cpu' (the C++ op, with its fake impl) under fullgraph: an opaque op, no graph break."""
    if "cpu" not in bypass_kernels.info()["backends"] or not bypass_kernels.info()["backends"]["cpu"]["available"]:
        pytest.skip("native extension not built")

    def step(m, h, table, t):
        out = m * 2
        bypass_kernels.blend_(out, h, table, t, backend="cpu")
        return out

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    table = SCHEDULE.table()
    m, h = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    for t in (999.0, 500.0, 5.0):
        t = torch.tensor([t, 900.0])
        expected = bypass_kernels.blend_reference(m * 2, h, table, t)
        torch.testing.assert_close(compiled(m, h, table, t), expected)
    assert counter.frame_count == 1


@gpu
def test_cuda_graph_replay_matches_eager_every_step():
    unet = bypass_kernels.patch(build_unet("tiny-sd", device="cuda", dtype=torch.float16), SCHEDULE)
    inputs = example_inputs(unet, batch=2)
    static_t = torch.tensor(999.0, device="cuda")
    static = {**inputs, "timestep": static_t}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            run_unet(unet, static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = unet(**static, return_dict=False)[0]
    for t in torch.linspace(999, 0, 12):
        static_t.fill_(t)
        graph.replay()
        expected = run_unet(unet, {**inputs, "timestep": t.to("cuda")})
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


@gpu
def test_reduce_overhead_records_one_graph_and_no_sync():
    unet = bypass_kernels.patch(build_unet("tiny-sd", device="cuda", dtype=torch.float16), SCHEDULE)
    calls = loop_inputs(unet, [torch.tensor(float(t), device="cuda") for t in range(999, 0, -50)])
    outputs, frames, _, _, _ = compiled_run(unet, calls, mode="reduce-overhead")
    assert frames == 1
    eager = [run_unet(unet, c) for c in calls]
    for got, exp in zip(outputs, eager, strict=True):
        torch.testing.assert_close(got, exp, atol=5e-3, rtol=5e-3)


@gpu
def test_eager_patched_forward_has_no_host_sync():
    unet = bypass_kernels.patch(build_unet("tiny-sd", device="cuda", dtype=torch.float16), SCHEDULE)
    inputs = example_inputs(unet, batch=2, timestep=torch.tensor([999.0, 500.0], device="cuda"))
    run_unet(unet, inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_unet(unet, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
