"""Tiny offline SD3, Flux and PixArt-Σ pipelines, patched: λ = 0 is the pipeline, λ = 1 the pipeline
with the span deleted, and flow-matching schedules by fraction of sampling give each step its λ."""

import math

import pytest
import torch
from test_transformers import PassThrough, hand_span
from tiny_pipelines import DIT_CALL, DIT_PIPELINES

import bypass_kernels
from bypass_kernels import BypassSchedule, patch, unpatch
from bypass_kernels.targets import TRANSFORMERS, blocks_of

FAMILY_OF = {"sd3": "sd3", "flux": "flux", "pixart-sigma": "pixart"}


@pytest.fixture(scope="module", params=list(DIT_PIPELINES))
def pipeline(request, tmp_path_factory):
    return request.param, DIT_PIPELINES[request.param](tmp_path_factory.mktemp(request.param))


def generate(pipe, name, steps=3, **extra):
    with torch.no_grad():
        return pipe(
            "a cat",
            num_inference_steps=steps,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **DIT_CALL[name],
            **extra,
        ).images


def test_lambda_zero_is_the_pipeline_and_lambda_one_deletes_the_span(pipeline):
    name, pipe = pipeline
    plain = generate(pipe, name)
    patch(pipe, BypassSchedule.constant(0.0))
    assert torch.equal(generate(pipe, name), plain)
    patch(pipe, BypassSchedule.constant(1.0), span=(0, 1))
    bypassed = generate(pipe, name)
    unpatch(pipe)
    family = TRANSFORMERS[type(pipe.transformer).__name__]
    saved = []
    for block_name, _ in blocks_of(pipe.transformer, family)[:2]:
        lst, idx = block_name.split(".")
        saved.append((lst, int(idx), getattr(pipe.transformer, lst)[int(idx)]))
        getattr(pipe.transformer, lst)[int(idx)] = PassThrough(FAMILY_OF[name])
    try:
        deleted = generate(pipe, name)
    finally:
        for lst, idx, block in saved:
            getattr(pipe.transformer, lst)[idx] = block
    torch.testing.assert_close(bypassed, deleted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(bypassed, plain, atol=1e-3)
    assert torch.equal(generate(pipe, name), plain)  # unpatched again


def calls_of(pipe, name, steps, **extra):
    """The timestep of every transformer call, as the pipeline passes it."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["timestep"].detach().clone()), with_kwargs=True
    )
    try:
        generate(pipe, name, steps=steps, **extra)
    finally:
        handle.remove()
    return seen


def ramp(i, n, strength, start, end):
    p = i / n
    return strength * (end - p) / (end - start) if start <= p < end else 0.0


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_for_pipeline_gives_each_step_its_own_lambda(name, tmp_path):
    """Flux (dynamic shift from the image size, sigmas from the pipeline) and SD3 (shift 3): the
    schedule's timesteps are the ones the pipeline samples at, and the patched pipeline equals a
    hand-written span hook that applies λ(i/N) at step i."""
    import warnings

    pipe = DIT_PIPELINES[name](tmp_path)
    n = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pipeline it knows: no warning
        schedule = BypassSchedule.for_pipeline(pipe, n, 0.8, end=0.75, height=32, width=32)
    seen = calls_of(pipe, name, n)
    units = 1000.0 if name == "flux" else 1.0
    assert [float(t[0]) * units for t in seen] == pytest.approx(schedule.to_dict()["timesteps"], abs=1e-3)
    family = FAMILY_OF[name]
    i, j = bypass_kernels.targets.default_span(
        len(blocks_of(pipe.transformer, TRANSFORMERS[type(pipe.transformer).__name__]))
    )
    step = {"k": 0}
    lams = [0.0, 0.0]
    handles = hand_span(pipe.transformer, family, i, j, lams)

    def next_step(module, args, kwargs):  # λ of this call's step, for every sample of its batch
        lam = ramp(step["k"], n, 0.8, 0.0, 0.75)
        batch = kwargs["hidden_states"].shape[0]
        lams[:] = [lam] * batch
        step["k"] += 1

    handles.append(pipe.transformer.register_forward_pre_hook(next_step, with_kwargs=True))
    expected = generate(pipe, name, steps=n)
    for h in handles:
        h.remove()
    patch(pipe, schedule)
    torch.testing.assert_close(generate(pipe, name, steps=n), expected, atol=1e-5, rtol=1e-5)
    unpatch(pipe)


def test_bfloat16_flux_reads_each_steps_lambda_though_the_pipeline_rounds_t(tmp_path):
    """A bfloat16 Flux pipeline passes t/1000 in bfloat16 and the model multiplies by 1000 in
    bfloat16: the timestep it sees is off the scheduler's by up to a few units. Every call still
    reads its own step's λ, not 0 (the table gives each index its nearest step's λ)."""
    pipe = DIT_PIPELINES["flux"](tmp_path).to(torch.bfloat16)
    n = 12
    schedule = BypassSchedule.for_pipeline(pipe, n, 0.9, end=1.0, height=32, width=32)
    seen = calls_of(pipe, "flux", n)
    model_sees = [float((t.to(torch.bfloat16) * 1000)[0]) for t in seen]  # what the time embedder gets
    exact = schedule.to_dict()["timesteps"]
    assert any(round(a) != round(b) for a, b in zip(model_sees, exact, strict=True))  # the rounding is real
    for k, t in enumerate(model_sees):
        assert schedule.weight(t) == pytest.approx(ramp(k, n, 0.9, 0.0, 1.0), abs=1e-6), (k, t, exact[k])


def test_for_scheduler_needs_mu_for_a_dynamically_shifting_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"pass mu, or use BypassSchedule\.for_pipeline"):
        BypassSchedule.for_scheduler(scheduler, 10, 0.3)
    made = BypassSchedule.for_scheduler(scheduler, 10, 0.3, mu=math.log(3.0))
    assert made.to_dict()["mu"] == pytest.approx(math.log(3.0))
    assert BypassSchedule.from_dict(made.to_dict()) == made
    record = {k: v for k, v in made.to_dict().items() if k != "timesteps"}  # rebuilt from the scheduler and mu
    record["scheduler"] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}
    assert BypassSchedule.from_dict(record).table().tolist() == made.table().tolist()


def _video_pipeline(name):
    """A diffusers pipeline of ``name`` with a tiny transformer and no text encoder or VAE (prompt
    embeddings given, latents out), and its call; schedulers set as the released models ship them."""
    import diffusers
    import tiny_transformers as tt
    from diffusers import FlowMatchEulerDiscreteScheduler as FlowMatch

    def embeds(seed):
        return torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(seed))

    mask = torch.ones(1, 5)
    shifting = dict(use_dynamic_shifting=True, time_shift_type="exponential", shift_terminal=0.02)
    common = dict(vae=None, text_encoder=None, tokenizer=None, output_type="latent")
    if name == "qwenimage":
        scheduler = FlowMatch(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, **shifting)
        transformer, size = tt.build("qwenimage"), dict(height=32, width=32)
        call = dict(prompt_embeds=embeds(3), prompt_embeds_mask=mask.long())
        cls = diffusers.QwenImagePipeline
    elif name == "ltx":
        scheduler = FlowMatch(
            base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95, max_shift=2.05, **shifting
        )
        transformer, size = tt.build("ltx"), dict(height=64, width=64, num_frames=9)
        call = dict(prompt_embeds=embeds(3), prompt_attention_mask=mask, guidance_scale=1.0)
        cls = diffusers.LTXPipeline
    elif name == "mochi":
        scheduler = FlowMatch(invert_sigmas=True)
        transformer, size = tt.build("mochi"), dict(height=32, width=32, num_frames=7)
        call = dict(prompt_embeds=embeds(3), prompt_attention_mask=mask, guidance_scale=1.0)
        cls = diffusers.MochiPipeline
    else:
        scheduler = FlowMatch(shift=7.0)
        transformer, size = tt.build("hunyuanvideo"), dict(height=16, width=16, num_frames=5)
        call = dict(prompt_embeds=embeds(3), pooled_prompt_embeds=torch.randn(1, 8), prompt_attention_mask=mask)
        cls = diffusers.HunyuanVideoPipeline
        common.update(text_encoder_2=None, tokenizer_2=None)
    output = common.pop("output_type")
    pipe = cls(scheduler=scheduler, transformer=transformer, **common)
    return pipe, size, dict(call, output_type=output, **size)


@pytest.mark.parametrize("name", ["qwenimage", "ltx", "mochi", "hunyuanvideo"])
def test_for_pipeline_follows_the_sigmas_each_video_and_qwen_pipeline_sets(name):
    """QwenImage and LTX-Video pass their own sigmas and a shift from the latent length, HunyuanVideo
    its own sigmas, Mochi its linear-quadratic sigmas through an inverting scheduler (the model gets
    1000 − t): every transformer call reads its own step's λ (failed before: mu missing, or the
    wrong steps' λ)."""
    from test_transformers import REVERSED, TABLE_UNITS

    pipe, size, call = _video_pipeline(name)
    n = 6
    schedule = BypassSchedule.for_pipeline(pipe, n, 0.5, end=0.5, shape="constant", **size)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"].reshape(-1)[0])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            pipe(num_inference_steps=n, generator=torch.Generator().manual_seed(0), **call)
    finally:
        handle.remove()
    assert len(seen) == n
    table_t = [t * TABLE_UNITS.get(name, 1.0) for t in seen]
    table_t = [1000.0 - t for t in table_t] if name in REVERSED else table_t
    assert [schedule.weight(t) for t in table_t] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0], (seen, table_t)


def test_for_pipeline_warns_only_for_a_pipeline_that_sets_sigmas_it_does_not_know():
    """LTX's condition pipeline computes its own sigmas: a warning names for_scheduler. Wan's pipeline
    calls set_timesteps(N) itself: no warning, and the table's timesteps are the ones it visits."""
    import warnings

    import diffusers
    import tiny_transformers as tt
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = dict(vae=None, text_encoder=None, tokenizer=None)
    pipe = diffusers.LTXConditionPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), transformer=tt.build("ltx"), **parts
    )
    with pytest.warns(UserWarning, match="for_scheduler"):
        BypassSchedule.for_pipeline(pipe, 4, 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = diffusers.WanPipeline(scheduler=scheduler, transformer=tt.build("wan"), **parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = BypassSchedule.for_pipeline(pipe, 4, 0.5)
    scheduler.set_timesteps(4)
    assert schedule.to_dict()["timesteps"] == pytest.approx(scheduler.timesteps.tolist())


def sana_sprint():
    """SanaSprintPipeline with a tiny Sana transformer and its SCMScheduler (2 steps), latents out."""
    import diffusers
    import tiny_transformers as tt

    transformer = tt.build("sana", guidance_embeds=True)
    pipe = diffusers.SanaSprintPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=diffusers.SCMScheduler()
    )

    def generate():
        embeds = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
        return pipe(
            prompt_embeds=embeds,
            prompt_attention_mask=torch.ones(1, 5),
            num_inference_steps=2,
            height=256,
            width=256,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            use_resolution_binning=False,
        ).images

    return pipe, generate


def test_sana_sprint_refuses_a_schedule_that_would_never_act_and_acts_at_timestep_scale_1000():
    """SCMScheduler gives the model sin t / (sin t + cos t) in [0, 1): table index 0 or 1. Its
    set_timesteps(10) failed, the check took that for "not judged" and accepted the default schedule,
    and every call was bit-identical to the unpatched one."""
    pipe, generate = sana_sprint()
    plain = generate()
    with pytest.raises(ValueError, match=r"SCMScheduler gives the model timesteps from 0 to 1.*timestep_scale=1000"):
        patch(pipe)
    assert not bypass_kernels.is_patched(pipe)
    patch(pipe, timestep_scale=1000)  # the table read at 1000·t: the default schedule's λ at t = 1000 and 783
    assert not torch.allclose(generate(), plain, atol=1e-4)
    patch(pipe, BypassSchedule.constant(0.0), timestep_scale=1000)
    assert torch.equal(generate(), plain)
    unpatch(pipe)
    patch(pipe, BypassSchedule.constant(0.5))  # not 0 at index 0 or 1: it acts, and is accepted
    assert not torch.allclose(generate(), plain, atol=1e-4)
    unpatch(pipe)


class Forwarding:
    """A scheduler wrapped the way serving engines wrap one (xDiT's): attributes through __getattr__."""

    def __init__(self, scheduler):
        self.module = scheduler

    def __getattr__(self, name):
        return getattr(self.module, name)


def test_a_scheduler_behind_a_forwarding_wrapper_is_judged_without_copying_the_wrapper():
    """The check deep-copied the scheduler; a deep copy of a forwarding wrapper recursed through its
    __getattr__ (xDiT's hung). It now builds a scheduler from the config, of the wrapped class."""
    pipe, _ = sana_sprint()
    pipe.scheduler = Forwarding(pipe.scheduler)
    with pytest.raises(ValueError, match="SCMScheduler gives the model timesteps from 0 to 1"):
        patch(pipe)
    patch(pipe, BypassSchedule.constant(0.5))
    unpatch(pipe)


def test_a_scheduler_whose_timesteps_cannot_be_told_is_refused_not_accepted():
    from diffusers import DDIMScheduler

    class Unknowable(DDIMScheduler):
        def set_timesteps(self, *args, **kwargs):
            raise NotImplementedError("needs a reference image")

    pipe, _ = sana_sprint()
    pipe.scheduler = Unknowable()
    with pytest.raises(ValueError, match=r"cannot tell which timesteps.*needs a reference image.*patch\(pipe"):
        patch(pipe)
    patch(pipe, BypassSchedule.constant(0.0))  # nothing to judge where λ is 0 everywhere
    unpatch(pipe)
    patch(pipe.transformer)  # the model alone: no scheduler, no check
    unpatch(pipe)


class EngineWrapper(torch.nn.Module):
    """A transformer wrapped the way parallel engines wrap one (xDiT): the model as ``module``, attributes
    forwarded through __getattr__, the call passed on."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def test_a_transformer_behind_an_engines_wrapper_is_patched_inside_it():
    pipe, generate = sana_sprint()
    plain = generate()
    inner = pipe.transformer
    pipe.transformer = EngineWrapper(inner)
    patch(pipe, BypassSchedule.constant(0.5))
    assert bypass_kernels.is_patched(pipe) and bypass_kernels.is_patched(inner)
    assert not torch.allclose(generate(), plain, atol=1e-4)  # the wrapper calls the patched model
    unpatch(pipe)
    assert not bypass_kernels.is_patched(inner) and torch.equal(generate(), plain)


def _split_blocks(transformer, stage: int, stages: int) -> None:
    """Keep one pipeline stage's slice of the blocks, as xDiT's PipeFusion does in each rank's process."""
    blocks = transformer.transformer_blocks
    per_stage = (len(blocks) + stages - 1) // stages
    transformer.transformer_blocks = blocks[stage * per_stage : (stage + 1) * per_stage]


def test_blocks_split_across_processes_are_refused_before_and_after_the_patch():
    from bypass_kernels.presets import build_transformer, transformer_inputs

    split = build_transformer("tiny-sd3")  # four blocks; stage 1 of 2 holds blocks 2 and 3
    _split_blocks(split, 1, 2)
    with pytest.raises(ValueError, match=r"transformer_blocks holds 2 of the 4 blocks .*pipefusion_parallel_degree=1"):
        patch(EngineWrapper(split))
    patched = build_transformer("tiny-sd3")
    patch(patched, span=(1, 2))
    _split_blocks(patched, 0, 2)  # the engine splits after the patch: the span's end is in another process
    inputs = transformer_inputs("tiny-sd3", 500.0)
    with pytest.raises(ValueError, match=r"call: SD3Transformer2DModel.transformer_blocks holds 2 of the 4"):
        patched(**inputs)
    # sequence parallelism alone: each process keeps every block (a new list of the same blocks) and works
    whole = build_transformer("tiny-sd3")
    patch(whole, span=(1, 2))
    expected = whole(**inputs)[0]
    _split_blocks(whole, 0, 1)
    torch.testing.assert_close(whole(**inputs)[0], expected, rtol=0, atol=0)
