"""The Triton Inference Server model repository: every config.pbtxt parses as Triton's ModelConfig, and a real
tritonserver (nvidia-pytriton's binary, python backend, on 127.0.0.1) loads the repository and serves
concurrent requests with different schedules, joined into one denoiser batch, each equal to a single
PyTorch run of the patched pipeline.

The server's environment is built once with pip (tests/triton_server.py); where it cannot be built the
server tests skip, unless BYPASS_KERNELS_REQUIRE_TRITON=1 (CI) makes that a failure.
"""

import importlib.util
import json
import os
import threading

import numpy as np
import pytest
import tiny_pipelines
import torch
from bypass_kernels.export import default_profile
from bypass_kernels.export.triton_repo import check_config, denoiser_config, write_model_repository

from bypass_kernels import BypassSchedule, patch, set_schedule

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

STEPS, GUIDANCE = 3, 4.0
# (schedule sent, how): a spec parsed by the server, a table, the repository's default (none sent)
REQUESTS = [
    ("linear:0.8:300", "spec"),
    ("constant:0.5", "table"),
    ("off", "spec"),
    ("linear:0.3:500", "default"),
]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    pipe = tiny_pipelines.sd_pipeline(folder)
    patch(pipe, BypassSchedule.parse("linear:0.3:500"))
    return pipe, folder


@pytest.fixture(scope="module")
def repository(sd):
    """Written by the command, from the preset the pipeline's UNet is (tiny-sd) and its scheduler (DDIM)."""
    from bypass_kernels.cli import main

    _, folder = sd
    args = ["triton-repo", "--model", "tiny-sd", "--out", str(folder / "repo"), "--backend", "python", "--no-check"]
    args += ["--schedule", "linear:0.3:500", "--steps", str(STEPS), "--guidance", str(GUIDANCE)]
    args += ["--queue-delay-us", "200000", "--pipeline-instances", "2"]  # two loops' steps meet in one batch
    assert main(args) == 0
    return str(folder / "repo")


def _read(*parts) -> str:
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


def test_every_config_parses_as_triton_model_config(repository):
    assert sorted(os.listdir(repository)) == ["pipeline", "unet"]
    unet = check_config(_read(repository, "unet", "config.pbtxt"))
    assert unet.backend == "python" and unet.max_batch_size == 8
    assert unet.dynamic_batching.max_queue_delay_microseconds == 200_000
    inputs = {i.name: i for i in unet.input}
    assert list(inputs["bypass_schedule"].dims) == [1000]  # [batch, T]: a schedule per request
    assert list(inputs["timestep"].dims) == [1] and list(inputs["timestep"].reshape.shape) == []
    assert list(inputs["sample"].dims) == [4, -1, -1] and list(inputs["encoder_hidden_states"].dims) == [-1, 32]
    pipeline = check_config(_read(repository, "pipeline", "config.pbtxt"))
    assert pipeline.max_batch_size == 0 and pipeline.instance_group[0].count == 2
    optional = {i.name for i in pipeline.input if i.optional}
    assert {i.name for i in pipeline.input} - optional == {"encoder_hidden_states"}


def test_onnxruntime_and_tensorrt_configs_parse_and_follow_the_graph(repository):
    graph = os.path.join(repository, "unet", "1", "model.onnx")
    ort = check_config(denoiser_config(graph, name="unet", backend="onnxruntime", max_batch_size=16, instances=2))
    assert ort.platform == "onnxruntime_onnx" and ort.default_model_filename == "model.onnx"
    assert ort.max_batch_size == 16 and ort.instance_group[0].count == 2
    profile = default_profile(graph, batch=(1, 2, 8), resolution=(64, 128, 256), text_len=8)
    trt = check_config(denoiser_config(graph, name="unet", backend="tensorrt", profile=profile))
    assert trt.platform == "tensorrt_plan" and trt.default_model_filename == "model.plan"
    inputs = {i.name: list(i.dims) for i in trt.input}
    assert inputs["encoder_hidden_states"] == [8, 32] and inputs["sample"] == [4, -1, -1]  # fixed where min = max
    with pytest.raises(ValueError, match="above the engine's largest batch 8"):
        denoiser_config(graph, name="unet", backend="tensorrt", profile=profile, max_batch_size=9)
    with pytest.raises(ValueError, match="pass the engine's profile"):
        denoiser_config(graph, name="unet", backend="tensorrt")


def test_a_graph_without_a_schedule_per_sample_is_refused(repository, tmp_path):
    import onnx

    graph = onnx.load(os.path.join(repository, "unet", "1", "model.onnx"), load_external_data=False)
    (table,) = [i for i in graph.graph.input if i.name == "bypass_schedule"]
    del table.type.tensor_type.shape.dim[0]  # [T]: one schedule for the batch (schedule_as_input=True)
    onnx.save(graph, str(tmp_path / "shared.onnx"))
    with pytest.raises(ValueError, match=r"input 'bypass_schedule' .* export with per_sample=True"):
        denoiser_config(str(tmp_path / "shared.onnx"), name="unet")


def test_refusals_name_the_way_out(sd, tmp_path):
    pipe, _ = sd
    with pytest.raises(ValueError, match="backend: expected one of onnxruntime, python, tensorrt"):
        write_model_repository(pipe, str(tmp_path / "r"), backend="onnx")
    with pytest.raises(ValueError, match="resolution: engine shape ranges need backend='tensorrt'"):
        write_model_repository(pipe, str(tmp_path / "r"), resolution=512)
    with pytest.raises(ValueError, match="pipeline: no scheduler: pass scheduler="):
        write_model_repository(pipe.unet, str(tmp_path / "r"), pipeline=True)
    from bypass_kernels.presets import build_transformer

    with pytest.raises(ValueError, match="pipeline: the loop drives UNets; serve this DiT's transformer model"):
        write_model_repository(build_transformer("tiny-flux"), str(tmp_path / "r"), pipeline=True, scheduler=object())
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_model_repository(pipe, str(tmp_path / "taken"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing half-written left beside it


def _server_env():
    import triton_server

    try:
        triton_server.ensure_env()
    except Exception as exc:  # no package index: the server cannot be installed here
        if os.environ.get("BYPASS_KERNELS_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(f"the tritonserver environment could not be built: {exc}")
    return triton_server


def _reference(pipe, embeds, negative, schedule, seed):
    set_schedule(pipe, BypassSchedule.parse(schedule))
    try:
        out = pipe(
            prompt_embeds=torch.from_numpy(embeds)[None],
            negative_prompt_embeds=torch.from_numpy(negative)[None],
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    finally:
        set_schedule(pipe, BypassSchedule.parse("linear:0.3:500"))
    return out.images[0].numpy()


def _inputs(http, arrays: dict):
    inputs = []
    for name, array in arrays.items():
        item = http.InferInput(name, list(array.shape), http.np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def test_a_real_tritonserver_batches_requests_with_different_schedules(sd, repository, tmp_path):
    import tritonclient.http as http

    triton_server = _server_env()
    pipe, _ = sd
    rng = np.random.default_rng(0)
    negative = rng.standard_normal((8, 32), dtype=np.float32)
    requests = []
    for index, (spec, how) in enumerate(REQUESTS):
        arrays = {
            "encoder_hidden_states": rng.standard_normal((8, 32), dtype=np.float32),
            "negative_encoder_hidden_states": negative,
            "seed": np.array([index + 1], dtype=np.int64),
        }
        if how == "spec":
            arrays["bypass_spec"] = np.array([spec.encode()], dtype=np.object_)
        elif how == "table":
            arrays["bypass_schedule"] = BypassSchedule.parse(spec).table().numpy()
        requests.append(arrays)
    results, errors = [None] * len(requests), []
    with triton_server.running_server(repository, str(tmp_path)) as url:
        barrier = threading.Barrier(len(requests))

        def client(index):
            try:
                with http.InferenceServerClient(url, network_timeout=300.0) as connection:
                    barrier.wait(timeout=60)
                    answer = connection.infer("pipeline", _inputs(http, requests[index]), timeout=300)
                    results[index] = answer.as_numpy("latents")
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=360)
        with http.InferenceServerClient(url) as connection:
            wrong_length = dict(requests[1], bypass_schedule=np.zeros(10, dtype=np.float32))
            with pytest.raises(Exception, match=r"'bypass_schedule'.*Expected \[1000\], got \[10\]"):
                connection.infer("pipeline", _inputs(http, wrong_length))  # Triton checks the shape
            unguided = {k: v for k, v in requests[0].items() if k != "negative_encoder_hidden_states"}
            with pytest.raises(Exception, match="guidance_scale > 1 needs negative_encoder_hidden_states"):
                connection.infer("pipeline", _inputs(http, unguided))  # the loop's own check, the model stays up
            stats = connection.get_inference_statistics("unet")["model_stats"][0]
    assert not errors, errors
    # the denoiser ran batches joining several requests (2 rows each: classifier-free guidance)
    batch_sizes = {entry["batch_size"] for entry in stats["batch_stats"]}
    assert max(batch_sizes) > 2, stats["batch_stats"]
    expected = [
        _reference(pipe, r["encoder_hidden_states"], negative, spec, i + 1)
        for i, (r, (spec, _)) in enumerate(zip(requests, REQUESTS, strict=True))
    ]
    for got, want in zip(results, expected, strict=True):
        assert got.shape == want.shape == (4, 16, 16)
        assert np.abs(got - want).max() / np.abs(want).max() < 2e-5  # ONNX Runtime against PyTorch
    # the schedules matter: the same request under another schedule is far from its result
    other = _reference(pipe, requests[0]["encoder_hidden_states"], negative, "off", 1)
    assert np.abs(other - expected[0]).max() / np.abs(expected[0]).max() > 1e-2


def test_the_command_writes_the_loops_defaults_and_refuses_before_exporting(repository, tmp_path, capsys):
    from bypass_kernels.cli import main

    settings = json.loads(_read(repository, "pipeline", "1", "pipeline.json"))
    assert settings["num_inference_steps"] == STEPS and settings["guidance_scale"] == GUIDANCE
    assert settings["schedule"]["strength"] == 0.3 and len(settings["bypass_schedule"]) == 1000
    scheduler = json.loads(_read(repository, "pipeline", "1", "scheduler_config.json"))
    assert scheduler["_class_name"] == "DDIMScheduler"  # as StableDiffusionPipeline corrects it:
    assert scheduler["clip_sample"] is False and scheduler["steps_offset"] == 1
    (tmp_path / "repo").mkdir()
    args = ["triton-repo", "--model", "tiny-sd", "--out", str(tmp_path / "repo")]
    assert main([*args, "--scheduler", "Foo"]) == 2
    assert "--scheduler: 'Foo' is not a diffusers scheduler class" in capsys.readouterr().err
    assert main(args) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is None:  # refused before any export
        assert main([*args, "--backend", "tensorrt", "--resolution", "64", "--overwrite"]) == 2
        assert "TensorRT is not installed here" in capsys.readouterr().err
    assert main([*args, "--resolution", "64", "--overwrite"]) == 2
    assert "needs --backend tensorrt" in capsys.readouterr().err
