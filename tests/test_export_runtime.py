"""OnnxRuntimeUNet as ``pipe.unet`` in real tiny SD and SDXL pipelines, and the call conventions it shares
with TensorRTUNet."""

import json
import os
import re

import numpy as np
import pytest
import torch
from bypass_kernels.export import OnnxRuntimeUNet
from bypass_kernels.export.onnx_export import SCHEDULE_NAME, export_inputs, reference_output
from conftest import GRAPH_SCHEDULE
from tiny_models import graph_unet
from tiny_pipelines import run_img2img, sdxl_pipeline, tiny_text_encoder, tiny_vae

import bypass_kernels
from bypass_kernels import BypassSchedule

pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SCHEDULE = GRAPH_SCHEDULE  # baked into sd_graph (conftest), which the SD pipeline here runs
# Images (values in [0, 1]) after 6-10 denoising steps: ONNX Runtime's float32 kernels differ from
# PyTorch's in the last bits (relative error ~1e-6 per step, see test_export.py).
IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def sd(tmp_path_factory, sd_graph):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_text_encoder(tmp_path_factory.mktemp("tok"), 32)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=graph_unet("sd"),
        scheduler=DDIMScheduler(num_train_timesteps=1000),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, sd_graph["path"]  # the graph's UNet and weights (graph_unet is seeded)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, sdxl_graph):
    pipe = sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), graph_unet("sdxl"))
    return pipe, sdxl_graph["path"]  # the schedule is a graph input: any table at run time


def _t2i(pipe, **kwargs):
    out = pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    )
    return out.images


def _i2i(pipe, strength=0.9):
    return run_img2img(pipe, strength)


def _with_runner(pipe, runner, run):
    unet = pipe.unet
    pipe.unet = runner
    try:
        return run()
    finally:
        pipe.unet = unet


@pytest.mark.parametrize("run", [_t2i, _i2i], ids=["text-to-image", "image-to-image"])
def test_sd_pipeline_with_onnxruntime_unet_equals_patched_pytorch(sd, run):
    pipe, path = sd
    plain = run(pipe)
    with bypass_kernels.patched(pipe, SCHEDULE):
        expected = run(pipe)
    got = _with_runner(pipe, OnnxRuntimeUNet(path), lambda: run(pipe))
    assert got.shape == expected.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=IMAGE_ATOL, rtol=0)
    assert np.abs(got - plain).max() > 1e-3  # the bypass is in the graph


@pytest.mark.parametrize("run", [_t2i, _i2i], ids=["text-to-image", "image-to-image"])
def test_sdxl_pipeline_with_onnxruntime_unet_and_set_schedule(sdxl, run):
    pipe, path = sdxl
    runner = OnnxRuntimeUNet(path, schedule=SCHEDULE)
    with bypass_kernels.patched(pipe, SCHEDULE):
        expected = run(pipe)
    got = _with_runner(pipe, runner, lambda: run(pipe))
    np.testing.assert_allclose(got, expected, atol=IMAGE_ATOL, rtol=0)
    other = BypassSchedule.cosine(0.9, t_min=100)
    runner.set_schedule(other)  # the same session, a new table
    with bypass_kernels.patched(pipe, other):
        expected_other = run(pipe)
    got_other = _with_runner(pipe, runner, lambda: run(pipe))
    np.testing.assert_allclose(got_other, expected_other, atol=IMAGE_ATOL, rtol=0)
    assert np.abs(got_other - got).max() > 1e-3


# -- what diffusers' pipelines read from pipe.unet -----------------------------------------------------

PIPELINE_SOURCES = [
    "stable_diffusion/pipeline_stable_diffusion.py",
    "stable_diffusion/pipeline_stable_diffusion_img2img.py",
    "stable_diffusion_xl/pipeline_stable_diffusion_xl.py",
    "stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py",
    "controlnet/pipeline_controlnet.py",
    "controlnet/pipeline_controlnet_img2img.py",
    "controlnet/pipeline_controlnet_sd_xl.py",
]
# Read only by features an exported graph does not have (IP-Adapter image projection, FreeU,
# attention processors / LoRA); the pipelines touch them only when those features are enabled.
NOT_EXPORTED = {"encoder_hid_proj", "attn_processors", "set_attn_processor", "enable_freeu", "disable_freeu"}


def unet_attributes_read_by_pipelines() -> set[str]:
    folder = os.path.join(os.path.dirname(diffusers.__file__), "pipelines")
    chains = set()
    for name in PIPELINE_SOURCES:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read()
        for match in re.finditer(r"self\.unet((?:\.[A-Za-z_]\w*)+)(\s*\()?", text):
            chain = match.group(1)[1:]
            if match.group(2):  # a method call: keep the owner chain
                chain = chain.rpartition(".")[0] or chain
            chains.add(chain)
    return chains


def _settings(config) -> dict:
    # diffusers lists the defaulted keys from a set: their order changes from one process to the next
    out = dict(config)
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def test_every_attribute_the_pipelines_read_resolves(sd, sdxl):
    chains = unet_attributes_read_by_pipelines()
    assert {"config.in_channels", "config.sample_size", "add_embedding.linear_1.in_features", "dtype"} <= chains
    runners = {"sd": (sd[0].unet, OnnxRuntimeUNet(sd[1])), "sdxl": (sdxl[0].unet, OnnxRuntimeUNet(sdxl[1]))}
    for kind, (unet, runner) in runners.items():
        for chain in sorted(chains):
            if chain.split(".")[0] in NOT_EXPORTED or (kind == "sd" and chain.startswith("add_embedding")):
                continue
            want, got = unet, runner
            for part in chain.split("."):
                want, got = getattr(want, part), getattr(got, part)
            if chain == "config":  # the same settings (JSON turns tuples into lists)
                got, want = _settings(got), _settings(want)
                assert json.dumps(got, default=list) == json.dumps(want, default=list)
            elif not callable(want):
                assert got == want, (kind, chain, got, want)
    assert runners["sdxl"][1].add_embedding.linear_1.in_features == 80
    assert runners["sd"][1].config.cross_attention_dim == 32 and runners["sd"][1].config["in_channels"] == 4
    assert runners["sd"][1].dtype == torch.float32 and runners["sd"][1].device == torch.device("cpu")


# -- call conventions ----------------------------------------------------------------------------------


def test_positional_keyword_return_dict_and_timestep_forms(sd):
    pipe, path = sd
    runner = OnnxRuntimeUNet(path)
    unet = pipe.unet
    inputs = export_inputs(unet)
    sample, text = inputs["sample"], inputs["encoder_hidden_states"]
    with bypass_kernels.patched(unet, SCHEDULE):
        for t in (700, 700.5, torch.tensor(700.5), torch.tensor([700.5]), torch.tensor([700.5, 120.0])):
            vector = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
            expected = reference_output(unet, {**inputs, "timestep": vector})
            for got in (
                runner(sample, t, text).sample,
                runner(sample, t, text, return_dict=False)[0],
                runner(sample=sample, timestep=t, encoder_hidden_states=text, cross_attention_kwargs=None)[0],
                runner(sample, t, encoder_hidden_states=text, timestep_cond=None, added_cond_kwargs={}).sample,
            ):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    half = runner(sample.half(), 10, text.half(), return_dict=False)[0]
    assert half.dtype == torch.float16  # returned in the caller's dtype


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda r, s, t: r(s, 5, t, mid_block_additional_residual=torch.zeros(1)), TypeError, "ControlNet|mid_block"),
        (lambda r, s, t: r(s, 5, t, down_block_additional_residuals=(s,)), TypeError, "down_block_additional"),
        (lambda r, s, t: r(s, 5, t, timestep_cond=torch.zeros(2, 4)), TypeError, "timestep_cond"),
        (lambda r, s, t: r(s, 5, t, cross_attention_kwargs={"scale": 0.5}), TypeError, "cross_attention_kwargs"),
        (lambda r, s, t: r(s, 5), ValueError, "encoder_hidden_states: this graph needs it"),
        (lambda r, s, t: r(s, torch.tensor([1.0, 2.0, 3.0]), t), ValueError, r"timestep: expected .*\[batch = 2\]"),
        (lambda r, s, t: r(s, torch.zeros(2, 1), t), ValueError, "timestep"),
        (lambda r, s, t: r(s, "5", t), TypeError, "timestep"),
        (lambda r, s, t: r(s, 5, t[:1]), ValueError, "encoder_hidden_states: batch 1 differs"),
        (lambda r, s, t: r(s[:, :3], 5, t), ValueError, r"sample: the graph takes shape \['\?', 4, '\?', '\?'\]"),
        (lambda r, s, t: r(s, 5, t, None, None, None, None, None, None, None, None, None, True, 1), TypeError, "arg"),
        (lambda r, s, t: r(s, 5, t, added_cond_kwargs={"image_embeds": s}), TypeError, "image_embeds"),
        (lambda r, s, t: r.set_schedule(SCHEDULE), ValueError, "baked in"),
        # the graph's UNet halves its latents once: an odd size took another upsampler path than the one traced
        (lambda r, s, t: r(s[:, :, :15, :15], 5, t), ValueError, "multiples of 2"),
    ],
)
def test_argument_errors_are_clear(sd, call, exc, match):
    _, path = sd
    runner = OnnxRuntimeUNet(path)
    inputs = export_inputs(graph_unet("sd"))
    with pytest.raises(exc, match=match):
        call(runner, inputs["sample"], inputs["encoder_hidden_states"])


def test_sdxl_runner_needs_added_cond_and_a_table_of_the_right_length(sdxl):
    _, path = sdxl
    runner = OnnxRuntimeUNet(path)
    assert runner.schedule == SCHEDULE  # default: the schedule exported with
    inputs = export_inputs(graph_unet("sdxl"))
    with pytest.raises(ValueError, match=r"added_cond_kwargs: this graph .* needs text_embeds, time_ids"):
        runner(inputs["sample"], 5, inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="table of 1000 values"):
        runner.set_schedule(torch.zeros(999))
    with pytest.raises(ValueError, match="NaN or infinite"):
        runner.set_schedule(torch.full((1000,), float("nan")))
    with pytest.raises(TypeError, match="BypassSchedule or a tensor"):
        runner.set_schedule("linear")
    assert SCHEDULE_NAME in runner.input_shapes


def test_config_sources(sd, tmp_path):
    _, path = sd
    assert OnnxRuntimeUNet(path, config={"in_channels": 4, "sample_size": 16}).config.sample_size == 16
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    runner = OnnxRuntimeUNet(path, session_options=options)
    assert runner.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(FileNotFoundError, match="no graph"):
        OnnxRuntimeUNet(str(tmp_path / "missing.onnx"))
    with pytest.raises(TypeError, match="config"):
        OnnxRuntimeUNet(path, config=3)
