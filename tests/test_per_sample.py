"""A schedule per sample in one batched call (bypass_kernels.per_sample): each image of the batch equals a
run of that request alone with its schedule, through the way each pipeline builds its batch
(classifier-free guidance, num_images_per_prompt, frames folded into the batch), eager and compiled,
per thread, and nothing after the block."""

import threading

import pytest
import tiny_pipelines
import tiny_transformers as tt
import torch
from test_patch_integrity import wan_pipeline
from tiny_models import build_tiny_model, graph_unet, tiny_model_inputs

import bypass_kernels
from bypass_kernels import BypassSchedule, patch, per_sample, set_schedule, unpatch

# λ = 0 (the request that asked for no bypass), and two that act at every step the tiny pipelines take
SCHEDULES = [BypassSchedule.constant(0.0), BypassSchedule.linear(0.8, t_min=300), BypassSchedule.constant(0.5)]
PROMPTS = ["a red square", "a blue circle", "a green cross"]
SEEDS = [11, 12, 13]
# A batched call and single calls differ by the float32 rounding of batch-size-dependent kernels, the unpatched
# model's too: a batch with a schedule per sample must differ from its single requests by no more than that


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sd_call(pipe, prompts, gens, **kwargs):
    return pipe(
        prompts,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=gens,
        output_type="latent",
        **kwargs,
    ).images


def dit_call(name):
    def call(pipe, prompts, gens, **kwargs):
        size = dict(height=32, width=32)
        out = pipe(prompts, num_inference_steps=3, generator=gens, output_type="latent", **size, **kwargs)
        return out.images if hasattr(out, "images") else out.frames

    call.__name__ = f"{name}_call"
    return call


def requests_against_one_batch(pipe, call, *, schedules=SCHEDULES, prompts=PROMPTS, seeds=SEEDS, per_prompt=1):
    """Runs of each request alone with its schedule and of the batch with per_sample, and both unpatched:
    {"singles", "batched", "plain singles", "plain batched"}."""

    def singles():
        return torch.cat(
            [
                call(pipe, prompts[i], generators(seeds[i * per_prompt : (i + 1) * per_prompt]), **images)
                for i in range(len(prompts))
                if set_schedule_of(i)
            ]
        )

    def set_schedule_of(i):
        if bypass_kernels.is_patched(pipe):
            set_schedule(pipe, schedules[i])
        return True

    images = dict(num_images_per_prompt=per_prompt)
    runs = {"plain batched": call(pipe, prompts, generators(seeds), **images), "plain singles": singles()}
    patch(pipe)
    runs["singles"] = singles()
    set_schedule(pipe, bypass_kernels.default_schedule())
    with per_sample(pipe, schedules, images_per_prompt=per_prompt):
        runs["batched"] = call(pipe, prompts, generators(seeds), **images)
    unpatch(pipe)
    return runs


def check_rows(runs, per_prompt=1):
    batched, singles, plain = runs["batched"], runs["singles"], runs["plain batched"]
    batching = (plain - runs["plain singles"]).abs().max()  # what batching alone changes
    assert (batched - singles).abs().max() <= 2 * batching + 1e-6
    # float32 rounding, which moves with the kernels' blocking (the threads free on a loaded machine:
    # 1.2e-6 seen under a parallel test run, 2e-7 alone)
    assert (batched - singles).norm() <= 1e-5 * singles.norm()
    assert torch.equal(batched[:per_prompt], plain[:per_prompt])  # λ = 0: the unpatched batch, bit for bit
    for i in range(1, len(SCHEDULES)):  # the other requests were bypassed
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        assert not torch.allclose(batched[rows], plain[rows], atol=1e-4)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipelines.sd_pipeline(tmp_path_factory.mktemp("sd"))


def test_sd_with_classifier_free_guidance(sd):
    check_rows(requests_against_one_batch(sd, sd_call))


def test_sd_with_num_images_per_prompt(sd):
    """Two images per prompt: one schedule per prompt with images_per_prompt=2 (the pipeline repeats each
    prompt's rows in place, then doubles the batch for guidance)."""
    check_rows(requests_against_one_batch(sd, sd_call, seeds=list(range(20, 26)), per_prompt=2), per_prompt=2)


def test_sdxl(tmp_path):
    pipe = tiny_pipelines.sdxl_pipeline(tmp_path, graph_unet("sdxl"))
    check_rows(requests_against_one_batch(pipe, sd_call))


@pytest.mark.parametrize("name", sorted(tiny_pipelines.DIT_PIPELINES))
def test_dit_pipelines(name, tmp_path):
    pipe = tiny_pipelines.DIT_PIPELINES[name](tmp_path)
    extra = tiny_pipelines.DIT_CALL[name]
    call = dit_call(name)
    check_rows(requests_against_one_batch(pipe, lambda p, pr, g, **k: call(p, pr, g, **extra, **k)))


def test_wan_pipeline_whose_guidance_is_a_second_call():
    """Wan calls the model once for the conditional batch and once for the unconditional one."""
    pipe = wan_pipeline(second=False)
    embeds = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))

    def call(p, prompts, gens, num_images_per_prompt=1):
        rows = [PROMPTS.index(x) for x in ([prompts] if isinstance(prompts, str) else prompts)]
        return p(
            prompt_embeds=embeds[rows],
            negative_prompt_embeds=-embeds[rows],
            height=16,
            width=16,
            num_frames=5,
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=gens,
            output_type="latent",
        ).frames

    check_rows(requests_against_one_batch(pipe, call))


@pytest.mark.parametrize("name", ["unet3d", "motion", "svd", "i2vgen-xl"])
def test_video_unets_fold_frames_into_the_batch(name):
    """Video UNets fold each sample's frames into the batch before the mid-block: every frame of a sample
    takes that sample's schedule."""
    unet, frames = build_tiny_model(name), 3
    inputs = tiny_model_inputs(unet, 3, frames=frames, timestep=torch.tensor([900.0, 700.0, 500.0]))

    def run(b=None):
        one = {}
        for key, value in inputs.items():
            rows = slice(None) if b is None else slice(b, b + 1)
            if b is not None and key == "encoder_hidden_states" and name == "motion":  # repeated over frames
                rows = slice(b * frames, (b + 1) * frames)
            one[key] = value[rows] if isinstance(value, torch.Tensor) else value
        with torch.no_grad():
            return unet(**one, return_dict=False)[0]

    patch(unet)
    singles = []
    for i, schedule in enumerate(SCHEDULES):
        set_schedule(unet, schedule)
        singles.append(run(i))
    with per_sample(unet, SCHEDULES):
        batched = run()
    unpatch(unet)
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- compile, threads, scope
def dit_model_and_inputs():
    model = tt.build("flux")
    kwargs = tt.inputs("flux", [0.7, 0.7, 0.4], batch=3)
    return model, kwargs


def single_rows(model, kwargs, schedules=SCHEDULES):
    rows = []
    for i, schedule in enumerate(schedules):
        set_schedule(model, schedule)
        one = {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (3,) else v) for k, v in kwargs.items()}
        rows.append(tt.run(model, one))
    set_schedule(model, bypass_kernels.default_schedule())
    return torch.cat(rows)


def test_compiled_per_sample_changes_no_guard_but_the_number_of_rows():
    from torch._dynamo.testing import CompileCounterWithBackend

    model, kwargs = dit_model_and_inputs()
    patch(model, span=(1, 2))
    expected = single_rows(model, kwargs)
    expected_reversed = single_rows(model, kwargs, SCHEDULES[::-1])
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    with per_sample(model, SCHEDULES):
        torch.testing.assert_close(tt.run(compiled, kwargs), expected, rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    with per_sample(model, SCHEDULES[::-1]):  # other values, same shape: the same code
        torch.testing.assert_close(tt.run(compiled, kwargs), expected_reversed, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames
    # another number of rows comes with another batch: one recompile, as for the batch alone (then dynamic)
    two = tt.inputs("flux", [0.7, 0.4], batch=2)
    with per_sample(model, SCHEDULES[1:]):
        tt.run(compiled, two)
    with per_sample(model, SCHEDULES[:2]):
        tt.run(compiled, two)
    assert counter.frame_count == frames + 1
    torch._dynamo.reset()
    unpatch(model)


def test_two_threads_with_their_own_schedules_get_their_own_results():
    model, kwargs = dit_model_and_inputs()
    patch(model, span=(1, 2))
    orders = {"forward": SCHEDULES, "reversed": SCHEDULES[::-1]}
    expected = {name: single_rows(model, kwargs, order) for name, order in orders.items()}
    for compiled in (False, True):
        torch._dynamo.reset()
        run_model = torch.compile(model, backend="aot_eager") if compiled else model
        tt.run(run_model, kwargs)  # compiled once before the threads
        results, barrier = {}, threading.Barrier(2)

        def work(name, results=results, barrier=barrier, run_model=run_model):
            barrier.wait()
            for _ in range(2):
                with per_sample(model, orders[name]):
                    results[name] = tt.run(run_model, kwargs)

        threads = [threading.Thread(target=work, args=(name,)) for name in orders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for name in orders:
            torch.testing.assert_close(results[name], expected[name], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    unpatch(model)


def test_the_schedules_are_gone_after_the_block_and_errors_say_what_to_do():
    model, kwargs = dit_model_and_inputs()
    with pytest.raises(ValueError, match="not patched"), per_sample(model, SCHEDULES):
        pass
    patch(model, span=(1, 2))
    before = tt.run(model, kwargs)
    with per_sample(model, SCHEDULES):
        inside = tt.run(model, kwargs)
    assert not torch.allclose(inside, before) and torch.equal(tt.run(model, kwargs), before)
    with per_sample(model, SCHEDULES[:2]), pytest.raises(ValueError, match="2 schedules for a model call of batch 3"):
        tt.run(model, kwargs)
    with pytest.raises(TypeError, match="a list"), per_sample(model, SCHEDULES[0]):
        pass
    other_T = [BypassSchedule.constant(0.5, num_train_timesteps=500)] * 3
    with pytest.raises(ValueError, match="num_train_timesteps=500"), per_sample(model, other_T):
        pass
    with per_sample(model, ["off", "linear:0.8:300", {"shape": "constant", "strength": 0.5}]):  # specs and dicts
        torch.testing.assert_close(tt.run(model, kwargs), inside, atol=0, rtol=0)
    unpatch(model)
