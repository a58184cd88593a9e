"""Graphs with a schedule per sample (``per_sample=True``): the schedule input is [batch, T] on the sample's
batch dimension (Flux's ids too), the ONNX Runtime runners take a list of schedules, a pipeline run
through them equals the PyTorch model under per_sample, and TensorRT profiles give the table its batch."""

import importlib.util

import onnx
import pytest
import tiny_pipelines
import torch
from bypass_kernels.export import OnnxRuntimeTransformer, OnnxRuntimeUNet, default_profile, to_onnx
from bypass_kernels.export.onnx_export import SCHEDULE_NAME
from bypass_kernels.export.triton_repo import check_config, denoiser_config
from tiny_models import graph_unet

from bypass_kernels import BypassSchedule, patch, per_sample

pytest.importorskip("onnxruntime")

SCHEDULES = [BypassSchedule.constant(0.0), BypassSchedule.linear(0.8, t_min=300), BypassSchedule.constant(0.5)]
PROMPTS = ["a red square", "a blue circle", "a green cross"]


def input_dims(path):
    model = onnx.load(path, load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def generate(pipe, **kwargs):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = pipe(PROMPTS, height=32, width=32, num_inference_steps=3, generator=gens, output_type="latent", **kwargs)
    return out.images


def close_to(got, expected):
    return float((got - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.fixture(scope="module")
def sd_per_sample(tmp_path_factory):
    """An SD pipeline whose UNet is patched and exported with a schedule per sample."""
    folder = tmp_path_factory.mktemp("per_sample")
    pipe = tiny_pipelines.sd_pipeline(folder)
    pipe.unet = graph_unet("sd")
    patch(pipe)
    return pipe, to_onnx(pipe.unet, str(folder / "unet.onnx"), per_sample=True)


def test_a_unet_graph_with_a_schedule_per_sample_runs_a_pipeline_batch_as_pytorch(sd_per_sample, sdxl_graph):
    pipe, result = sd_per_sample
    assert result.per_sample and result.max_error < 1e-4
    dims = input_dims(result.path)
    assert dims[SCHEDULE_NAME] == ["batch", 1000] and dims["sample"][0] == "batch"
    unet = pipe.unet
    with per_sample(pipe, SCHEDULES):
        expected = generate(pipe, guidance_scale=4.0)  # classifier-free guidance: a batch of 6 rows
    shared = generate(pipe, guidance_scale=4.0)
    runner = OnnxRuntimeUNet(result.path)
    pipe.unet = runner
    try:
        runner.set_schedule(SCHEDULES)
        assert close_to(generate(pipe, guidance_scale=4.0), expected)
        runner.set_schedule(pipe_schedule := BypassSchedule.linear(0.3, t_min=500))  # one schedule for every row
        assert pipe_schedule == runner.schedule and close_to(generate(pipe, guidance_scale=4.0), shared)
        runner.set_schedule(SCHEDULES[:2])
        with pytest.raises(ValueError, match="2 schedules for a model call of batch 6"):
            generate(pipe, guidance_scale=4.0)
    finally:
        pipe.unet = unet
    # a graph whose schedule is shared ([T]) takes no list
    with pytest.raises(ValueError, match="per_sample=True"):
        OnnxRuntimeUNet(sdxl_graph["path"]).set_schedule(torch.stack([s.table() for s in SCHEDULES]))


def test_tensorrt_profiles_give_the_schedule_its_batch_dimension(sd_per_sample):
    profile = default_profile(sd_per_sample[1].path, batch=(1, 2, 8), resolution=(32, 32, 64), text_len=8)
    assert profile[SCHEDULE_NAME] == ((1, 1000), (2, 1000), (8, 1000))
    assert [shape[0] for shape in profile["sample"]] == [1, 2, 8]


def test_dit_graphs_with_a_schedule_per_sample_batch_every_input(tmp_path):
    """Every input a serving engine batches has the batch dimension, Flux's img_ids and txt_ids included (SD3
    and PixArt graphs export with the same wrapper: checked by hand, 2026-12-08)."""
    name = "flux"
    pipe = tiny_pipelines.DIT_PIPELINES[name](tmp_path)
    patch(pipe)
    result = to_onnx(pipe.transformer, str(tmp_path / "t.onnx"), per_sample=True)
    dims = input_dims(result.path)
    assert all(shape[0] == "batch" for shape in dims.values()), dims
    call = tiny_pipelines.DIT_CALL[name]
    with per_sample(pipe, SCHEDULES):
        expected = generate(pipe, **call)
    runner = OnnxRuntimeTransformer(result.path)
    runner.set_schedule(SCHEDULES)
    pipe.transformer = runner
    assert close_to(generate(pipe, **call), expected)
    if importlib.util.find_spec("tritonclient") is not None:  # the graph as a Triton model: requests join on the batch
        config = check_config(denoiser_config(result.path, name="transformer"))
        inputs = {i.name: i for i in config.input}
        assert {"hidden_states", "img_ids", "txt_ids", SCHEDULE_NAME} <= set(inputs)
        assert list(inputs["img_ids"].dims) == [-1, 3] and list(inputs["timestep"].reshape.shape) == []
