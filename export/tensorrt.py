"""TensorRT engines from the exported ONNX graph, and a runner that stands in for ``pipe.unet``.

One code path for TensorRT 10.x and 11.x, using only Python API present in both (checked against
NVIDIA/TensorRT ``python/src/infer/pyCore.cpp`` on release/10.0, release/10.13 and 11.1, and the
10.x → 11.x migration guide):

- precision: TensorRT 11 removed ``BuilderFlag.FP16`` (every network is strongly typed: the graph's
  own types decide). ``fp16`` is therefore set only where the enum has it (10.x, weakly typed); on
  11.x an fp16 engine needs an fp16 graph (``to_onnx(fp16=True)``) and asking fp16 of an fp32 graph
  is an error. fp32 builds clear ``BuilderFlag.TF32`` (present in both) so they stay fp32.
- ``IOptimizationProfile.set_shape`` raises on inconsistent shapes; ``add_optimization_profile``
  returns -1 on failure; ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return
  False on failure: every one is checked.
Device memory and streams are torch's; no pycuda or cuda-python is needed. Not run anywhere yet.
"""

from __future__ import annotations

import os

import torch
from bypass_kernels.export import staging
from bypass_kernels.export.onnx_export import OUTPUT_NAME, SCHEDULE_NAME, graph_metadata
from bypass_kernels.export.profiles import Profile, default_profile, describe
from bypass_kernels.export.runtime import PipelineUNet, load_config


def require_installed(what: str) -> None:
    """Refuse ``what`` before any work where TensorRT cannot be imported (the build would fail at its end)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        raise ValueError(
            f"{what}: TensorRT is not installed here (`pip install tensorrt` where the engine will run: it needs "
            "an NVIDIA GPU, and an engine is built for its GPU)"
        )


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: `pip install tensorrt` (Linux or Windows with an NVIDIA GPU and driver)"
        ) from exc
    return trt


def precision_flags(*, graph_fp16: bool, fp16: bool | None, has_fp16_flag: bool, version: str = "") -> tuple:
    """(BuilderFlag names to set, names to clear) for the requested precision. ``has_fp16_flag``: whether
    the installed TensorRT's ``BuilderFlag`` has ``FP16`` (10.x yes, 11.x no: strongly typed only)."""
    fp16 = graph_fp16 if fp16 is None else fp16
    if fp16 and not graph_fp16 and not has_fp16_flag:
        raise ValueError(
            f"fp16: TensorRT {version or '11'} builds strongly typed networks, so the engine's precision is the "
            "graph's, and this graph is fp32: export it with to_onnx(..., fp16=True) (CLI: --fp16), or build "
            "with fp16=False"
        )
    if not fp16 and graph_fp16:
        raise ValueError("fp16=False: this graph is fp16; export an fp32 graph for an fp32 engine")
    if fp16:
        return (["FP16"] if has_fp16_flag else []), []
    return [], ["TF32"]  # fp32 stays fp32 (TensorRT enables TF32 by default)


def engine_bytes(
    onnx_path: str,
    *,
    fp16: bool | None = None,
    batch=None,
    resolution=None,
    text_len=None,
    vae_scale_factor: int = 8,
    workspace_gib: float | None = None,
) -> bytes:
    """A serialized TensorRT engine for an exported UNet graph (see ``build_engine``)."""
    profile = default_profile(
        onnx_path, batch=batch, resolution=resolution, text_len=text_len, vae_scale_factor=vae_scale_factor
    )
    graph_fp16 = graph_metadata(onnx_path).get("fp16") == "true"
    trt = _tensorrt()
    set_flags, clear_flags = precision_flags(
        graph_fp16=graph_fp16, fp16=fp16, has_fp16_flag=hasattr(trt.BuilderFlag, "FP16"), version=trt.__version__
    )
    return _build(trt, onnx_path, profile, set_flags, clear_flags, workspace_gib)


def build_engine(
    onnx_path: str,
    engine_path: str,
    *,
    fp16: bool | None = None,
    batch=None,
    resolution=None,
    text_len=None,
    vae_scale_factor: int = 8,
    workspace_gib: float | None = None,
    overwrite: bool = False,
) -> str:
    """Build and serialize a TensorRT engine for an exported UNet graph; returns ``engine_path``.

    ``fp16``: None follows the graph (fp16 graph → fp16 engine); True on an fp32 graph works on
    TensorRT 10 only (see the module doc). ``batch``, ``resolution`` (pixels) and ``text_len`` are
    ints or (min, opt, max) triples; see ``default_profile`` for defaults and checks. The engine
    is written in a staging folder and renamed into place when complete.
    """
    engine_path = os.path.abspath(engine_path)
    folder = os.path.dirname(engine_path)
    if os.path.exists(engine_path) and not overwrite:
        raise FileExistsError(f"engine_path: {engine_path!r} exists; pass overwrite=True to replace it")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"engine_path: {folder!r} is not writable")
    serialized = engine_bytes(
        onnx_path,
        fp16=fp16,
        batch=batch,
        resolution=resolution,
        text_len=text_len,
        vae_scale_factor=vae_scale_factor,
        workspace_gib=workspace_gib,
    )
    with staging.Staging(folder) as stage:
        with open(stage.file(os.path.basename(engine_path)), "wb") as f:
            f.write(serialized)
        stage.publish([os.path.basename(engine_path)], overwrite=overwrite)
    return engine_path


def _build(trt, onnx_path: str, profile: Profile, set_flags, clear_flags, workspace_gib) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 0: explicit batch (the only mode in 10 and 11); strongly typed is implied on 11, weakly typed on 10.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path!r}: {errors}")
    config = builder.create_builder_config()
    for name in set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name in profile:
            lo, opt, hi = profile[name]
            try:
                opt_profile.set_shape(name, lo, opt, hi)
            except RuntimeError as exc:
                raise ValueError(f"TensorRT refused the profile for {describe(profile, name)}: {exc}") from None
    if config.add_optimization_profile(opt_profile) < 0:
        raise ValueError(
            "TensorRT refused the optimization profile: " + "; ".join(describe(profile, n) for n in profile)
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine; the log above says why")
    return bytes(memoryview(serialized))


class _Slot:
    """One execution context bound to one set of input shapes (and, with CUDA graphs, its capture)."""

    def __init__(self, context, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.context, self.inputs, self.output = context, inputs, output
        self.graph = None


class TensorRTUNet(PipelineUNet):
    """Runs a bypass UNet engine; usable as ``pipe.unet`` (see ``bypass_kernels.export.runtime``).

    ``config``: the UNet's config (dict, diffusers config or JSON path); default ``config.json`` beside
    the engine, as ``bypass-kernels export`` writes it. ``cuda_graph=True`` captures one CUDA graph per
    input shape, each with its own execution context, and replays it. ``schedule``: for engines exported
    with ``schedule_as_input=True`` (default: ``bypass_schedule.json`` beside the engine); ``set_schedule``
    changes it between calls, captured graphs included. Work runs on the runner's own CUDA stream,
    ordered after the caller's current stream and before its later work.
    """

    def __init__(self, engine_path: str, *, config=None, device="cuda", cuda_graph: bool = False, schedule=None):
        trt = _tensorrt()
        self._trt = trt
        config = load_config(config, engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"could not load the TensorRT engine {engine_path!r} (built with another TensorRT?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_shapes = {n: list(self.engine.get_tensor_shape(n)) for n in inputs}
        self.input_dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in inputs}
        length = self.input_shapes.get(SCHEDULE_NAME, [None])[-1]
        self._setup(
            config,
            dtype=self._torch_dtype(self.engine.get_tensor_dtype(OUTPUT_NAME)),
            device=torch.device(device),
            schedule_len=length if isinstance(length, int) and length > 0 else None,
        )
        self.cuda_graph = cuda_graph
        self._stream = torch.cuda.Stream(self.device)
        self._slots: dict = {}
        self._plain = None  # the context used without CUDA graphs, and the shapes it is set to
        if self.takes_schedule:
            if schedule is None:
                path = os.path.join(os.path.dirname(os.path.abspath(engine_path)), "bypass_schedule.json")
                if not os.path.isfile(path):
                    raise ValueError(f"this engine takes {SCHEDULE_NAME!r} as an input: pass schedule=...")
                from bypass_kernels.schedule import BypassSchedule

                with open(path, encoding="utf-8") as f:
                    schedule = BypassSchedule.parse(f.read())
            self.set_schedule(schedule)
        elif schedule is not None:
            self.set_schedule(schedule)  # raises: baked in

    def _torch_dtype(self, trt_dtype):
        types = self._trt.DataType
        table = {types.FLOAT: torch.float32, types.HALF: torch.float16, types.BF16: torch.bfloat16}
        table.update({types.INT32: torch.int32, types.INT64: torch.int64})
        return table[trt_dtype]

    def profile_range(self, name: str) -> str:
        lo, opt, hi = (list(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        return f"min {lo}, opt {opt}, max {hi}"

    def _dynamic(self, name: str) -> bool:
        return any(d < 0 for d in self.input_shapes[name])

    def _check_profile(self, name: str, shape) -> None:
        lo, _, hi = (list(s) for s in self.engine.get_tensor_profile_shape(name, 0))
        if len(lo) == len(shape) and not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            raise ValueError(f"{name}: shape {list(shape)} is outside the engine's range ({self.profile_range(name)})")

    def _new_context(self, feeds: dict[str, torch.Tensor]):
        context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of device memory?)")
        self._set_shapes(context, feeds)
        return context

    def _set_shapes(self, context, feeds: dict[str, torch.Tensor]) -> None:
        for name, tensor in feeds.items():
            if not self._dynamic(name):
                continue  # static (bypass_schedule): its shape is part of the engine
            self._check_profile(name, tuple(tensor.shape))
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"{name}: TensorRT refused shape {list(tensor.shape)} (engine range {self.profile_range(name)})"
                )

    def _bind(self, context, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, tensor in [*feeds.items(), (OUTPUT_NAME, out)]:
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeError(f"{name}: TensorRT refused the tensor address")

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False); the log says why")

    def _execute(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {n: t.to(self.device, self.input_dtypes[n]).contiguous() for n, t in feeds.items()}
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # inputs made on the caller's stream are ready
        with torch.cuda.stream(self._stream):
            out = self._run_graph(feeds) if self.cuda_graph else self._run_plain(feeds)
        caller.wait_stream(self._stream)  # the caller's later work sees the output
        for tensor in feeds.values():
            tensor.record_stream(self._stream)  # made on the caller's stream, read on ours
        out.record_stream(caller)  # made on ours, read on the caller's
        return out

    def _run_plain(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        shapes = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if self._plain is None:
            self._plain = [self._new_context(feeds), shapes]
        elif self._plain[1] != shapes:
            self._set_shapes(self._plain[0], feeds)
            self._plain[1] = shapes
        context = self._plain[0]
        out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=self.dtype, device=self.device)
        self._bind(context, feeds, out)
        self._enqueue(context)
        return out

    def _run_graph(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        # A shared table is bound by address (set_schedule writes into it); a per-sample one is copied as any input
        bound = () if self.per_sample else (SCHEDULE_NAME,)
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items() if n not in bound)
        slot = self._slots.get(key)
        if slot is None:
            context = self._new_context(feeds)  # one context per captured graph
            static = {n: (self._table if n in bound else t.clone()) for n, t in feeds.items()}
            out = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=self.dtype, device=self.device)
            self._bind(context, static, out)
            self._enqueue(context)  # warm-up after the shape change: TensorRT allocates and sets up here
            self._stream.synchronize()
            slot = _Slot(context, static, out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue(context)
            slot.graph = graph
            self._slots[key] = slot
        for name, tensor in feeds.items():
            if name not in bound:
                slot.inputs[name].copy_(tensor)
        slot.graph.replay()
        return slot.output.clone()
