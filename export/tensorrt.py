"""TensorRT engines from the exported ONNX graph, and a runner that stands in for ``pipe.unet``.

Written against TensorRT 10's documented Python API (``tensorrt``): Builder, OnnxParser,
optimization profiles, ``build_serialized_network``, ``execute_async_v3`` with tensor addresses.
Device memory is torch's; no pycuda or cuda-python is needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from types import SimpleNamespace

import torch
from bypass_kernels.export.onnx_export import OUTPUT_NAME, SCHEDULE_NAME

Shapes = dict[str, tuple[int, ...]]


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: `pip install tensorrt` (Linux or Windows with an NVIDIA GPU and driver)"
        ) from exc
    return trt


def default_profile(onnx_path: str, *, batch=(1, 2, 8), latent=(32, 64, 128), sequence=(77, 77, 77)):
    """(min, opt, max) shapes for every dynamic input of an exported UNet graph.

    ``batch``, ``latent`` (latent height = width) and ``sequence`` are (min, opt, max) triples;
    ``timestep`` may hold 1 value or one per sample, so its range is [1, max batch].
    """
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    lo, mid, hi = {}, {}, {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if all(s is not None for s in static):
            continue  # static input (e.g. bypass_schedule): no profile entry needed
        for out, pick in ((lo, 0), (mid, 1), (hi, 2)):
            shape = []
            for d, s in zip(dims, static, strict=True):
                if s is not None:
                    shape.append(s)
                elif d.dim_param == "timestep_count":
                    shape.append((1, batch[1], batch[2])[pick])
                elif d.dim_param == "batch":
                    shape.append(batch[pick])
                elif d.dim_param in ("latent_height", "latent_width"):
                    shape.append(latent[pick])
                elif d.dim_param == "sequence":
                    shape.append(sequence[pick])
                else:
                    raise ValueError(f"default_profile: no rule for dimension {d.dim_param!r} of input {value.name!r}")
            out[value.name] = tuple(shape)
    return lo, mid, hi


def build_engine(
    onnx_path: str,
    engine_path: str,
    *,
    fp16: bool = True,
    min_shapes: Shapes | None = None,
    opt_shapes: Shapes | None = None,
    max_shapes: Shapes | None = None,
    workspace_gib: float | None = None,
    overwrite: bool = False,
) -> str:
    """Build and serialize a TensorRT engine for an exported UNet graph; returns ``engine_path``.

    Shapes are per input name; any left out come from :func:`default_profile`. ``fp16`` lets
    TensorRT pick half precision where it is faster (the timestep and the schedule table stay
    float32 as the graph declares them).
    """
    trt = _tensorrt()
    engine_path = os.path.abspath(engine_path)
    if os.path.exists(engine_path) and not overwrite:
        raise FileExistsError(f"engine_path: {engine_path!r} exists; pass overwrite=True to replace it")
    if not os.access(os.path.dirname(engine_path), os.W_OK):
        raise PermissionError(f"engine_path: {os.path.dirname(engine_path)!r} is not writable")
    lo, mid, hi = default_profile(onnx_path)
    lo.update(min_shapes or {})
    mid.update(opt_shapes or {})
    hi.update(max_shapes or {})

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path!r}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name in lo:
            profile.set_shape(name, lo[name], mid[name], hi[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine; the log above says why")
    fd, staged = tempfile.mkstemp(prefix=".engine_", dir=os.path.dirname(engine_path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(serialized)
        os.replace(staged, engine_path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
    return engine_path


class TensorRTUNet:
    """Runs a bypass UNet engine; callable like the diffusers UNet, so ``pipe.unet = TensorRTUNet(...)``.

    ``config``: the UNet's config (a dict or object); default: ``config.json`` beside the engine,
    as ``bypass-kernels export`` writes it. ``cuda_graph=True`` captures one CUDA graph per input
    shape and replays it (inputs are copied into static buffers first). ``schedule``: a table
    (float32, length T) for engines exported with ``schedule_as_input=True``.
    """

    def __init__(self, engine_path: str, *, config=None, device="cuda", cuda_graph: bool = False, schedule=None):
        trt = _tensorrt()
        self._trt = trt
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"could not load the TensorRT engine {engine_path!r} (built with another TensorRT?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}
        if config is None:
            path = os.path.join(os.path.dirname(os.path.abspath(engine_path)), "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        self.config = SimpleNamespace(**config) if isinstance(config, dict) else config
        self.schedule = None
        if SCHEDULE_NAME in self.input_names:
            if schedule is None:
                raise ValueError(f"this engine takes {SCHEDULE_NAME!r} as an input: pass schedule=BypassSchedule(...)")
            self.set_schedule(schedule)
        self.dtype = self._torch_dtype(self.engine.get_tensor_dtype(OUTPUT_NAME))

    def set_schedule(self, schedule) -> None:
        table = schedule.table() if hasattr(schedule, "table") else torch.as_tensor(schedule, dtype=torch.float32)
        table = table.to(self.device, torch.float32).contiguous()
        if self.schedule is None:
            self.schedule = table
        else:
            self.schedule.copy_(table)  # same storage: captured graphs see the new values

    def _torch_dtype(self, trt_dtype):
        trt = self._trt
        return {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
        }[trt_dtype]

    def _feeds(self, sample, timestep, encoder_hidden_states, added_cond_kwargs) -> dict[str, torch.Tensor]:
        timestep = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1)
        values = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        values.update(added_cond_kwargs or {})
        values[SCHEDULE_NAME] = self.schedule
        feeds = {}
        for name in self.input_names:
            if values.get(name) is None:
                raise ValueError(f"the engine needs input {name!r}")
            want = self._torch_dtype(self.engine.get_tensor_dtype(name))
            feeds[name] = values[name].to(self.device, want).contiguous()
        return feeds

    def _bind(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=self.dtype, device=self.device)
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        return out

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        if not self.cuda_graph:
            out = self._bind(feeds)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            return out
        key = tuple((k, tuple(v.shape)) for k, v in feeds.items())
        if key not in self._graphs:
            static = {k: v.clone() for k, v in feeds.items() if k != SCHEDULE_NAME}
            if SCHEDULE_NAME in feeds:
                static[SCHEDULE_NAME] = self.schedule
            out = self._bind(static)
            self.context.execute_async_v3(stream.cuda_stream)  # TensorRT needs one run before capture
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.graph(graph, stream=side):
                self.context.execute_async_v3(side.cuda_stream)
            stream.wait_stream(side)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for name, tensor in feeds.items():
            if name != SCHEDULE_NAME:
                static[name].copy_(tensor)
        graph.replay()
        return out.clone()

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        *args,
        added_cond_kwargs=None,
        return_dict: bool = True,
        **kwargs,
    ):
        if args:
            raise TypeError("TensorRTUNet takes sample, timestep, encoder_hidden_states positionally; the rest by name")
        unsupported = {k for k, v in kwargs.items() if v is not None and k not in ("cross_attention_kwargs",)}
        if unsupported:
            raise TypeError(f"TensorRTUNet: the engine has no inputs for {sorted(unsupported)}")
        latent = self._run(self._feeds(sample, timestep, encoder_hidden_states, added_cond_kwargs))
        latent = latent.to(sample.dtype)
        return SimpleNamespace(sample=latent) if return_dict else (latent,)

    forward = __call__
