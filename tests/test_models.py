"""Every diffusers UNet class with a mid-block, patched, against a hand-written reference hook.

Tiny configs (tests/tiny_models.py, TINY_MODELS), random weights, float32 on the CPU. The reference is the
unpatched model with a plain forward hook on its mid-block computing (1 − λ)·m + λ·h, λ from a hand-written
linear schedule at the timestep the model was called with: one λ per sample, and for video models (whose
mid-block sees B·F samples, frames folded batch-major) each sample's λ repeated over its F frames.

Video models called with a [B] timestep, B > 1, fail on the code of c640135 ("expected 1 value or one per
sample (B·F), got B"): the frame fold is not implemented yet. These tests are its specification.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FRAME_DIM, TINY_MODELS, build_tiny_model, tiny_model_inputs

import bypass_kernels
from bypass_kernels import BypassSchedule

diffusers = pytest.importorskip("diffusers")

VIDEO = ["unet3d", "motion", "svd", "i2vgen-xl"]
FRAMES = 3
STRENGTH, T_MIN, T_MAX = 0.8, 300, 999
SCHEDULE = BypassSchedule.linear(STRENGTH, t_min=T_MIN)


def lam_of(t: float) -> float:
    """The linear schedule written out by hand: float32 timestep, round half to even, clamp to [0, 999]."""
    i = min(max(round(float(np.float32(t))), 0), 999)
    return STRENGTH * (i - T_MIN) / (T_MAX - T_MIN) if i >= T_MIN else 0.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_tiny_model(name)
        return cache[name]

    yield get
    for model in cache.values():
        bypass_kernels.unpatch(model)


def reference_hook(model, frames: int, *, fold: str = "batch_major"):
    """Hooks on the unpatched model: keep the call's timestep; blend the mid-block's output with its input.

    ``fold`` says how the per-sample λ are laid over the mid-block's B·F rows: "batch_major" (sample b's
    frames are rows b·F … b·F + F − 1, as diffusers folds them) or "frame_major" (the wrong order, to show
    that the tests tell them apart)."""
    state = {}

    def keep(module, args, kwargs):
        state["t"] = kwargs["timestep"] if "timestep" in kwargs else args[1]

    def mix(module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        lam = [lam_of(v) for v in torch.as_tensor(state["t"]).reshape(-1).tolist()]
        if len(lam) > 1 and frames > 1:
            lam = [v for v in lam for _ in range(frames)] if fold == "batch_major" else lam * frames
        assert len(lam) in (1, out.shape[0]), (len(lam), out.shape)
        lam = torch.tensor(lam, dtype=torch.float32).reshape(-1, *[1] * (out.dim() - 1))
        return ((1 - lam) * out.float() + lam * h.float()).to(out.dtype)

    return [
        model.register_forward_pre_hook(keep, with_kwargs=True),
        model.mid_block.register_forward_hook(mix, with_kwargs=True),
    ]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def run_patched(model, inputs):
    """One call of ``model`` patched with SCHEDULE, unpatched again afterwards."""
    bypass_kernels.patch(model, SCHEDULE)
    try:
        return run(model, inputs)
    finally:
        bypass_kernels.unpatch(model)


def run_reference(model, inputs, frames, **kwargs):
    handles = reference_hook(model, frames, **kwargs)
    try:
        return run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


def frames_of(model) -> int:
    return FRAMES if type(model).__name__ in FRAME_DIM else 1


TIMESTEPS = {
    "per_sample": (2, lambda: torch.tensor([901.5, 450.0])),  # B = 2, distinct λ; 901.5 is a tie (→ 902)
    "zero_d": (2, lambda: torch.tensor(700)),  # one timestep for the whole batch
    "one_sample": (1, lambda: torch.tensor([650.0])),  # B = 1, a [1] timestep
}


def test_every_class_is_covered():
    names = {cls for cls, _ in TINY_MODELS.values()}
    assert names == {
        "UNet2DModel",
        "UNet2DConditionModel",
        "UNet3DConditionModel",
        "UNetMotionModel",
        "UNetSpatioTemporalConditionModel",
        "I2VGenXLUNet",
    }


@pytest.mark.parametrize("kind", list(TIMESTEPS))
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_patched_matches_hand_written_reference(models, name, kind):
    model = models(name)
    batch, timestep = TIMESTEPS[kind]
    inputs = tiny_model_inputs(model, batch, frames=FRAMES, timestep=timestep())
    frames = frames_of(model)
    plain = run(model, inputs)
    expected = run_reference(model, inputs, frames)
    assert not torch.allclose(expected, plain, atol=1e-3)  # λ > 0 changes the output: the test can fail
    got = run_patched(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VIDEO)
def test_video_lambda_follows_the_batch_major_frame_fold(models, name):
    """Per-sample λ repeated over each sample's frames (repeat_interleave), not tiled over frames: the
    wrong fold gives a different output, and the patched model gives the right one."""
    model = models(name)
    inputs = tiny_model_inputs(model, 2, frames=FRAMES, timestep=torch.tensor([950.0, 320.0]))
    right = run_reference(model, inputs, FRAMES)
    wrong = run_reference(model, inputs, FRAMES, fold="frame_major")
    assert not torch.allclose(right, wrong, atol=1e-3)
    got = run_patched(model, inputs)
    torch.testing.assert_close(got, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VIDEO)
def test_video_each_sample_equals_its_own_call(models, name):
    """A batch of two videos at two timesteps equals the two videos run one at a time."""
    model = models(name)
    inputs = tiny_model_inputs(model, 2, frames=FRAMES, timestep=torch.tensor([880.0, 610.0]))
    bypass_kernels.patch(model, SCHEDULE)
    try:
        both = run(model, inputs)
        singles = []
        for b in range(2):
            one = {}
            for key, value in inputs.items():
                rows = slice(b, b + 1)
                if key == "encoder_hidden_states" and name == "motion":  # already repeated over the frames
                    rows = slice(b * FRAMES, (b + 1) * FRAMES)
                one[key] = value[rows] if isinstance(value, torch.Tensor) else value
            singles.append(run(model, one))
    finally:
        bypass_kernels.unpatch(model)
    torch.testing.assert_close(both, torch.cat(singles), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_lambda_zero_and_unpatch_restore_the_exact_output(models, name):
    model = models(name)
    inputs = tiny_model_inputs(model, 2, frames=FRAMES, timestep=torch.tensor(800.0))
    keys = list(model.state_dict())
    plain = run(model, inputs)
    with bypass_kernels.patched(model, BypassSchedule.constant(0.0)):
        zero = run(model, inputs)
    bypass_kernels.patch(model, SCHEDULE)
    assert bypass_kernels.is_patched(model)
    bypassed = run(model, inputs)
    bypass_kernels.unpatch(model)
    assert not bypass_kernels.is_patched(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(zero, plain)
    assert not torch.allclose(bypassed, plain, atol=1e-3)
    assert torch.equal(run(model, inputs), plain)


# ------------------------------------------------------------------ ControlNet and T2I-Adapter pipelines
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["controlnet", "adapter"])
def residual_pipe(request, tmp_path_factory):
    import tiny_pipelines

    build = {"controlnet": tiny_pipelines.controlnet_pipeline, "adapter": tiny_pipelines.adapter_pipeline}
    pipe = build[request.param](tmp_path_factory.mktemp("tokenizer"))
    yield pipe
    bypass_kernels.unpatch(pipe)


def _mid_residual_spy(pipe):
    """Records the residual the UNet adds to its mid-block's output (ControlNet: the mid_block_additional_residual
    argument; T2I-Adapter: the last down_intrablock_additional_residuals entry, when it matches the mid-block)."""
    seen = []

    def keep(module, args, kwargs):
        r = kwargs.get("mid_block_additional_residual")
        if r is None and kwargs.get("down_intrablock_additional_residuals"):
            r = kwargs["down_intrablock_additional_residuals"][-1]
        seen.append(r)

    return seen, pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)


def test_residual_pipeline_blends_before_the_residual(residual_pipe):
    """The bypass acts on the mid-block's own output; the ControlNet / T2I-Adapter residual is added after it.
    Reference: the unpatched pipeline with the hand-written hook on the UNet's mid-block (a forward hook
    runs before the UNet adds the residual)."""
    import tiny_pipelines

    pipe = residual_pipe
    plain = tiny_pipelines.run_pipeline(pipe)
    seen, spy = _mid_residual_spy(pipe)
    handles = reference_hook(pipe.unet, 1)
    try:
        expected = tiny_pipelines.run_pipeline(pipe)
    finally:
        for handle in [*handles, spy]:
            handle.remove()
    residuals = [r for r in seen if r is not None]
    assert residuals and all(r.abs().max() > 0 for r in residuals)  # a non-zero mid-block residual each step

    # The wrong order (λ applied to mid-block output + residual) gives other images, so the test can fail.
    state = {}

    def keep(module, args, kwargs):
        state["t"] = kwargs["timestep"] if "timestep" in kwargs else args[1]
        r = kwargs.get("mid_block_additional_residual")
        state["r"] = r if r is not None else kwargs["down_intrablock_additional_residuals"][-1]

    def wrong_mix(module, args, out):
        lam = lam_of(float(torch.as_tensor(state["t"]).reshape(-1)[0]))
        r = state["r"]
        return (1 - lam) * (out + r) + lam * args[0] - r

    wrong_handles = [
        pipe.unet.register_forward_pre_hook(keep, with_kwargs=True),
        pipe.unet.mid_block.register_forward_hook(wrong_mix),
    ]
    try:
        wrong = tiny_pipelines.run_pipeline(pipe)
    finally:
        for handle in wrong_handles:
            handle.remove()
    assert np.abs(wrong - expected).max() > 1e-3

    bypass_kernels.patch(pipe, SCHEDULE)
    try:
        got = tiny_pipelines.run_pipeline(pipe)
    finally:
        bypass_kernels.unpatch(pipe)
    assert np.abs(got - plain).max() > 1e-3
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(tiny_pipelines.run_pipeline(pipe), plain)  # unpatched: the original images
