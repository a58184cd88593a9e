"""ONNX export of patched tiny SD3, Flux and PixArt transformers, checked in ONNX Runtime; the ONNX
Runtime stand-in for ``pipe.transformer``; TensorRT shape profiles from the graphs' named dimensions."""

import pytest
import tiny_transformers as tt
import torch
from bypass_kernels.export.profiles import default_profile
from bypass_kernels.export.transformers import OnnxRuntimeTransformer, export_inputs, reference_output, to_onnx

from bypass_kernels import BypassSchedule, patch

pytest.importorskip("onnxruntime")
SCHEDULE = BypassSchedule.linear(0.8, t_min=200)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """One export per family: SD3 and PixArt with the schedule baked in, Flux with it as an input.
    The Flux graph is of a tiny FluxPipeline's own transformer (text length 32), which
    test_an_onnxruntime_transformer_serves_a_flux_pipeline runs with the graph as pipe.transformer.
    Each model has the fewest blocks that hold the span (0, 1) and what follows it: SD3's last joint
    block (text-free), Flux's single-stream block, PixArt's none (an export's time grows with its blocks)."""
    from tiny_pipelines import flux_pipeline

    folder = tmp_path_factory.mktemp("graphs")
    out = {}
    for name in ("sd3", "flux", "pixart"):
        options = {}
        if name == "flux":
            out["flux_pipe"] = flux_pipeline(folder, num_single_layers=1)
            model, options = out["flux_pipe"].transformer, dict(schedule_as_input=True, text_len=32)
        elif name == "sd3":
            model = tt.build(name, num_layers=3)  # the span's two joint blocks, then SD3's last (text-free) one
        else:
            model = tt.build(name, num_layers=2)
        patch(model, SCHEDULE, span=(0, 1))
        result = to_onnx(model, str(folder / f"{name}.onnx"), **options)
        out[name] = (model, result)
    return out


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_the_graph_equals_the_patched_model_in_onnxruntime(graphs, name):
    model, result = graphs[name]
    assert result.max_error is not None and result.max_error <= 1e-4  # checked at ties, ends, per sample
    runner = OnnxRuntimeTransformer(result.path)
    named = export_inputs(model, batch=3, text_len=5)  # another batch and text length than exported
    units = 1e-3 if name == "flux" else 1.0
    named["timestep"] = torch.tensor([950.0, 420.5, 60.0]) * units
    expected = reference_output(model, {**named, **({"bypass_schedule": SCHEDULE.table()} if name == "flux" else {})})
    got = runner(**named, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    plain = reference_output(model, {**named, "bypass_schedule": torch.zeros(1000)})  # λ = 0: the model itself
    assert not torch.allclose(got, plain, atol=1e-3)  # the bypass is in the graph


def test_dimensions_are_named_and_the_metadata_says_what_was_exported(graphs):
    from bypass_kernels.export.onnx_export import graph_metadata

    flux = OnnxRuntimeTransformer(graphs["flux"][1].path)
    assert flux.input_shapes["hidden_states"][:2] == ["batch", "image_tokens"]
    assert flux.input_shapes["img_ids"][0] == "image_tokens" and flux.input_shapes["txt_ids"][0] == "sequence"
    assert flux.input_shapes["bypass_schedule"] == [1000]
    sd3 = OnnxRuntimeTransformer(graphs["sd3"][1].path)
    assert sd3.input_shapes["hidden_states"][2:] == ["latent_height", "latent_width"]
    meta = graph_metadata(graphs["sd3"][1].path)
    assert meta["family"] == "SD3Transformer2DModel" and BypassSchedule.parse(meta["schedule"]) == SCHEDULE


def test_a_schedule_input_takes_any_table(graphs):
    model, result = graphs["flux"]
    runner = OnnxRuntimeTransformer(result.path)
    other = BypassSchedule.constant(0.5)
    runner.set_schedule(other)
    named = export_inputs(model, batch=2)
    named["timestep"] = torch.tensor([0.9, 0.4])
    expected = reference_output(model, {**named, "bypass_schedule": other.table()})
    torch.testing.assert_close(runner(**named, return_dict=False)[0], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="baked in"):
        OnnxRuntimeTransformer(graphs["sd3"][1].path).set_schedule(other)


def test_the_runner_refuses_what_the_graph_has_no_input_for(graphs):
    runner = OnnxRuntimeTransformer(graphs["sd3"][1].path)
    named = export_inputs(graphs["sd3"][0], batch=1)
    with pytest.raises(TypeError, match="block_controlnet_hidden_states"):
        runner(**named, block_controlnet_hidden_states=[torch.zeros(1)])
    with pytest.raises(TypeError, match="missing graph inputs: pooled_projections"):
        runner(**{k: v for k, v in named.items() if k != "pooled_projections"})


def test_tensorrt_profiles_follow_the_named_dimensions(graphs):
    flux = default_profile(
        graphs["flux"][1].path, batch=(1, 1, 4), resolution=(512, 1024, 2048), text_len=(64, 512, 512)
    )
    assert flux["hidden_states"] == ((1, 1024, 16), (1, 4096, 16), (4, 16384, 16))  # (pixels/16)^2 tokens
    assert flux["img_ids"] == ((1024, 3), (4096, 3), (16384, 3))
    assert flux["encoder_hidden_states"][2] == (4, 512, 32) and flux["txt_ids"][1] == (512, 3)
    assert flux["timestep"] == ((1,), (1,), (4,)) and "bypass_schedule" not in flux
    sd3 = default_profile(graphs["sd3"][1].path, batch=2, resolution=(512, 1024, 1024))
    assert sd3["hidden_states"] == ((2, 4, 64, 64), (2, 4, 128, 128), (2, 4, 128, 128))
    with pytest.raises(ValueError, match="image_tokens"):
        default_profile(graphs["sd3"][1].path, image_tokens=16)


def test_an_onnxruntime_transformer_serves_a_flux_pipeline(graphs):
    from tiny_pipelines import DIT_CALL

    pipe, (_, result) = graphs["flux_pipe"], graphs["flux"]  # its transformer patched, span (0, 1)

    def images():
        with torch.no_grad():
            return pipe(
                "a cat",
                num_inference_steps=3,
                height=32,
                width=32,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
                **DIT_CALL["flux"],
            ).images

    expected = images()
    patched_transformer = pipe.transformer
    pipe.transformer = OnnxRuntimeTransformer(result.path, schedule=SCHEDULE)  # the table is a graph input
    try:
        got = images()
    finally:
        pipe.transformer = patched_transformer
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_unsupported_family_is_refused_before_any_file(tmp_path):
    model = tt.build("wan")
    with pytest.raises(TypeError, match="WanTransformer3DModel has no transformer export"):
        to_onnx(model, str(tmp_path / "wan.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_a_dynamic_batch_is_traced_with_at_least_two_samples(tmp_path):
    """torch.export fixes a dynamic batch traced at 1 to 1: refused before anything is written."""
    model = tt.build("pixart")
    with pytest.raises(ValueError, match="traced with 2 to"):
        to_onnx(model, str(tmp_path / "p.onnx"), SCHEDULE, batch=1)
    assert list(tmp_path.iterdir()) == []
