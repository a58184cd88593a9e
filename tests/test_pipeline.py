"""A real diffusers pipeline, built locally from tiny components, patched end to end."""

import numpy as np
import pytest
import tiny_pipelines
import torch
from conftest import hand_hook

import bypass_kernels
from bypass_kernels import BypassSchedule, default_schedule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipelines.sd_pipeline(tmp_path_factory.mktemp("tokenizer"))


def t2i(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=generator,
        output_type="np",
    )
    return out.images


def i2i(pipe, strength, seed=0):
    return tiny_pipelines.run_img2img(pipe, strength, seed=seed)


def with_hand_hook(pipe, schedule, run):
    handles = hand_hook(pipe.unet, schedule.weight)
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def test_text_to_image_patched_pipeline(pipe):
    schedule = BypassSchedule.linear(0.6, t_min=300)
    plain = t2i(pipe)
    expected = with_hand_hook(pipe, schedule, lambda: t2i(pipe))
    assert bypass_kernels.patch(pipe, schedule) is pipe
    try:
        got = t2i(pipe)
    finally:
        bypass_kernels.unpatch(pipe)
    assert got.shape == (1, 32, 32, 3) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
    np.testing.assert_array_equal(t2i(pipe), plain)  # unpatched again: the original output


def test_image_to_image_starts_part_way_down_the_table(pipe):
    schedule = default_schedule()  # zero below t = 500
    low_plain, high_plain = i2i(pipe, 0.4), i2i(pipe, 0.95)
    high_expected = with_hand_hook(pipe, schedule, lambda: i2i(pipe, 0.95))
    with bypass_kernels.patched(pipe, schedule):
        low, high = i2i(pipe, 0.4), i2i(pipe, 0.95)
    np.testing.assert_array_equal(low, low_plain)  # timesteps below 500 only: λ = 0 throughout
    np.testing.assert_allclose(high, high_expected, atol=1e-4)
    assert np.abs(high - high_plain).max() > 1e-3


def test_pipeline_scheduler_length_is_checked(pipe):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        bypass_kernels.patch(pipe, BypassSchedule.constant(0.1, num_train_timesteps=500))
    assert not bypass_kernels.is_patched(pipe)


@pytest.mark.parametrize(
    "make",
    [
        lambda: diffusers.EDMEulerScheduler(),
        lambda: diffusers.EDMDPMSolverMultistepScheduler(),
        lambda: diffusers.EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction"),
    ],
    ids=["edm-euler", "edm-dpmsolver", "euler-continuous"],
)
def test_a_scheduler_of_continuous_noise_levels_is_refused(pipe, make):
    """EDM-style schedulers (Playground v2.5, CosXL) give the UNet ln(σ)/4, about −1.6 to 1.1: every step
    read λ at index 0 or 1, and the default schedule silently did nothing. Such a schedule is refused at
    patch, and at the first call after such a scheduler is swapped in; one that acts there is not."""
    original = pipe.scheduler
    pipe.scheduler = make()
    try:
        with pytest.raises(ValueError, match="continuous noise level"):
            bypass_kernels.patch(pipe)
        assert not bypass_kernels.is_patched(pipe)
        bypass_kernels.patch(pipe, BypassSchedule.constant(0.3))  # λ = 0.3 at every timestep: it acts
        bypass_kernels.unpatch(pipe)
        with pytest.raises(ValueError, match="continuous noise level"):
            BypassSchedule.for_scheduler(pipe.scheduler, 10, 0.5)
        pipe.scheduler = original
        bypass_kernels.patch(pipe)
        pipe.scheduler = make()
        with pytest.raises(ValueError, match="continuous noise level"):
            t2i(pipe)
    finally:
        pipe.scheduler = original
        bypass_kernels.unpatch(pipe)


def test_a_scheduler_is_judged_once_not_on_every_call(pipe, monkeypatch):
    """The check builds a scheduler from the config and sets its timesteps: once per scheduler and
    schedule (a flow-matching scheduler that needs the pipeline's shift mu takes a second try, mu = 0)."""
    from bypass_kernels import scheduler_check, steps

    calls = []
    real = steps.visited_timesteps
    monkeypatch.setattr(steps, "visited_timesteps", lambda *a, **k: calls.append(a) or real(*a, **k))
    schedule = default_schedule()
    for scheduler, tries in (
        (diffusers.DDIMScheduler(), 1),
        (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 2),
    ):
        calls.clear()
        holder = type("Pipe", (), {"scheduler": scheduler})()
        for _ in range(3):
            scheduler_check.check_scheduler_T(holder, schedule)
        assert len(calls) == tries, type(scheduler).__name__


def test_patched_pipeline_with_compiled_unet_compiles_once(pipe):
    """``pipe.unet = torch.compile(pipe.unet, fullgraph=True)`` on a patched pipeline: text-to-image
    and image-to-image at two strengths (different timesteps, different starting points down the
    table) reuse one graph, and the images equal the hand-hook reference. Dynamo's rules are what is
    checked, so the AOT-eager backend (test_compile.py checks Inductor's code)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    schedule = BypassSchedule.linear(0.6, t_min=300)
    expected_t2i = with_hand_hook(pipe, schedule, lambda: t2i(pipe))
    expected_i2i = with_hand_hook(pipe, schedule, lambda: i2i(pipe, 0.95))
    unet = pipe.unet
    bypass_kernels.patch(pipe, schedule)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    pipe.unet = torch.compile(unet, backend=counter, fullgraph=True)
    try:
        got_t2i = t2i(pipe)
        got_i2i = i2i(pipe, 0.95)
        i2i(pipe, 0.5)
        frames = counter.frame_count
    finally:
        pipe.unet = unet
        bypass_kernels.unpatch(pipe)
        torch._dynamo.reset()
    assert frames == 1  # no graph break, no recompile across timesteps, strengths or pipelines
    np.testing.assert_allclose(got_t2i, expected_t2i, atol=1e-3)
    np.testing.assert_allclose(got_i2i, expected_i2i, atol=1e-3)


def test_a_unet_patched_through_a_second_pipeline_leaves_no_link_on_the_first(tmp_path):
    """Two pipelines sharing one UNet: the scheduler check follows the pipeline patched last, and
    unpatch then leaves no link attribute behind on either (one stayed on the first)."""
    from diffusers import StableDiffusionPipeline
    from tiny_pipelines import sd_pipeline

    first = sd_pipeline(tmp_path)
    second = StableDiffusionPipeline(**first.components)
    bypass_kernels.patch(first, bypass_kernels.BypassSchedule.constant(0.5))
    bypass_kernels.patch(second, bypass_kernels.BypassSchedule.constant(0.5))
    bypass_kernels.unpatch(second)
    assert "_bypass_link" not in first.__dict__ and "_bypass_link" not in second.__dict__
    assert not bypass_kernels.is_patched(first.unet)
