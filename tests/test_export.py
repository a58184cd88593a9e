"""ONNX export with the schedule baked in, checked with ONNX Runtime; TensorRT where it exists."""

import importlib.util
import json
import os
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from bypass_kernels.export import to_onnx
from bypass_kernels.export.onnx_export import (
    SCHEDULE_NAME,
    VIDEO_UNETS,
    export_inputs,
    max_relative_error,
    onnxruntime_session,
    reference_output,
    run_onnx,
)
from conftest import GRAPH_SCHEDULE, HAS_CUDA
from tiny_models import one_level_sd

import bypass_kernels
from bypass_kernels import BypassSchedule
from bypass_kernels.cli import main
from bypass_kernels.presets import build_unet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCHEDULE = GRAPH_SCHEDULE  # the schedule of the shared graphs (sd_graph, sdxl_graph in conftest)
# fractional, x.5 ties, out of range, mixed per-sample, one for the whole batch
TIMESTEPS = ([999.0, 500.0], [700.5], [498.5, 499.5], [2000.0, -5.0], [333.3, 0.4], [1.5])
STANDARD_BLEND_OPS = {"Round", "Clip", "Cast", "Gather", "Sub", "Mul", "Add", "Reshape", "Unsqueeze"}


def _compare(unet, path, inputs, timesteps, tol=1e-4):
    err = max_relative_error(onnxruntime_session(path), unet, inputs, timesteps)
    assert err <= tol, err


def test_graph_is_valid_and_named_like_the_tensorrt_demo(sd_graph):
    model = onnx.load(sd_graph["path"])
    onnx.checker.check_model(sd_graph["path"])
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in model.graph.output] == ["latent"]
    timestep = inputs["timestep"].type.tensor_type
    assert timestep.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in timestep.shape.dim] == ["timestep_count"]
    assert inputs["sample"].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_schedule_is_a_float32_initializer_read_by_round_clip_cast_gather(sd_graph):
    model = onnx.load(sd_graph["path"])
    init = {i.name: i for i in model.graph.initializer}[SCHEDULE_NAME]
    assert init.data_type == onnx.TensorProto.FLOAT and list(init.dims) == [1000]
    table = torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    assert torch.equal(table, SCHEDULE.table())
    producers = {out: node for node in model.graph.node for out in node.output}
    gathers = [n for n in model.graph.node if n.input and n.input[0] == SCHEDULE_NAME]
    assert [g.op_type for g in gathers] == ["Gather"]
    chain, name = [], gathers[0].input[1]
    while name in producers and len(chain) < 8:
        chain.append(producers[name].op_type)
        name = producers[name].input[0]
    ops = [op for op in chain if op not in ("Reshape", "Unsqueeze", "Squeeze")]
    assert ops[:3] == ["Cast", "Clip", "Round"], chain
    # The NaN rule (index 0) in the graph too: Round reads Where(IsNaN(t), 0, t).
    where = producers[producers[producers[gathers[0].input[1]].input[0]].input[0]]
    while where.op_type in ("Round", "Reshape", "Unsqueeze", "Squeeze", "Clip", "Cast"):
        where = producers[where.input[0]]
    assert where.op_type == "Where" and producers[where.input[0]].op_type == "IsNaN", chain
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard operators only
    meta = {p.key: p.value for p in model.metadata_props}
    assert BypassSchedule.parse(meta["bypass_kernels.schedule"]) == SCHEDULE


def test_onnxruntime_matches_patched_pytorch(sd_graph):
    unet = sd_graph["unet"]
    _compare(unet, sd_graph["path"], export_inputs(unet), TIMESTEPS)


def test_export_leaves_the_model_as_it_was(tmp_path, static_export):
    unet = _mini_unet2d()
    bypass_kernels.patch(unet, SCHEDULE)
    before = [(n, p.clone()) for n, p in unet.state_dict().items()]
    to_onnx(unet, str(tmp_path / "m.onnx"), **STATIC)
    assert bypass_kernels.get_schedule(unet) == SCHEDULE
    assert unet._bypass.backend == "auto"
    for (name, was), (_, now) in zip(before, unet.state_dict().items(), strict=True):
        assert torch.equal(was, now), name
    plain, _ = static_export  # exported with a schedule given to it, unpatched
    assert not bypass_kernels.is_patched(plain)


def test_sdxl_schedule_as_input_serves_any_table(sdxl_graph):
    unet, path, result = sdxl_graph["unet"], sdxl_graph["path"], sdxl_graph["result"]
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
    bypass_kernels.unpatch(unet)


def test_fp16_graph_keeps_a_float32_timestep(tmp_path):
    unet = one_level_sd()  # quick to export
    path = str(tmp_path / "h.onnx")
    with pytest.warns(UserWarning, match="default_schedule"):  # (fixed height and width: a quicker export)
        to_onnx(unet, path, fp16=True, dynamic_shape=False)  # unpatched, no schedule: the default, with a warning
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
        (lambda: torch.nn.Linear(2, 2), {}, TypeError, "neither a mid-block nor known transformer blocks"),
        (lambda: build_unet("tiny-sd"), {"opset": 11}, ValueError, "opset"),
        (lambda: build_unet("tiny-sd"), {"schedule": "linear"}, TypeError, "schedule"),
        # a dynamic batch traced at 1 was fixed at 1: the check (batch 2) failed, a CFG batch would too
        (lambda: build_unet("tiny-sd"), {"batch": 1}, ValueError, "traced with 2 to 63 samples"),
        (lambda: build_unet("tiny-sd"), {"batch": 64}, ValueError, "dynamic_batch=False"),
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


def test_cli_export_unconditional_unet(tmp_path, capsys, mini_folder):
    out = tmp_path / "export"  # a one-level UNet2DModel from a local folder: the smallest real export
    assert main(["export", "--model", str(mini_folder), "--out", str(out), "--schedule", "cosine:0.5:200"]) == 0
    text = capsys.readouterr().out
    assert "[1/5]" in text and "[5/5]" in text and "max relative error" in text
    (wrote,) = (line for line in text.splitlines() if line.startswith("wrote "))
    paths = wrote.removeprefix("wrote ").split(", ")
    assert len(paths) == 4 and all(os.path.isabs(p) and os.path.isfile(p) for p in paths), wrote  # not relative
    names = sorted(os.listdir(out))
    assert names[:3] == ["bypass_schedule.json", "config.json", "unet.onnx"] and len(names) == 4
    assert re.fullmatch(r"unet\.onnx\.[0-9a-f]{12}\.data", names[3])
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
def test_tensorrt_engine_matches_pytorch(sd_graph, tmp_path, cuda_graph):
    from bypass_kernels.export import TensorRTUNet, build_engine

    unet = sd_graph["unet"]
    engine = build_engine(
        sd_graph["path"], str(tmp_path / "unet.plan"), fp16=False, batch=(1, 2, 4), resolution=(64, 128, 256)
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
    with pytest.raises(ValueError, match=r"sample: shape \[1, 4, 64, 64\] is outside the engine's range"):
        runner(torch.zeros(1, 4, 64, 64, device="cuda"), 10, torch.zeros(1, 8, 32, device="cuda"))


# -- kill-safe export ---------------------------------------------------------------------------
# What is tested is where an export stands when it dies, not the graph: the exports here are of a
# one-level UNet2DModel (MINI_UNET2D) with fixed shapes, a few seconds each instead of a minute.

MINI_UNET2D = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16,),
    layers_per_block=1,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    norm_num_groups=8,
)
STATIC = dict(dynamic_batch=False, dynamic_shape=False)


def _mini_unet2d():
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(**MINI_UNET2D).eval()


@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    """MINI_UNET2D, unpatched, exported with SCHEDULE given, at a fixed batch, height and width:
    (the model, the graph's path)."""
    model = _mini_unet2d()
    path = str(tmp_path_factory.mktemp("static") / "plain.onnx")
    to_onnx(model, path, SCHEDULE, **STATIC)
    return model, path


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory):
    """MINI_UNET2D saved as a local model folder, for ``bypass-kernels export --model <folder>``."""
    folder = tmp_path_factory.mktemp("mini") / "model"
    _mini_unet2d().save_pretrained(folder)
    return folder


def _export_and_die(mode, where, signame, out, model):
    """The export a killed process runs: ``where`` (a function of onnx_export) sends this process
    the signal named when the export reaches it."""
    import signal

    from bypass_kernels.export import onnx_export

    real = getattr(onnx_export, where)

    def die(*args, **kwargs):
        print("reached", where, flush=True)
        os.kill(os.getpid(), getattr(signal, signame))
        return real(*args, **kwargs)

    setattr(onnx_export, where, die)
    if mode == "api":
        from bypass_kernels.presets import load_unet

        path = os.path.join(out, "unet.onnx")
        return onnx_export.to_onnx(load_unet(model), path, BypassSchedule.linear(0.5), **STATIC)
    export = onnx_export.export_to_staging
    onnx_export.export_to_staging = lambda *args, **kwargs: export(*args, **{**kwargs, **STATIC})  # sooner
    return main(["export", "--model", model, "--out", out])


def _killed_export(mode, where, signame, out, model) -> int:
    """The exit status of ``_export_and_die`` in a child process killed by a real signal (negative: the
    signal's number). Forked: the child starts with this process's imports (a fresh interpreter spends
    10 s importing them); an alarm ends it after 300 s."""
    import signal
    import traceback

    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: leaves only through os._exit, never back into pytest
        code = 1
        try:
            os.close(read)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.alarm(300)
            sys.stdout = sys.stderr = os.fdopen(write, "w", buffering=1)
            result = _export_and_die(mode, where, signame, str(out), str(model))
            code = result if isinstance(result, int) else 0
        except SystemExit as exc:  # the CLI's SIGTERM handler ends it so
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        output = pipe.read()  # until the child's end closes it: it has ended
    status = os.waitpid(pid, 0)[1]
    assert "reached " + where in output, output[-2000:]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _staging_folders(folder):
    return [n for n in os.listdir(folder) if n.startswith(".bypass_export")]


def test_sigkill_while_writing_leaves_no_final_name_and_the_next_export_cleans_up(tmp_path, mini_folder):
    out = tmp_path / "out"
    out.mkdir()
    assert _killed_export("api", "_finish_graph", "SIGKILL", out, mini_folder) == -9
    assert "unet.onnx" not in os.listdir(out)  # the graph was written, never published
    debris = _staging_folders(out)
    assert len(debris) == 1 and any(n.endswith(".data") for n in os.listdir(out / debris[0]))
    to_onnx(_mini_unet2d(), str(out / "unet.onnx"), SCHEDULE, check=False, **STATIC)
    assert _staging_folders(out) == []  # the dead export's staging folder is gone
    assert sorted(n.split(".")[-1] for n in os.listdir(out)) == ["data", "onnx"]


def test_killed_during_the_onnxruntime_check_leaves_no_unverified_file(tmp_path, mini_folder, monkeypatch):
    """SIGKILL runs no clean-up at all: what it leaves is the output folder as it stands when the check
    begins, recorded here in-process (the two subprocess tests show real signals landing)."""
    from bypass_kernels.export import onnx_export

    class Killed(BaseException):
        pass

    out = tmp_path / "cli"  # the CLI creates it
    left = []

    def die(*args, **kwargs):
        left.append(sorted(os.listdir(out)))
        raise Killed

    export = onnx_export.export_to_staging
    monkeypatch.setattr(onnx_export, "export_to_staging", lambda *a, **k: export(*a, **{**k, **STATIC}))
    monkeypatch.setattr(onnx_export, "_verify", die)
    with pytest.raises(Killed):
        main(["export", "--model", str(mini_folder), "--out", str(out)])
    assert len(left) == 1 and left[0], left  # the check began, with the export staged
    assert [n for n in left[0] if not n.startswith(".bypass_export")] == []


def test_sigterm_during_the_check_cleans_up_everything_the_cli_made(tmp_path, mini_folder):
    out = tmp_path / "cli"
    assert _killed_export("cli", "_verify", "SIGTERM", out, mini_folder) == 128 + 15
    assert not out.exists()  # staging removed, and the folder it created too


def test_live_exports_keep_their_staging_folder(tmp_path):
    from bypass_kernels.export import staging

    with staging.Staging(str(tmp_path)) as live:
        assert staging.clean_stale(str(tmp_path)) == []  # its lock is held: not debris
        assert os.path.isdir(live.path)
        dead = tmp_path / (staging.STAGING_PREFIX + "1-deadbeef")
        dead.mkdir()
        (dead / ".lock").write_text("")
        assert staging.clean_stale(str(tmp_path)) == [str(dead)]
    assert os.listdir(tmp_path) == []


def _snapshot(folder):
    return {n: (folder / n).read_bytes() for n in os.listdir(folder)}


@pytest.fixture(scope="module")
def unet2d_export(tmp_path_factory):
    """A finished export of an unconditional UNet (MINI_UNET2D; dynamic batch), copied by the tests that
    overwrite it."""
    folder = tmp_path_factory.mktemp("unet2d")
    to_onnx(_mini_unet2d(), str(folder / "unet.onnx"), SCHEDULE, dynamic_shape=False)
    return folder


def _copy_of(folder, tmp_path):
    import shutil

    target = tmp_path / "out"
    shutil.copytree(folder, target)
    return target


def test_failed_overwrite_leaves_the_previous_export_whole(unet2d_export, tmp_path, monkeypatch):
    """A real export into the folder of a previous one fails its ONNX Runtime check: nothing changes."""
    from bypass_kernels.export import onnx_export

    out = _copy_of(unet2d_export, tmp_path)
    before = _snapshot(out)

    def fail(*args, **kwargs):
        raise RuntimeError("export check: injected failure")

    monkeypatch.setattr(onnx_export, "_verify", fail)
    unet = _mini_unet2d()
    with pytest.raises(RuntimeError, match="injected"):
        to_onnx(unet, str(out / "unet.onnx"), BypassSchedule.constant(0.2), overwrite=True, **STATIC)
    monkeypatch.undo()
    assert _snapshot(out) == before  # same graph, same weights file, nothing new, no staging left
    bypass_kernels.patch(unet, SCHEDULE)
    _compare(unet, str(out / "unet.onnx"), export_inputs(unet), TIMESTEPS[:2])


def _small_graph(folder, name, value):
    """A real ONNX graph ``name`` whose one weight lives in an external file (as to_onnx writes them)."""
    from bypass_kernels.export import staging
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((64,), value, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        [weight],
    )
    data = staging.data_name(name)
    onnx.save_model(
        helper.make_model(graph), str(folder / name), save_as_external_data=True, location=data, size_threshold=0
    )
    return [name, data]


@pytest.mark.parametrize("fail_on", [None, "unet.onnx", "config.json"])
def test_publish_switches_graph_and_weights_together_or_not_at_all(tmp_path, monkeypatch, fail_on):
    """Publishing into a folder that holds a previous export: the graph's rename is the switch. A failure
    at any rename (the graph's own included) puts back every file; success removes the old weights."""
    from bypass_kernels.export import staging

    out = tmp_path / "out"
    out.mkdir()
    old = _small_graph(out, "unet.onnx", 1.0)
    (out / "config.json").write_text("old")
    before = _snapshot(out)
    real = os.replace

    def replace(src, dst):
        if fail_on and str(dst).endswith(fail_on):
            raise PermissionError("injected failure")
        return real(src, dst)

    with staging.Staging(str(out)) as stage:
        new = _small_graph(tmp_path.joinpath(stage.path), "unet.onnx", 2.0)
        (tmp_path / stage.path / "config.json").write_text("new")
        monkeypatch.setattr(staging.os, "replace", replace)
        if fail_on:
            with pytest.raises(PermissionError, match="injected"):
                stage.publish([*new, "config.json"], overwrite=True, graph="unet.onnx")
        else:
            stage.publish([*new, "config.json"], overwrite=True, graph="unet.onnx")
        monkeypatch.undo()
    if fail_on:
        assert _snapshot(out) == before
        return
    assert sorted(os.listdir(out)) == sorted([*new, "config.json"]) and old[1] not in os.listdir(out)
    session = onnxruntime_session(str(out / "unet.onnx"))
    assert session.run(None, {"x": np.zeros(64, np.float32)})[0][0] == 2.0


def test_an_export_never_removes_weights_another_graph_in_the_folder_uses(tmp_path):
    """A user's renamed or copied graph still refers to the weights file named after the graph it was:
    a later export into the folder (its clean-up of a killed export's debris, and its replacement of
    the previous weights) leaves that file. Both removed it before."""
    from bypass_kernels.export import staging

    out = tmp_path / "out"
    out.mkdir()
    _small_graph(out, "e.onnx", 1.0)
    os.rename(out / "e.onnx", out / "renamed.onnx")  # its weights keep the name e.onnx.<id>.data
    old = _small_graph(out, "unet.onnx", 2.0)
    shutil.copy(out / "unet.onnx", out / "backup.onnx")  # a copy that shares unet.onnx's weights
    with staging.Staging(str(out)) as stage:  # an export into the folder: debris clean-up, then publish
        new = _small_graph(tmp_path.joinpath(stage.path), "unet.onnx", 3.0)
        stage.publish(new, overwrite=True, graph="unet.onnx")
    for graph, value in (("renamed.onnx", 1.0), ("backup.onnx", 2.0), ("unet.onnx", 3.0)):
        session = onnxruntime_session(str(out / graph))
        assert session.run(None, {"x": np.zeros(64, np.float32)})[0][0] == value, graph
    assert old[1] in os.listdir(out)  # still used by backup.onnx
    os.remove(out / "backup.onnx")
    with staging.Staging(str(out)):
        pass
    assert old[1] not in os.listdir(out)  # used by no graph now: removed as debris


# -- CLI user errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--model", "no-such-model"], "model"),
        (["--model", "tiny-unet2d", "--batch", "1:9:4"], "--batch"),
        (["--model", "tiny-unet2d", "--batch", "2"], "needs --engine"),
        (["--model", "tiny-unet2d", "--engine", "--text-len", "a:b:c"], "--text-len"),
        (["--model", "tiny-unet2d", "--schedule", '{"kind": "linear"}'], "schedule"),
        (["--model", "tiny-unet2d", "--opset", "11"], "opset"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line_and_leave_no_folder(tmp_path, capsys, extra, match):
    out = tmp_path / "new"
    assert main(["export", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv", [["--out", "x"], ["--model", "tiny-sd", "--out", "x", "--opset", "abc"]])
def test_cli_argument_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "error:" in err, err


def test_cli_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["export", "--model", "tiny-unet2d", "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err and target.read_text() == "x"


# -- profiles from the graph's named dimensions -----------------------------------------------------------


def test_text_len_is_stored_and_drives_the_default_profile(sd_graph, sdxl_graph):
    from bypass_kernels.export import default_profile
    from bypass_kernels.export.onnx_export import graph_metadata

    assert graph_metadata(sd_graph["path"])["text_len"] == "8" and sd_graph["result"].text_len == 8
    profile = default_profile(sd_graph["path"])
    assert profile["encoder_hidden_states"] == ((1, 8, 32), (2, 8, 32), (8, 8, 32))  # not 77
    assert profile["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))  # 128 px exported, 64..256
    assert profile["timestep"] == ((1,), (1,), (8,))
    xl = default_profile(sdxl_graph["path"], batch=(1, 4, 6), text_len=(8, 16, 77), resolution=(64, 128, 512))
    for name in ("sample", "encoder_hidden_states", "text_embeds", "time_ids"):
        assert [shape[0] for shape in xl[name]] == [1, 4, 6], name  # one batch range for every input
    assert xl["encoder_hidden_states"][2] == (6, 77, 32) and xl["sample"][2] == (6, 4, 64, 64)
    assert SCHEDULE_NAME not in xl  # static: no profile entry
    for name, (lo, opt, hi) in xl.items():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), name


def test_real_sd_shapes_store_77(tmp_path):
    from bypass_kernels.export.onnx_export import export_inputs as inputs_of

    # The graph records the text length it was exported with; for SD-sized text encoders that is 77.
    # (Exporting sd15 itself takes minutes; its example inputs are what the export uses.)
    from diffusers import UNet2DConditionModel

    from bypass_kernels.presets import PRESETS

    config = dict(PRESETS["sd15"].config, block_out_channels=(32, 32, 32, 32), norm_num_groups=8, attention_head_dim=2)
    tiny_with_sd_text = UNet2DConditionModel(**config)
    assert inputs_of(tiny_with_sd_text)["encoder_hidden_states"].shape[1] == 77


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": (1, 9, 8)}, r"batch \(for sample, encoder_hidden_states\): opt 9 lies outside min..max = 1..8"),
        ({"batch": (0, 1, 2)}, "batch .*min must be at least 1"),
        ({"batch": 2000}, "above the graph's limit 1024"),
        ({"text_len": (77, 8, 77)}, r"text_len \(for encoder_hidden_states\): opt 8 lies outside"),
        ({"resolution": (64, 100, 256)}, "resolution: 100 is not a multiple of 16"),
        ({"resolution": (256, 128, 64)}, "min 256 is above max 64"),
        ({"batch": "2"}, "batch.*three ints"),
    ],
)
def test_profile_argument_errors_name_the_input_and_range(sd_graph, kwargs, match):
    from bypass_kernels.export import default_profile

    with pytest.raises((ValueError, TypeError), match=match):
        default_profile(sd_graph["path"], **kwargs)


def test_profile_of_a_static_graph(static_export):
    from bypass_kernels.export import default_profile

    _, path = static_export
    assert default_profile(path) == {}
    with pytest.raises(ValueError, match="fixed at 2"):
        default_profile(path, batch=(1, 2, 4))
    with pytest.raises(ValueError, match="resolution: this graph's height and width are fixed"):
        default_profile(path, resolution=128)


def test_tensorrt_precision_rules():
    """The decision table the builder applies (no TensorRT involved): FP16 only where BuilderFlag has it
    (10.x, pyCore.cpp release/10.13); on 11.x (no FP16 member) the graph's own type decides."""
    from bypass_kernels.export.tensorrt import precision_flags

    assert precision_flags(graph_fp16=False, fp16=True, has_fp16_flag=True) == (["FP16"], [])
    assert precision_flags(graph_fp16=False, fp16=None, has_fp16_flag=True) == ([], ["TF32"])
    assert precision_flags(graph_fp16=True, fp16=None, has_fp16_flag=False) == ([], [])
    assert precision_flags(graph_fp16=True, fp16=True, has_fp16_flag=True) == (["FP16"], [])
    assert precision_flags(graph_fp16=False, fp16=False, has_fp16_flag=False) == ([], ["TF32"])
    with pytest.raises(ValueError, match=r"TensorRT 11.4 builds strongly typed.*to_onnx\(\.\.\., fp16=True\)"):
        precision_flags(graph_fp16=False, fp16=True, has_fp16_flag=False, version="11.4")
    with pytest.raises(ValueError, match="this graph is fp16"):
        precision_flags(graph_fp16=True, fp16=False, has_fp16_flag=True)


# -- video UNets: a clear refusal --------------------------------------------------------------------


def _video_unets():
    from diffusers import I2VGenXLUNet, UNet3DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel

    common = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32)
    yield lambda: UNet3DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=8,
        norm_num_groups=16,
    )
    yield lambda: UNetSpatioTemporalConditionModel(
        **common,
        in_channels=8,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        num_attention_heads=(2, 4),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    )
    yield lambda: UNetMotionModel(
        **common,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        norm_num_groups=16,
    )
    yield lambda: I2VGenXLUNet(
        **common,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=8,
        norm_num_groups=16,
        num_attention_heads=None,
    )


@pytest.mark.parametrize("make", list(_video_unets()), ids=list(VIDEO_UNETS))
def test_video_unets_are_refused_with_the_reason(tmp_path, make):
    unet = make()
    name = type(unet).__name__
    with pytest.raises(TypeError, match=rf"{name} is a video UNet.*5-D.*image UNets"):
        to_onnx(unet, str(tmp_path / "v.onnx"), SCHEDULE)
    assert os.listdir(tmp_path) == []
