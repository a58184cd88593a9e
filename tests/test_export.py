"""ONNX export with the schedule baked in, checked with ONNX Runtime; TensorRT where it exists."""

import importlib.util
import os
import warnings

import pytest
import torch
from bypass_kernels.export import (
    SCHEDULE_NAME,
    export_inputs,
    max_relative_error,
    onnxruntime_session,
    reference_output,
    run_onnx,
    to_onnx,
)
from conftest import HAS_CUDA

import bypass_kernels
from bypass_kernels import BypassSchedule
from bypass_kernels.cli import main
from bypass_kernels.presets import build_unet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCHEDULE = BypassSchedule.linear(0.8, t_min=300)
# fractional, x.5 ties, out of range, mixed per-sample, one for the whole batch
TIMESTEPS = ([999.0, 500.0], [700.5], [498.5, 499.5], [2000.0, -5.0], [333.3, 0.4], [1.5])
STANDARD_BLEND_OPS = {"Round", "Clip", "Cast", "Gather", "Sub", "Mul", "Add", "Reshape", "Unsqueeze"}


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory):
    unet = build_unet("tiny-sd")
    bypass_kernels.patch(unet, SCHEDULE)  # a patched model exports with its own schedule
    before = [(n, p.clone()) for n, p in unet.state_dict().items()]
    path = str(tmp_path_factory.mktemp("sd") / "unet.onnx")
    result = to_onnx(unet, path)
    return dict(unet=unet, path=path, result=result, before=before)


def _compare(unet, path, inputs, timesteps, tol=1e-4):
    err = max_relative_error(onnxruntime_session(path), unet, inputs, timesteps)
    assert err <= tol, err


def test_graph_is_valid_and_named_like_the_tensorrt_demo(sd_export):
    model = onnx.load(sd_export["path"])
    onnx.checker.check_model(sd_export["path"])
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in model.graph.output] == ["latent"]
    timestep = inputs["timestep"].type.tensor_type
    assert timestep.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in timestep.shape.dim] == ["timestep_count"]
    assert inputs["sample"].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_schedule_is_a_float32_initializer_read_by_round_clip_cast_gather(sd_export):
    model = onnx.load(sd_export["path"])
    init = {i.name: i for i in model.graph.initializer}[SCHEDULE_NAME]
    assert init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == [1000]
    table = torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    assert torch.equal(table, SCHEDULE.table())
    producers = {out: node for node in model.graph.node for out in node.output}
    gathers = [n for n in model.graph.node if n.input and n.input[0] == SCHEDULE_NAME]
    assert [g.op_type for g in gathers] == ["Gather"]
    chain, name = [], gathers[0].input[1]
    while name in producers and len(chain) < 6:
        chain.append(producers[name].op_type)
        name = producers[name].input[0]
    ops = [op for op in chain if op not in ("Reshape", "Unsqueeze", "Squeeze")]
    assert ops[:3] == ["Cast", "Clip", "Round"], chain
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard operators only
    meta = {p.key: p.value for p in model.metadata_props}
    assert BypassSchedule.parse(meta["bypass_kernels.schedule"]) == SCHEDULE


def test_onnxruntime_matches_patched_pytorch(sd_export):
    unet = sd_export["unet"]
    _compare(unet, sd_export["path"], export_inputs(unet), TIMESTEPS)


def test_export_leaves_the_model_as_it_was(sd_export):
    unet = sd_export["unet"]
    assert bypass_kernels.get_schedule(unet) == SCHEDULE
    assert unet._bypass.backend == "auto"
    for (name, before), (_, after) in zip(sd_export["before"], unet.state_dict().items(), strict=True):
        assert torch.equal(before, after), name


def test_sdxl_schedule_as_input_serves_any_table(tmp_path):
    unet = build_unet("tiny-sdxl")
    path = str(tmp_path / "xl.onnx")
    result = to_onnx(unet, path, SCHEDULE, schedule_as_input=True)
    assert result.input_names == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
        SCHEDULE_NAME,
    ]
    assert not bypass_kernels.is_patched(unet)
    model = onnx.load(path)
    assert SCHEDULE_NAME not in {i.name for i in model.graph.initializer}
    bypass_kernels.patch(unet, SCHEDULE)
    inputs = export_inputs(unet)
    other = BypassSchedule.cosine(1.0, t_min=100)
    for table in (SCHEDULE.table(), other.table(), torch.zeros(1000)):
        _compare(unet, path, {**inputs, SCHEDULE_NAME: table}, TIMESTEPS[:3])
    session = onnxruntime_session(path)
    named = {**inputs, "timestep": torch.tensor([999.0])}
    a = run_onnx(session, {**named, SCHEDULE_NAME: SCHEDULE.table()})
    b = run_onnx(session, {**named, SCHEDULE_NAME: other.table()})
    assert (a - b).abs().max() > 1e-3  # the run-time table changes the result


def test_fp16_graph_keeps_a_float32_timestep(tmp_path):
    unet = build_unet("tiny-sd")
    path = str(tmp_path / "h.onnx")
    with pytest.warns(UserWarning, match="default_schedule"):
        to_onnx(unet, path, fp16=True)  # unpatched, no schedule: the default, with a warning
    model = onnx.load(path)
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types == {
        "sample": onnx.TensorProto.FLOAT16,
        "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT16,
    }
    table = {i.name: i for i in model.graph.initializer}[SCHEDULE_NAME]
    assert table.data_type == onnx.TensorProto.FLOAT
    assert next(unet.parameters()).dtype == torch.float32 and not bypass_kernels.is_patched(unet)
    bypass_kernels.patch(unet)
    # fp32 inputs: run_onnx casts them to the fp16 the graph declares; the timestep stays float32.
    assert max_relative_error(onnxruntime_session(path), unet, export_inputs(unet), TIMESTEPS[:3]) < 2e-2


@pytest.mark.parametrize(
    ("make", "kwargs", "exc", "match"),
    [
        (lambda: torch.nn.Linear(2, 2), {}, TypeError, "no mid-block"),
        (lambda: build_unet("tiny-sd"), {"opset": 11}, ValueError, "opset"),
        (lambda: build_unet("tiny-sd"), {"schedule": "linear"}, TypeError, "schedule"),
    ],
)
def test_bad_input_leaves_no_file(tmp_path, make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        to_onnx(make(), str(tmp_path / "m.onnx"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_missing_folder_and_existing_file(tmp_path):
    unet = build_unet("tiny-sd")
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(unet, str(tmp_path / "nope" / "m.onnx"), SCHEDULE)
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        to_onnx(unet, str(existing), SCHEDULE)
    assert existing.read_bytes() == b"keep" and os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            to_onnx(build_unet("tiny-sd"), str(tmp_path / "m.onnx"), SCHEDULE)
    finally:
        tmp_path.chmod(0o700)


class ShapeChangingMid(torch.nn.Module):
    def forward(self, hidden_states, emb=None):
        return torch.cat([hidden_states, hidden_states], dim=1)[:, : hidden_states.shape[1] - 1]


def test_failure_during_export_leaves_no_partial_file(tmp_path):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.mid_block = ShapeChangingMid()
            self.config = type("C", (), {"sample_size": 8, "in_channels": 4, "get": lambda self, k, d=None: d})()

        def forward(self, sample, timestep, return_dict=False, **kwargs):
            return (self.mid_block(self.conv(sample)),)

    with pytest.raises(Exception), warnings.catch_warnings():  # noqa: B017 (the exporter wraps the error)
        warnings.simplefilter("ignore")
        to_onnx(Toy(), str(tmp_path / "m.onnx"), SCHEDULE)
    assert os.listdir(tmp_path) == []


def test_cli_export_unconditional_unet(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--model", "tiny-unet2d", "--out", str(out), "--schedule", "cosine:0.5:200"]) == 0
    text = capsys.readouterr().out
    assert "[1/4]" in text and "[4/4]" in text and "max relative error" in text
    assert sorted(os.listdir(out)) == ["bypass_schedule.json", "config.json", "unet.onnx", "unet.onnx.data"]
    model = onnx.load(str(out / "unet.onnx"))
    assert [i.name for i in model.graph.input] == ["sample", "timestep"]
    assert main(["export", "--model", "tiny-unet2d", "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_export_bad_folder(capsys):
    assert main(["export", "--model", "tiny-sd", "--out", "/proc/bypass_kernels_cannot_write_here"]) == 2
    assert "--out" in capsys.readouterr().err


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TENSORRT and HAS_CUDA), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_engine_matches_pytorch(sd_export, tmp_path, cuda_graph):
    import json

    from bypass_kernels.export import TensorRTUNet, build_engine

    unet = sd_export["unet"]
    engine = build_engine(
        sd_export["path"],
        str(tmp_path / "unet.plan"),
        fp16=False,
        min_shapes={"sample": (1, 4, 8, 8)},
        opt_shapes={"sample": (2, 4, 16, 16)},
        max_shapes={"sample": (4, 4, 32, 32)},
    )
    (tmp_path / "config.json").write_text(json.dumps(dict(unet.config), default=list))
    runner = TensorRTUNet(engine, cuda_graph=cuda_graph)
    inputs = export_inputs(unet)
    for t in TIMESTEPS:
        named = {**inputs, "timestep": torch.tensor(t)}
        expected = reference_output(unet, named)
        got = runner(named["sample"].cuda(), named["timestep"].cuda(), named["encoder_hidden_states"].cuda()).sample
        err = float((got.cpu() - expected).abs().max() / expected.abs().max())
        assert err < 1e-3, (t, err)
