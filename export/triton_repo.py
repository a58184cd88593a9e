"""A Triton Inference Server model repository for a patched model, with a schedule per request.

``write_model_repository(pipe_or_model, folder)`` writes::

    folder/
      unet/ (transformer/ for a DiT)   the denoiser, exported with a schedule per sample: Triton's dynamic
        config.pbtxt                    batcher joins requests (each with its own schedule rows) into one
        1/model.onnx + weights          backend "onnxruntime"; "python": the same graph in ONNX Runtime
        1/model.plan                    inside the python backend; "tensorrt": an engine built here
      pipeline/                         (UNet pipelines) a whole denoising loop in the python backend,
        config.pbtxt                    calling the denoiser model once per step (BLS): a client sends a
        1/model.py, scheduler_config.json, pipeline.json    prompt embedding, a seed and a schedule

Every ``config.pbtxt`` is text of Triton's ``ModelConfig`` protobuf (``check_config`` parses it with the
protobuf that tritonclient ships). The repository is written beside ``folder`` and renamed into place:
a killed write leaves no half repository.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

DENOISER_BACKENDS = ("onnxruntime", "python", "tensorrt")
PIPELINE_MODEL = "pipeline"
_MODEL_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_models")
_ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64"}
_BATCH_DIMS = ("batch", "timestep_count")  # the exporter's names for the dimension requests are joined on


@dataclass
class TensorSpec:
    """One input or output of a Triton model: ``dims`` without the batch dimension (-1: any size)."""

    name: str
    data_type: str
    dims: list[int]
    optional: bool = False
    batch_only: bool = False  # [batch] in the model: dims [1] for the client, reshaped to [] (Triton's rule)


@dataclass
class RepositoryResult:
    folder: str
    denoiser: str
    backend: str
    models: list[str] = field(default_factory=list)
    max_error: float | None = None  # the export's ONNX Runtime check (relative), None when not checked


def _text(value) -> str:
    return json.dumps(value)  # protobuf text format takes JSON's string quoting


def _tensor_text(spec: TensorSpec) -> str:
    dims = [1] if spec.batch_only else spec.dims
    parts = [f"name: {_text(spec.name)}", f"data_type: {spec.data_type}", f"dims: [ {', '.join(map(str, dims))} ]"]
    if spec.batch_only:
        parts.append("reshape: { shape: [ ] }")
    if spec.optional:
        parts.append("optional: true")
    return "  {\n    " + "\n    ".join(parts) + "\n  }"


def config_text(
    *,
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    platform: str | None = None,
    backend: str | None = None,
    instances: int = 1,
    kind: str = "KIND_GPU",
    queue_delay_us: int | None = None,
    parameters: dict[str, str] | None = None,
    default_model_filename: str | None = None,
) -> str:
    """A ``config.pbtxt`` (Triton's ModelConfig in protobuf text format)."""
    lines = [f"name: {_text(name)}"]
    if platform:
        lines.append(f"platform: {_text(platform)}")
    if backend:
        lines.append(f"backend: {_text(backend)}")
    if default_model_filename:
        lines.append(f"default_model_filename: {_text(default_model_filename)}")
    lines.append(f"max_batch_size: {int(max_batch_size)}")
    lines.append("input [\n" + ",\n".join(_tensor_text(s) for s in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_text(s) for s in outputs) + "\n]")
    lines.append(f"instance_group [ {{ count: {int(instances)} kind: {kind} }} ]")
    if queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {int(queue_delay_us)} }}")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_text(key)} value: {{ string_value: {_text(value)} }} }}")
    return "\n".join(lines) + "\n"


def check_config(text: str):
    """Parse ``text`` as Triton's ModelConfig (the protobuf tritonclient ships: ``pip install
    tritonclient[grpc]``); returns the message, raises ValueError naming what is wrong."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ImportError(
            f"check_config needs tritonclient's protobuf: pip install 'tritonclient[grpc]' ({exc})"
        ) from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"not a valid Triton ModelConfig: {exc}") from None


def graph_tensors(onnx_path: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of an exported graph as batched Triton tensors (dims without the batch).

    Every input must carry the batch first: Triton joins requests on it. A graph exported without
    ``per_sample=True`` has a schedule (and Flux ids) shared by the batch: refused, with the way out.
    """
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)

    def specs(values, kind):
        out = []
        for value in values:
            shape = value.type.tensor_type.shape.dim
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in shape]
            names = [d.dim_param if d.HasField("dim_param") else None for d in shape]
            if not names or names[0] not in _BATCH_DIMS:
                raise ValueError(
                    f"{kind} {value.name!r} of {os.path.basename(onnx_path)} has no batch dimension (shape {dims}): "
                    "Triton batches requests on the first dimension of every tensor; export with "
                    "per_sample=True (`bypass-kernels export --per-sample`) and a dynamic batch"
                )
            elem = value.type.tensor_type.elem_type
            if elem not in _ONNX_TYPES:
                raise ValueError(f"{kind} {value.name!r}: ONNX element type {elem} has no Triton type here")
            out.append(TensorSpec(value.name, _ONNX_TYPES[elem], dims[1:], batch_only=len(dims) == 1))
        return out

    return specs(model.graph.input, "input"), specs(model.graph.output, "output")


def denoiser_config(
    onnx_path: str,
    *,
    name: str,
    backend: str = "onnxruntime",
    max_batch_size: int = 8,
    instances: int = 1,
    queue_delay_us: int = 2000,
    profile: dict | None = None,
) -> str:
    """The ``config.pbtxt`` of an exported denoiser (a per-sample graph) for ``backend``.

    ``tensorrt``: ``profile`` (``default_profile``'s (min, opt, max) shapes by input) gives the
    dimensions (fixed where min = max, else -1) and the largest batch the engine takes.
    """
    _check_denoiser(backend, max_batch_size, instances)
    inputs, outputs = graph_tensors(onnx_path)
    options: dict = {}
    if backend == "onnxruntime":
        options = dict(platform="onnxruntime_onnx", default_model_filename="model.onnx")
    elif backend == "python":
        options = dict(backend="python", kind="KIND_CPU", parameters={"graph": "model.onnx"})
    else:
        if profile is None:
            raise ValueError("backend 'tensorrt': pass the engine's profile (export.default_profile)")
        for spec in inputs:
            lo, _, hi = profile.get(spec.name, ((None,), None, (None,)))
            if lo[0] is not None:
                spec.dims = [a if a == b else -1 for a, b in zip(lo[1:], hi[1:], strict=True)]
        engine_batch = max(hi[0] for _, _, hi in profile.values())
        if max_batch_size > engine_batch:
            raise ValueError(f"max_batch_size {max_batch_size} is above the engine's largest batch {engine_batch}")
        options = dict(platform="tensorrt_plan", default_model_filename="model.plan")
    return config_text(
        name=name,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        instances=instances,
        queue_delay_us=queue_delay_us,
        **options,
    )


def pipeline_config(*, denoiser: str, latent_channels: int, schedule_len: int, instances: int = 4) -> str:
    """The ``config.pbtxt`` of the denoising-loop model: one image per request, the rest optional."""
    _check_count("instances", instances)
    fp32, i32 = "TYPE_FP32", "TYPE_INT32"
    inputs = [
        TensorSpec("encoder_hidden_states", fp32, [-1, -1]),
        TensorSpec("negative_encoder_hidden_states", fp32, [-1, -1], optional=True),
        TensorSpec("latents", fp32, [latent_channels, -1, -1], optional=True),
        TensorSpec("seed", "TYPE_INT64", [1], optional=True),
        TensorSpec("num_inference_steps", i32, [1], optional=True),
        TensorSpec("guidance_scale", fp32, [1], optional=True),
        TensorSpec("height", i32, [1], optional=True),
        TensorSpec("width", i32, [1], optional=True),
        TensorSpec("bypass_schedule", fp32, [schedule_len], optional=True),
        TensorSpec("bypass_spec", "TYPE_STRING", [1], optional=True),
    ]
    outputs = [TensorSpec("latents", fp32, [latent_channels, -1, -1])]
    return config_text(
        name=PIPELINE_MODEL,
        backend="python",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=0,
        instances=instances,
        kind="KIND_CPU",
        parameters={"denoiser": denoiser},
    )


def _check_denoiser(backend: str, max_batch_size: int, instances: int) -> None:
    if backend not in DENOISER_BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(DENOISER_BACKENDS)}, got {backend!r}")
    _check_count("max_batch_size", max_batch_size)
    _check_count("instances", instances)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a whole number of at least 1, got {value!r}")


def _loop_unet_problem(unet) -> str | None:
    """Why the pipeline model's loop (text conditioning and classifier-free guidance only) cannot drive
    ``unet``, or None."""
    config = getattr(unet, "config", {})
    if not hasattr(unet, "mid_block"):
        return "the loop drives UNets; serve this DiT's transformer model with a loop of your own"
    for key in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim"):
        if config.get(key) is not None:
            return f"the loop passes a text embedding only; this UNet also takes {key}={config[key]!r} (e.g. SDXL)"
    if config.get("cross_attention_dim") is None:
        return "the loop passes a text embedding; this UNet takes none"
    return None


def write_model_repository(
    model,
    folder: str,
    schedule=None,
    *,
    backend: str = "onnxruntime",
    pipeline: bool | None = None,
    scheduler=None,
    max_batch_size: int = 8,
    instances: int = 1,
    pipeline_instances: int = 4,
    queue_delay_us: int = 2000,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    fp16: bool = False,
    overwrite: bool = False,
    check: bool = True,
    **engine_ranges,
) -> RepositoryResult:
    """Write a Triton model repository for ``model`` (a pipeline, a UNet or a transformer) at ``folder``.

    The denoiser (``unet`` or ``transformer``) is exported with a schedule per sample and served by
    ``backend``: "onnxruntime" (Triton's ONNX Runtime backend), "python" (the same graph in ONNX Runtime
    inside the python backend, for servers without the onnxruntime backend) or "tensorrt" (an engine
    built here: needs TensorRT and the GPU it will serve on; ``engine_ranges``: ``resolution``,
    ``text_len`` as for ``build_engine``; the batch range is 1..``max_batch_size``).

    ``pipeline`` (default: when a scheduler is known, from the pipeline or ``scheduler=``, and the
    UNet takes a text embedding alone, as SD 1.x/2.x do) adds the denoising-loop model with
    ``pipeline_instances`` instances: that many requests denoise at once, and their denoiser calls are
    what the dynamic batcher (``queue_delay_us``) joins. Its defaults: ``num_inference_steps``,
    ``guidance_scale``, the schedule (``schedule``, or the patched model's, or ``default_schedule``).
    ``fp16``: a half-precision graph (the loop keeps float32 latents and casts at each call).
    """
    from bypass_kernels.export import to_onnx

    from bypass_kernels import targets

    _check_denoiser(backend, max_batch_size, instances)  # before the export, not after it
    _check_count("pipeline_instances", pipeline_instances)
    _check_count("num_inference_steps", num_inference_steps)
    if backend == "tensorrt":
        from bypass_kernels.export.tensorrt import require_installed

        require_installed("backend 'tensorrt'")
    if engine_ranges and backend != "tensorrt":
        raise ValueError(f"{', '.join(engine_ranges)}: engine shape ranges need backend='tensorrt'")
    folder = os.path.abspath(folder)
    if os.path.lexists(folder) and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    owner, _ = targets.find_owner(model, "write_model_repository")
    scheduler = scheduler if scheduler is not None else getattr(model, "scheduler", None)
    name = "unet" if hasattr(owner, "mid_block") else "transformer"
    problem = _loop_unet_problem(owner) or (None if scheduler is not None else "no scheduler: pass scheduler=")
    if pipeline and problem:
        raise ValueError(f"pipeline: {problem}")
    pipeline = problem is None if pipeline is None else pipeline

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        version = os.path.join(stage, name, "1")
        os.makedirs(version)
        result = to_onnx(owner, os.path.join(version, "model.onnx"), schedule, per_sample=True, fp16=fp16, check=check)
        profile = None
        if backend == "tensorrt":
            from bypass_kernels.export.profiles import default_profile
            from bypass_kernels.export.tensorrt import engine_bytes

            ranges = dict(engine_ranges, batch=(1, min(2, max_batch_size), max_batch_size))
            profile = default_profile(result.path, **ranges)
            with open(os.path.join(version, "model.plan"), "wb") as f:
                f.write(engine_bytes(result.path, **ranges))
        config = denoiser_config(
            result.path,
            name=name,
            backend=backend,
            max_batch_size=max_batch_size,
            instances=instances,
            queue_delay_us=queue_delay_us,
            profile=profile,
        )
        if backend == "tensorrt":
            for file in result.files:  # the engine holds the weights
                os.remove(os.path.join(version, os.path.basename(file)))
        if backend == "python":
            shutil.copy(os.path.join(_MODEL_FILES, "onnx_model.py"), os.path.join(version, "model.py"))
        _write(os.path.join(stage, name, "config.pbtxt"), config)
        models = [name]
        if pipeline:
            _write_pipeline(
                stage,
                name,
                owner,
                scheduler,
                result.schedule,
                pipeline_instances,
                model,
                fp16=result.fp16,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            models.append(PIPELINE_MODEL)
        _publish(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return RepositoryResult(folder, name, backend, models, result.max_error)


def _write_pipeline(stage, denoiser, unet, scheduler, schedule, instances, model, *, fp16, **defaults) -> None:
    table = schedule.table()
    channels = int(unet.config["in_channels"])
    version = os.path.join(stage, PIPELINE_MODEL, "1")
    os.makedirs(version)
    shutil.copy(os.path.join(_MODEL_FILES, "pipeline_model.py"), os.path.join(version, "model.py"))
    vae = getattr(model, "vae", None)
    vae_factor = 2 ** (len(vae.config["block_out_channels"]) - 1) if vae is not None else 8
    settings = {
        "denoiser": denoiser,
        "latent_channels": channels,
        "sample_size": int(unet.config["sample_size"]),
        "vae_scale_factor": vae_factor,
        "num_inference_steps": defaults["num_inference_steps"],
        "guidance_scale": float(defaults["guidance_scale"]),
        "dtype": "float16" if fp16 else "float32",  # the denoiser graph's inputs
        "schedule": schedule.to_dict(),
        "bypass_schedule": table.tolist(),
    }
    _write(os.path.join(version, "pipeline.json"), json.dumps(settings))
    _write(os.path.join(version, "scheduler_config.json"), scheduler.to_json_string())  # with its _class_name
    _write(
        os.path.join(stage, PIPELINE_MODEL, "config.pbtxt"),
        pipeline_config(denoiser=denoiser, latent_channels=channels, schedule_len=len(table), instances=instances),
    )


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _publish(stage: str, folder: str) -> None:
    """Rename the finished repository into place; an old one is moved aside first and removed after."""
    old = None
    if os.path.lexists(folder):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=os.path.dirname(folder))
        os.rename(folder, os.path.join(old, "repository"))
    os.rename(stage, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
