"""ONNX export of a patched UNet with the bypass schedule baked in, indexed by the graph's own timestep.

The graph follows the names of NVIDIA's TensorRT diffusion demo: inputs ``sample``, ``timestep``,
``encoder_hidden_states`` (plus ``text_embeds`` and ``time_ids`` for SDXL), output ``latent``. The
schedule is a float32 initializer ``bypass_schedule`` of length T, or, with
``schedule_as_input=True``, a graph input of that name; with ``per_sample=True`` that input is
[batch, T], a schedule per sample sharing the sample's batch dimension (what a serving engine that
batches requests needs). The blend is plain ONNX operators
(Round, Clip, Cast, Gather, Sub, Mul, Add), so ONNX Runtime and TensorRT fuse it like any other
pointwise work.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass, field

import torch
from bypass_kernels.export import staging
from torch import nn

from bypass_kernels import patching, targets
from bypass_kernels.schedule import BypassSchedule, default_schedule

MIN_OPSET = 18  # torch's ONNX exporter emits opset 18 and newer (Round itself needs only 11)
DEFAULT_OPSET = 18
SCHEDULE_NAME = "bypass_schedule"
OUTPUT_NAME = "latent"


@dataclass
class ExportResult:
    path: str
    input_names: list[str]
    schedule: BypassSchedule
    opset: int
    fp16: bool
    schedule_as_input: bool
    files: list[str] = field(default_factory=list)
    max_error: float | None = None  # ONNX Runtime against PyTorch, relative (None: not checked)
    text_len: int | None = None  # the encoder_hidden_states length exported with (None: no text input)
    per_sample: bool = False  # the schedule input is [batch, T]


class UNetForExport(nn.Module):
    """The UNet with the demo's input names; the schedule travels as ``bypass_schedule``."""

    def __init__(self, unet: nn.Module, schedule: BypassSchedule | None):
        super().__init__()
        self.unet = unet
        if schedule is not None:  # baked in: an initializer named after this buffer (persistent
            # buffers keep their name through export; the wrapper's state_dict is never saved)
            self.register_buffer(SCHEDULE_NAME, schedule.table())

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        bypass_schedule: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table = getattr(self, SCHEDULE_NAME) if bypass_schedule is None else bypass_schedule
        # One value per sample from [1] or [batch], by gather: this ties no shapes together while
        # tracing (diffusers' own expand would make the exporter fix timestep_count == batch).
        # Float32 arithmetic (exact at these sizes) keeps the graph to ops every runtime has in float.
        timestep = timestep.reshape(-1)
        count = torch.ones_like(timestep, dtype=torch.float32).sum()  # a tensor, not a symbolic int
        positions = torch.arange(sample.shape[0], device=timestep.device, dtype=torch.float32)
        batch_index = torch.minimum(positions, count - 1).to(torch.long)
        timestep = timestep.index_select(0, batch_index)
        kwargs = {"return_dict": False}
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        if text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        with patching._controller(self.unet).table_for_calls(table):
            return self.unet(sample, timestep, **kwargs)[0]


def export_inputs(unet: nn.Module, *, batch: int = 2, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Example graph inputs by name (float32 ``timestep`` of shape [batch])."""
    from bypass_kernels.presets import example_inputs

    inputs = example_inputs(unet, batch=batch)
    named = {"sample": inputs["sample"], "timestep": torch.tensor([999.0] * batch)}
    if "encoder_hidden_states" in inputs:
        named["encoder_hidden_states"] = inputs["encoder_hidden_states"]
    if "added_cond_kwargs" in inputs:
        named.update(inputs["added_cond_kwargs"])
    if dtype is not None:
        named = {k: v if k == "timestep" else v.to(dtype) for k, v in named.items()}
    return named


def trace_to_onnx(wrapper: nn.Module, inputs: dict, path: str, *, dynamic_shapes, opset: int, **options) -> None:
    """``wrapper(**inputs)`` to an ONNX graph at ``path`` (torch.export, weights in an external data
    file), inputs named as the keys of ``inputs``, the output ``OUTPUT_NAME``. ``options`` go to
    ``torch.onnx.export`` (a transformer's custom translations)."""
    # torch.onnx's own notes (e.g. "torchvision is not installed. Skipping torchvision::nms") are not the
    # user's business: its loggers are quiet for the export
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        _export(wrapper, inputs, path, dynamic_shapes=dynamic_shapes, opset=opset, **options)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export(wrapper: nn.Module, inputs: dict, path: str, *, dynamic_shapes, opset: int, **options) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (),
            path,
            kwargs=inputs,
            input_names=list(inputs),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
            **options,
        )


def _downsampling_factor(unet: nn.Module) -> int:
    blocks = getattr(unet, "down_blocks", [])
    return 2 ** sum(1 for b in blocks if getattr(b, "downsamplers", None))


# The batch range torch.export traces a UNet over. diffusers' upsamplers branch at a batch of 64
# (.contiguous() before interpolate), so the trace holds one branch; declaring the range torch.export
# would narrow it to saves a second trace. The ONNX graph itself has no bound (in ONNX the branch is
# a no-op): TensorRT profiles are checked against profiles.MAX_BATCH.
TRACE_MAX_BATCH = 63


def check_example_batch(batch, dynamic_batch: bool, max_batch: int) -> int:
    """The batch an export traces with: torch.export fixes a dynamic batch traced at 1 to 1 (and the
    graph would refuse a CFG batch of 2), so a dynamic batch is traced with 2..``max_batch`` samples."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    if dynamic_batch and not 2 <= batch <= max_batch:
        raise ValueError(
            f"batch: a graph with a dynamic batch is traced with 2 to {max_batch} samples (it then serves any "
            f"batch); got {batch}. For a graph fixed at one batch size pass dynamic_batch=False"
        )
    return batch


def per_sample_check_table(schedule: BypassSchedule, batch: int) -> torch.Tensor:
    """A [batch, T] table whose rows differ (the schedule, then λ = 0.5 and 0 at every step, in turn): what
    a per-sample export is traced and checked with, so a graph that mixed rows up would fail its check."""
    T = schedule.num_train_timesteps
    others = [BypassSchedule.constant(0.5, num_train_timesteps=T), BypassSchedule.constant(0.0, num_train_timesteps=T)]
    return BypassSchedule.stack([schedule, *others][i % 3] for i in range(batch))


def _dynamic_shapes(names, *, factor: int, dynamic_batch: bool, dynamic_shape: bool):
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=TRACE_MAX_BATCH)
    count = Dim("timestep_count", min=1, max=TRACE_MAX_BATCH)  # one graph takes [1] and [batch]
    specs: dict[str, dict[int, object]] = {}
    for name in names:
        spec: dict[int, object] = {}
        if name == "timestep":
            if dynamic_batch:
                spec[0] = count
        elif name == SCHEDULE_NAME:
            spec = {0: batch} if dynamic_batch and names[name].dim() == 2 else {}  # [batch, T]: per sample
        else:
            if dynamic_batch:
                spec[0] = batch
            if name == "sample" and dynamic_shape:
                spec[2] = Dim("latent_height", min=1, max=4096 // factor) * factor
                spec[3] = Dim("latent_width", min=1, max=4096 // factor) * factor
            if name == "encoder_hidden_states" and dynamic_shape:
                spec[1] = Dim("sequence", min=1, max=1024)
        specs[name] = spec or None
    return specs


_DIM_NAMES = {
    "sample": ["batch", None, "latent_height", "latent_width"],
    "timestep": ["timestep_count"],
    "encoder_hidden_states": ["batch", "sequence", None],
    "text_embeds": ["batch", None],
    "time_ids": ["batch", None],
    OUTPUT_NAME: ["batch", None, "latent_height", "latent_width"],
    SCHEDULE_NAME: ["batch", None],  # [batch, T] per sample ([T] is static: no label)
}


def _finish_graph(
    path: str,
    schedule: BypassSchedule,
    *,
    schedule_as_input: bool,
    meta: dict[str, str],
    dim_names=None,
    per_sample: bool = False,
) -> None:
    """Readable dimension names, the schedule under its own name, metadata for deployment, and the
    weights moved to a file with a fresh name (``<graph>.<id>.data``) so that publishing the graph is
    one atomic rename."""
    import onnx

    from bypass_kernels import __version__

    model = onnx.load(path, load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        labels = (_DIM_NAMES if dim_names is None else dim_names).get(value.name, [])
        for dim, label in zip(value.type.tensor_type.shape.dim, labels, strict=False):
            if label is not None and not dim.HasField("dim_value"):
                dim.dim_param = label
    names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    if SCHEDULE_NAME not in names:
        raise RuntimeError(f"export: the graph has no {SCHEDULE_NAME!r} (exporter renamed it); please report this")
    folder = os.path.dirname(path)
    fresh = staging.data_name(os.path.basename(path))
    renamed: dict[str, str] = {}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                if entry.value not in renamed:
                    renamed[entry.value] = fresh if not renamed else staging.data_name(os.path.basename(path))
                    os.replace(os.path.join(folder, entry.value), os.path.join(folder, renamed[entry.value]))
                entry.value = renamed[entry.value]
    del model.metadata_props[:]
    for key, value in {
        "bypass_kernels.version": __version__,
        "bypass_kernels.schedule": json.dumps(schedule.to_dict()),
        "bypass_kernels.schedule_as_input": str(schedule_as_input).lower(),
        "bypass_kernels.schedule_per_sample": str(per_sample).lower(),
        **{f"bypass_kernels.{key}": value for key, value in meta.items()},
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, path)
    onnx.checker.check_model(path)


def graph_metadata(path: str) -> dict[str, str]:
    """The ``bypass_kernels.*`` metadata of an exported graph (without the ``bypass_kernels.`` prefix)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    prefix = "bypass_kernels."
    return {p.key[len(prefix) :]: p.value for p in model.metadata_props if p.key.startswith(prefix)}


def _check_target(path: str, overwrite: bool) -> str:
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ValueError(f"path: the folder {folder!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"path: the folder {folder!r} is not writable")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a folder")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path: {path!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return path


@contextlib.contextmanager
def _export_state(model, schedule):
    """The UNet patched with ``schedule`` and the plain-torch backend for the duration of the export;
    the caller's model is left as it was (its own schedule and backend restored, or unpatched)."""
    unet, _ = targets.find_owner(model)
    own = patching.get_schedule(unet)
    if schedule is None:
        if own is None:
            schedule = default_schedule()
            warnings.warn(
                "to_onnx: the model is not patched and no schedule was given; exporting with default_schedule() "
                f"= {schedule!r}",
                stacklevel=4,
            )
        else:
            schedule = own
    with patching.patched(unet, schedule, backend="torch"):
        yield unet, schedule


# Video UNets fold frames into the batch before the mid-block and take 5-D samples (or extra
# conditioning); the graph's inputs and the per-sample timestep are defined for image UNets only.
VIDEO_UNETS = ("UNet3DConditionModel", "UNetSpatioTemporalConditionModel", "UNetMotionModel", "I2VGenXLUNet")


def _refuse_video_unet(unet) -> None:
    names = {cls.__name__ for cls in type(unet).__mro__}
    video = sorted(names & set(VIDEO_UNETS))
    if video:
        raise TypeError(
            f"to_onnx: {video[0]} is a video UNet, which this export does not support: its sample is 5-D "
            "[batch, channels, frames, height, width] (and it takes frame-level conditioning), while the graph's "
            "inputs (sample [batch, channels, height, width], timestep [1] or [batch]) and the bypass's "
            "per-sample λ are defined for image UNets (UNet2DModel, UNet2DConditionModel); patch and run it in "
            "PyTorch instead"
        )
    _refuse_unmodelled_conditioning(unet)


# Config keys whose conditioning the graph has no input for (the inputs are sample, timestep,
# encoder_hidden_states, and text_embeds/time_ids for addition_embed_type="text_time").
_UNMODELLED = {
    "encoder_hid_dim": "a projection of encoder_hidden_states from encoder_hid_dim (DeepFloyd IF, Kandinsky)",
    "class_embed_type": "class labels (class_embed_type)",
    "num_class_embeds": "class labels (num_class_embeds)",
}


def _refuse_unmodelled_conditioning(unet) -> None:
    config = getattr(unet, "config", None)
    if config is None:
        return
    reasons = [why for key, why in _UNMODELLED.items() if getattr(config, key, None) is not None]
    addition = getattr(config, "addition_embed_type", None)
    if addition not in (None, "text_time"):
        reasons.append(f"addition_embed_type={addition!r} embeddings")
    if reasons:
        raise TypeError(
            f"to_onnx: this {type(unet).__name__} takes {'; '.join(reasons)}, which the exported graph has no "
            "input for (it models SD 1.x/2.x, SDXL and UNet2DModel); patch and run it in PyTorch instead"
        )


# Timestep sets the export is checked at: one for the batch, fractional, x.5 ties, out of range, per sample.
CHECK_TIMESTEPS = ([999.0], [980.5, 620.25], [499.5, 500.5], [2000.0, -3.0], [750.0, 10.0])


def check_tolerance(fp16: bool) -> float:
    """The largest relative error an export accepts against the patched PyTorch model."""
    return 2e-2 if fp16 else 1e-4


def _verify(path: str, unet: nn.Module, inputs: dict[str, torch.Tensor], fp16: bool) -> float:
    """ONNX Runtime on the staged graph against the patched PyTorch model; raises past the tolerance."""
    session = onnxruntime_session(path, ["CPUExecutionProvider"])
    count = next(i.shape[0] for i in session.get_inputs() if i.name == "timestep")
    timesteps = CHECK_TIMESTEPS
    if isinstance(count, int):  # a static graph (dynamic_batch=False): exactly ``count`` values
        timesteps = [t * count if len(t) == 1 else t for t in CHECK_TIMESTEPS]
        timesteps = [t for t in timesteps if len(t) == count]
    error = max_relative_error(session, unet, inputs, timesteps)
    limit = check_tolerance(fp16)
    if not error <= limit:
        raise RuntimeError(f"export check: ONNX Runtime differs from PyTorch by {error:.3g} (limit {limit:g})")
    return error


def verify_export(
    path: str, model, schedule: BypassSchedule, *, schedule_as_input: bool, fp16: bool, per_sample: bool = False
) -> float:
    """Compare the graph at ``path`` (ONNX Runtime, CPU) with ``model`` patched with ``schedule`` at
    ``CHECK_TIMESTEPS`` (a per-sample graph with rows that differ); returns the largest relative
    error, raises RuntimeError past ``check_tolerance``. The model is left as it was."""
    unet, _ = targets.find_owner(model)
    with patching.patched(unet, schedule, backend="torch"):
        inputs = export_inputs(unet)
        if per_sample:
            inputs[SCHEDULE_NAME] = per_sample_check_table(schedule, inputs["sample"].shape[0])
        elif schedule_as_input:
            inputs[SCHEDULE_NAME] = schedule.table()
        return _verify(path, unet, inputs, fp16)


def export_to_staging(
    model,
    stage: staging.Staging,
    name: str,
    schedule: BypassSchedule | None = None,
    *,
    opset: int | None = None,
    fp16: bool = False,
    dynamic_batch: bool = True,
    dynamic_shape: bool = True,
    schedule_as_input: bool = False,
    per_sample: bool = False,
    batch: int = 2,
    check: bool = True,
) -> ExportResult:
    """The work of ``to_onnx``, written into ``stage`` (nothing under a final name): export, finish,
    and (``check``) verify with ONNX Runtime. ``result.files`` are the staged file names."""
    schedule_as_input = schedule_as_input or per_sample
    import onnx  # noqa: F401  (fail early with the install hint below)

    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset: the graph needs ONNX opset {MIN_OPSET} or newer, got {opset!r}")
    if schedule is not None and not isinstance(schedule, BypassSchedule):
        raise TypeError(f"schedule: expected a BypassSchedule, got {type(schedule).__name__}")
    check_example_batch(batch, dynamic_batch, TRACE_MAX_BATCH)
    _refuse_video_unet(getattr(model, "unet", model))  # a pipeline's or the model itself
    targets.find_owner(model)  # a clear error for objects with no mid-block, before touching files

    with _export_state(model, schedule) as (unet, schedule):
        source = copy.deepcopy(unet).half() if fp16 else unet  # the copy keeps the patch; its table stays fp32
        dtype = torch.float16 if fp16 else None
        wrapper = UNetForExport(source, None if schedule_as_input else schedule).eval()
        inputs = export_inputs(source, batch=batch, dtype=dtype)
        if schedule_as_input:
            inputs[SCHEDULE_NAME] = per_sample_check_table(schedule, batch) if per_sample else schedule.table()
        factor = _downsampling_factor(source)
        dynamic = _dynamic_shapes(inputs, factor=factor, dynamic_batch=dynamic_batch, dynamic_shape=dynamic_shape)
        staged = stage.file(name)
        trace_to_onnx(wrapper, inputs, staged, dynamic_shapes=dynamic, opset=opset)
        meta = {
            "fp16": str(fp16).lower(),
            "latent_size": str(inputs["sample"].shape[2]),
            "latent_multiple": str(factor),
            "unet_config": json.dumps(dict(unet.config), default=list),
        }
        if "encoder_hidden_states" in inputs:
            meta["text_len"] = str(inputs["encoder_hidden_states"].shape[1])  # the length exported with
        _finish_graph(staged, schedule, schedule_as_input=schedule_as_input, meta=meta, per_sample=per_sample)
        files = sorted(n for n in os.listdir(stage.path) if n == name or n.startswith(name + "."))
    error = None
    if check:
        error = verify_export(
            staged, model, schedule, schedule_as_input=schedule_as_input, fp16=fp16, per_sample=per_sample
        )
    text_len = int(meta["text_len"]) if "text_len" in meta else None
    return ExportResult(
        staged, list(inputs), schedule, opset, fp16, schedule_as_input, files, error, text_len, per_sample
    )


def to_onnx(
    model,
    path: str,
    schedule: BypassSchedule | None = None,
    *,
    opset: int | None = None,
    fp16: bool = False,
    dynamic_batch: bool = True,
    dynamic_shape: bool = True,
    schedule_as_input: bool = False,
    per_sample: bool = False,
    overwrite: bool = False,
    batch: int = 2,
    check: bool = True,
) -> ExportResult:
    """Export ``model`` (a UNet or a pipeline) to ONNX at ``path`` with the bypass in the graph.

    ``schedule_as_input``: the schedule is a graph input ``bypass_schedule`` [T] (any table at run
    time) instead of a constant; ``per_sample``: that input is [batch, T], a schedule per sample on
    the sample's batch dimension (the runners take a list of schedules; serving engines batch it).

    A patched model exports with its own schedule; ``schedule=`` exports with that one instead;
    an unpatched model with no schedule exports with ``default_schedule`` and warns. The
    model itself is not changed. ``fp16`` exports half-precision weights and activations; the
    ``timestep`` input is float32 either way. The weights go to ``<path>.<id>.data`` beside the
    graph (a fresh name per export). The graph's metadata holds the schedule, the UNet's config and
    the text length it was exported with (``text_len``: 77 for SD/SDXL, 8 for the tiny presets).

    Kill-safe: everything is written and (``check=True``, the default) compared with the patched
    PyTorch model in ONNX Runtime inside a staging folder beside ``path``; only then do the files
    get their final names, the graph last, so a previous export at ``path`` is replaced whole or
    not at all. On error nothing is left behind; a staging folder left by a killed export is
    removed by the next export into that folder. Video UNets raise TypeError (see ``VIDEO_UNETS``).
    """
    path = _check_target(path, overwrite)
    with staging.Staging(os.path.dirname(path)) as stage:
        result = export_to_staging(
            model,
            stage,
            os.path.basename(path),
            schedule,
            opset=opset,
            fp16=fp16,
            dynamic_batch=dynamic_batch,
            dynamic_shape=dynamic_shape,
            schedule_as_input=schedule_as_input,
            per_sample=per_sample,
            batch=batch,
            check=check,
        )
        result.files = stage.publish(result.files, overwrite=overwrite, graph=os.path.basename(path))
        result.path = path
    return result


def onnxruntime_session(path: str, providers: list[str] | None = None, options=None):
    """An ONNX Runtime session, on CUDA where the CUDA provider is present, else on the CPU.
    ``options``: an ``onnxruntime.SessionOptions``."""
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(path, sess_options=options, providers=providers)


_ORT_FLOAT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def run_onnx(session, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run ``session`` on named torch inputs (only those the graph takes, each cast to the float
    type the graph declares, so fp32 inputs feed an fp16 graph too); returns ``latent``."""
    feeds = {}
    for spec in session.get_inputs():
        if spec.name in inputs:
            value = inputs[spec.name].detach().cpu()
            feeds[spec.name] = value.to(_ORT_FLOAT_TYPES.get(spec.type, value.dtype)).numpy()
    return torch.from_numpy(session.run([OUTPUT_NAME], feeds)[0])


def max_relative_error(session, unet: nn.Module, inputs: dict[str, torch.Tensor], timesteps) -> float:
    """Largest error of the graph against the patched PyTorch model over ``timesteps`` (each a list of
    values: [1] or one per sample), relative to the largest output magnitude."""
    worst = 0.0
    for t in timesteps:
        named = {**inputs, "timestep": torch.tensor(t)}
        expected = reference_output(unet, named).float()
        got = run_onnx(session, named).float()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def reference_output(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the graph should compute: the patched PyTorch model on the same named inputs."""
    wrapper = UNetForExport(unet, None)
    table = inputs.get(SCHEDULE_NAME)
    if table is None:
        table = patching._controller(unet).table
    args = {k: v for k, v in inputs.items() if k != SCHEDULE_NAME}
    with torch.no_grad():
        return wrapper(**args, bypass_schedule=table)
