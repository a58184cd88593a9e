"""A patch is all or nothing, honours every argument the caller gave, refuses what could never run,
never blends a block with another call's values, and blends the same when checkpointed blocks are
recomputed in the backward pass."""

import copy

import pytest
import tiny_transformers as tt
import torch
from test_reliability import Toy, state_of
from torch import nn

import bypass_kernels
from bypass_kernels import BypassSchedule, controller, is_patched, patch, unpatch
from bypass_kernels.targets import blocks_of

ONE = BypassSchedule.constant(1.0)
HALF = BypassSchedule.constant(0.5)


def wan_pipeline(*, first: bool = True, second: bool = True):
    """A Wan 2.2 pipeline (two experts, either may be None) with tiny transformers, no text encoder or VAE."""
    import diffusers

    return diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
        transformer=tt.build("wan") if first else None,
        transformer_2=tt.build("wan", seed=1) if second else None,
        boundary_ratio=0.875 if first and second else None,
    )


def sd3_block_inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    hidden, text = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    return hidden, text, torch.randn(2, 16, generator=gen)


# --------------------------------------------------------------------- stale records
@pytest.mark.parametrize("stop", ["skip_layers", "error"])
def test_the_span_end_called_alone_after_a_call_that_stopped_inside_the_span_is_not_blended(stop):
    """SD3 called with skip_layers over the span's last block (no error at all), or a call that raised
    between the span's blocks, left its record; block j called on its own was then blended with that
    call's span input and timestep (max |difference| 0.32)."""
    model = tt.build("sd3")
    block = model.transformer_blocks[1]
    hidden, text, temb = sd3_block_inputs()
    with torch.no_grad():
        plain = block(hidden, text, temb)
    patch(model, ONE, span=(0, 1))
    kwargs = tt.inputs("sd3", [700.0, 300.0])
    if stop == "skip_layers":
        tt.run(model, dict(kwargs, skip_layers=[1]))
    else:

        def fail(module, args):
            raise RuntimeError("stopped inside the span")

        handle = block.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="stopped inside the span"):
            tt.run(model, kwargs)
        handle.remove()
    with torch.no_grad():
        alone = block(hidden, text, temb)
    for a, b in zip(alone, plain, strict=True):
        assert torch.equal(a, b)
    # and the next model call blends as ever
    expected = tt.run(model, kwargs)
    unpatch(model)
    fresh = tt.build("sd3")
    patch(fresh, ONE, span=(0, 1))
    torch.testing.assert_close(tt.run(fresh, kwargs), expected, atol=0, rtol=0)


# --------------------------------------------------------------------- arguments the caller gave
def test_an_explicit_streams_all_is_honoured_on_a_patched_model():
    """Patched with streams="image", patch(model, s, streams="all") kept blending the image stream only:
    "all" was taken for the default."""
    kwargs = tt.inputs("sd3", [700.0, 300.0])
    model = tt.build("sd3")
    patch(model, HALF, span=(0, 1), streams="all")
    every_stream = tt.run(model, kwargs)
    unpatch(model)
    patch(model, HALF, span=(0, 1), streams="image")
    image_only = tt.run(model, kwargs)
    assert not torch.allclose(image_only, every_stream, atol=1e-5)
    patch(model, HALF, streams="all")
    torch.testing.assert_close(tt.run(model, kwargs), every_stream, atol=0, rtol=0)
    patch(model, HALF)  # streams not given: the present ones stay
    torch.testing.assert_close(tt.run(model, kwargs), every_stream, atol=0, rtol=0)
    unpatch(model)


# --------------------------------------------------------------------- all or nothing
class TracedTime(nn.Module):
    """A toy whose timestep module is TorchScript: its calls cannot carry a role."""

    def __init__(self):
        super().__init__()
        self.inner = Toy()
        self.time = torch.jit.trace(nn.Linear(1, 1), torch.zeros(1, 1))
        self.mid_block = self.inner.mid_block

    def forward(self, sample, timestep):
        self.time(torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, 1))
        return self.inner(sample, timestep)


def test_a_traced_timestep_module_is_refused_and_the_present_patch_stays():
    model = TracedTime()
    x, t = torch.randn(2, 4, 5, 5), torch.tensor([900.0, 400.0])
    patch(model, HALF)
    before, expected = state_of(model), model(x, t)
    with pytest.raises(TypeError, match="the timestep module is a TopLevelTracedModule"):
        patch(model, ONE, timestep_module="time")
    assert state_of(model) == before and bypass_kernels.get_schedule(model) == HALF
    torch.testing.assert_close(model(x, t), expected, atol=0, rtol=0)
    unpatch(model)


def test_a_failed_reattachment_puts_the_present_patch_back(monkeypatch):
    """Another timestep module re-attaches: the old roles come off first. When the new ones cannot go on,
    the old patch is back, as the message says (it was gone)."""
    model = Toy()
    x, t = torch.randn(2, 4, 5, 5), torch.tensor([900.0, 400.0])
    patch(model, HALF)
    before, expected = state_of(model), model(x, t)
    install = controller.BypassController.install

    def refuse(controller):
        if controller.carrier.module is model.conv_in:
            raise RuntimeError("cannot attach here")
        install(controller)

    monkeypatch.setattr(controller.BypassController, "install", refuse)
    with pytest.raises(TypeError, match=r"cannot attach here.*the model is unchanged"):
        patch(model, ONE, timestep_module="conv_in")
    assert state_of(model) == before and bypass_kernels.get_schedule(model) == HALF
    torch.testing.assert_close(model(x, t), expected, atol=0, rtol=0)
    unpatch(model)


def test_a_pipeline_of_two_transformers_is_patched_all_or_nothing(monkeypatch):
    """patch(pipe) wrote the first transformer's new span and schedule before the second failed."""
    pipe = wan_pipeline()
    patch(pipe, HALF, span=(1, 1))
    states = [state_of(pipe.transformer), state_of(pipe.transformer_2)]
    install = controller.BypassController.install

    def refuse(controller):
        if controller.owner is pipe.transformer_2 and controller.span.first is pipe.transformer_2.blocks[0]:
            raise RuntimeError("cannot attach here")
        install(controller)

    monkeypatch.setattr(controller.BypassController, "install", refuse)
    with pytest.raises(TypeError, match="cannot attach here"):
        patch(pipe, ONE, span=(0, 0))
    monkeypatch.undo()
    assert [state_of(pipe.transformer), state_of(pipe.transformer_2)] == states
    for model in (pipe.transformer, pipe.transformer_2):
        assert model._bypass.span.first is model.blocks[1] and model._bypass.schedule == HALF
        assert model._bypass.pipeline is pipe
    unpatch(pipe)


def test_a_block_shared_by_a_pipelines_two_transformers_is_refused():
    pipe = wan_pipeline()
    pipe.transformer_2.blocks[1] = pipe.transformer.blocks[1]
    before = [state_of(pipe.transformer), state_of(pipe.transformer_2)]
    with pytest.raises(ValueError, match="shared by the pipeline's two models"):
        patch(pipe, HALF, span=(1, 1))
    assert [state_of(pipe.transformer), state_of(pipe.transformer_2)] == before
    assert not is_patched(pipe)


# --------------------------------------------------------------------- refused at patch, not at every call
@pytest.mark.parametrize("name", ["mid_block", "mid_block.conv"])
def test_a_timestep_module_inside_the_span_is_refused(name):
    model = Toy()
    before = state_of(model)
    with pytest.raises(ValueError, match="inside the bypassed span"):
        patch(model, HALF, timestep_module=name)
    assert state_of(model) == before


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), True, -1.0, 0, "1000"])
def test_a_timestep_scale_that_is_no_finite_positive_number_is_refused(scale):
    with pytest.raises(ValueError, match="timestep_scale must be a finite positive number"):
        patch(tt.build("sana"), HALF, timestep_scale=scale)


def test_a_pipeline_like_object_with_slots_is_refused_with_what_to_do():
    class Slotted:
        __slots__ = ("scheduler", "transformer")

    holder = Slotted()
    holder.transformer, holder.scheduler = tt.build("sana"), None
    with pytest.raises(TypeError, match=r"cannot be weakly referenced.*patch\(pipe.transformer\)"):
        patch(holder, HALF)
    assert not is_patched(holder.transformer)


# --------------------------------------------------------------------- optional pipeline models
def test_a_wan22_pipeline_with_only_transformer_2_is_patched_and_unpatched():
    pipe = wan_pipeline(first=False)
    patch(pipe, HALF)
    assert is_patched(pipe) and is_patched(pipe.transformer_2)
    unpatch(pipe)
    assert not is_patched(pipe) and not is_patched(pipe.transformer_2)
    patch(pipe.transformer_2, HALF)
    assert is_patched(pipe)
    unpatch(pipe)
    assert not is_patched(pipe.transformer_2)


# --------------------------------------------------------------------- gradient checkpointing
def loss_and_grads(model, kwargs, *, checkpointing: bool, compiled: bool = False):
    model.zero_grad(set_to_none=True)
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    out = run(**kwargs, return_dict=False)[0]
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def timestep_of(name):
    return [0.7, 0.3] if name in ("flux", "qwenimage") else [700.0, 300.0]


@pytest.mark.parametrize("name", tt.NAMES)
def test_gradient_checkpointing_gives_lambda_zero_the_unpatched_model_and_recomputes_the_blend(name):
    """diffusers' test_gradient_checkpointing_equivalence failed in every transformer family, at λ = 0
    too: the recomputation ran outside the model call. Now it blends with that call's values."""
    model = tt.build(name).train()
    kwargs = tt.inputs(name, timestep_of(name))
    out, grads = loss_and_grads(model, kwargs, checkpointing=True)
    n = len(blocks_of(model, bypass_kernels.targets._family(model)))
    for span in {(0, min(1, n - 1)), (n - 1, n - 1)}:
        patch(model, BypassSchedule.constant(0.0), span=span)
        zero_out, zero_grads = loss_and_grads(model, kwargs, checkpointing=True)
        assert torch.equal(zero_out, out) and all(torch.equal(zero_grads[k], g) for k, g in grads.items())
        patch(model, HALF)
        plain_out, plain_grads = loss_and_grads(model, kwargs, checkpointing=False)
        ckpt_out, ckpt_grads = loss_and_grads(model, kwargs, checkpointing=True)
        assert not torch.allclose(plain_out, out, atol=1e-6)  # the blend acts
        assert torch.equal(ckpt_out, plain_out) and plain_grads.keys() == ckpt_grads.keys()
        for k, g in plain_grads.items():
            torch.testing.assert_close(ckpt_grads[k], g, atol=1e-7, rtol=1e-5)
        unpatch(model)


def test_compiled_gradient_checkpointing_recomputes_the_blend():
    model = tt.build("flux").train()
    kwargs = tt.inputs("flux", [0.7, 0.3])
    patch(model, HALF, span=(0, 1))
    plain_out, plain_grads = loss_and_grads(model, kwargs, checkpointing=False)
    torch._dynamo.reset()
    out, grads = loss_and_grads(model, kwargs, checkpointing=True, compiled=True)
    torch._dynamo.reset()
    torch.testing.assert_close(out, plain_out, atol=1e-6, rtol=1e-6)
    for k, g in plain_grads.items():
        torch.testing.assert_close(grads[k], g, atol=1e-7, rtol=1e-5)
    unpatch(model)


def test_a_copied_controller_keeps_nothing_for_recomputation():
    model = tt.build("wan").train()
    patch(model, HALF)
    model.enable_gradient_checkpointing()
    model(**tt.inputs("wan", [700.0, 300.0]), return_dict=False)[0].sum()
    assert len(model._bypass._recompute) == 1
    assert len(copy.deepcopy(model)._bypass._recompute) == 0
    unpatch(model)


# --------------------------------------------------------------------- what a patch covers
def test_describe_says_what_a_patch_covers_and_the_repr_names_no_module_contents():
    model = tt.build("mochi")
    assert bypass_kernels.describe(model) == "MochiTransformer3DModel: not patched"
    patch(model, HALF, span=(0, 1), streams="image")
    text = bypass_kernels.describe(model)
    for part in (
        "span: transformer_blocks.0 .. transformer_blocks.1 (2 blocks)",
        "streams: hidden_states (blended), encoder_hidden_states (passed through)",
        "timestep: the first argument of time_embed (table index = 1000 - t)",  # Mochi receives 1000 − t
        "λ(999) = 0.5",
        "backend: auto",
        "scheduler check: none (patched as a bare model)",
    ):
        assert part in text, (part, text)
    assert len(repr(model._bypass)) < 400 and "Linear(" not in repr(model._bypass)
    unpatch(model)
    pipe = wan_pipeline()
    patch(pipe, HALF)
    text = bypass_kernels.describe(pipe)
    assert text.count("WanTransformer3DModel: patched") == 2 and "scheduler check: WanPipeline's scheduler" in text
    unpatch(pipe)


def test_a_span_preset_of_another_family_names_the_families_it_is_for():
    with pytest.raises(ValueError, match=r"preset 'stg' is for .*WanTransformer3DModel.*its presets: sd3.5-slg"):
        patch(tt.build("sd3"), span="stg")
    with pytest.raises(ValueError, match=r"'sd3.5-slg' is for SD3Transformer2DModel, not .*its presets: none"):
        patch(tt.build("flux"), span="sd3.5-slg")
