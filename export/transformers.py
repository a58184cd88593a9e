"""ONNX export of a patched diffusers transformer (SD3, Flux, PixArt-α/Σ), and an ONNX Runtime stand-in
for ``pipe.transformer``.

The graph takes the inputs the pipeline passes, by name (as NVIDIA's TensorRT demo names them):
``hidden_states``, ``encoder_hidden_states``, ``timestep`` (float32, in the units the pipeline
passes: Flux's t/1000), plus ``pooled_projections`` (SD3, Flux), ``img_ids``/``txt_ids`` and
``guidance`` (Flux with guidance embedding); output ``latent``. The schedule is the float32
initializer ``bypass_schedule`` (or, with ``schedule_as_input=True``, an input of that name),
indexed inside the graph by the timestep the time embedder receives. Named dimensions: ``batch``,
``sequence`` (text tokens), ``image_tokens`` (Flux's packed latents) or
``latent_height``/``latent_width`` (SD3, PixArt: multiples of the patch size).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
from bypass_kernels.export import staging
from bypass_kernels.export.onnx_export import (
    DEFAULT_OPSET,
    MIN_OPSET,
    OUTPUT_NAME,
    SCHEDULE_NAME,
    ExportResult,
    _check_target,
    _finish_graph,
    check_example_batch,
    check_tolerance,
    graph_metadata,
    onnxruntime_session,
    per_sample_check_table,
    trace_to_onnx,
)
from bypass_kernels.export.runtime import schedule_table, table_for_batch, takes_per_sample_schedule
from torch import nn

from bypass_kernels import patching, targets
from bypass_kernels.schedule import BypassSchedule, default_schedule

# inputs each family's graph takes, in order (besides bypass_schedule)
INPUTS = {
    "SD3Transformer2DModel": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    "FluxTransformer2DModel": (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    ),
    "PixArtTransformer2DModel": ("hidden_states", "encoder_hidden_states", "timestep"),
}
DIM_NAMES = {
    "encoder_hidden_states": ["batch", "sequence", None],
    "pooled_projections": ["batch", None],
    "timestep": ["batch"],
    "guidance": ["batch"],
    "img_ids": ["image_tokens", None],
    "txt_ids": ["sequence", None],
}
MAX_BATCH, MAX_SEQUENCE, MAX_IMAGE_TOKENS, MAX_LATENT = 1024, 4096, 65536, 1024
# timesteps (as the pipeline passes them) each export is checked at: per sample, ties, ends
CHECK_TIMESTEPS = ([999.0, 999.0], [980.5, 620.25], [499.5, 500.5], [1000.0, 0.0], [750.0, 10.0])


def family_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in INPUTS and cls.__module__.startswith("diffusers."):
            return cls.__name__
    supported = ", ".join(INPUTS)
    raise TypeError(
        f"to_onnx: {type(model).__name__} has no transformer export here (supported: {supported}); "
        "patch and run it in PyTorch instead"
    )


def input_names(model: nn.Module) -> tuple[str, ...]:
    names = INPUTS[family_name(model)]
    if "guidance" in names and not getattr(model.config, "guidance_embeds", False):
        names = tuple(n for n in names if n != "guidance")
    return names


def _units(family: str) -> float:
    return 1e-3 if family == "FluxTransformer2DModel" else 1.0  # Flux pipelines pass t/1000


def export_inputs(model: nn.Module, *, batch: int = 2, text_len: int = 8, dtype: torch.dtype | None = None) -> dict:
    """Example graph inputs by name, from the model's config (random values, seeded)."""
    family = family_name(model)
    config = model.config
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    size = config.get("sample_size", 16) or 16
    timestep = torch.full((batch,), 999.0 * _units(family))
    if family == "FluxTransformer2DModel":
        tokens = 16
        named = {
            "hidden_states": rand(batch, tokens, config.in_channels),
            "encoder_hidden_states": rand(batch, text_len, config.joint_attention_dim),
            "pooled_projections": rand(batch, config.pooled_projection_dim),
            "timestep": timestep,
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(text_len, 3),
            "guidance": torch.full((batch,), 3.5),
        }
    else:
        width = config.joint_attention_dim if family == "SD3Transformer2DModel" else config.caption_channels
        named = {
            "hidden_states": rand(batch, config.in_channels, size, size),
            "encoder_hidden_states": rand(batch, text_len, width),
            "timestep": timestep,
        }
        if family == "SD3Transformer2DModel":
            named["pooled_projections"] = rand(batch, config.pooled_projection_dim)
    named = {k: named[k] for k in input_names(model)}
    if dtype is not None:
        named = {k: v if k in ("timestep", "img_ids", "txt_ids") else v.to(dtype) for k, v in named.items()}
    return named


class TransformerForExport(nn.Module):
    """The transformer with the graph's input names; the schedule travels as ``bypass_schedule``."""

    def __init__(self, model: nn.Module, schedule: BypassSchedule | None):
        super().__init__()
        self.model = model
        self.family = family_name(model)
        if schedule is not None:  # baked in: an initializer named after this buffer
            self.register_buffer(SCHEDULE_NAME, schedule.table())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        bypass_schedule: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table = getattr(self, SCHEDULE_NAME) if bypass_schedule is None else bypass_schedule
        # Flux's ids with a batch dimension (per-sample graphs: every input a serving engine batches has it);
        # the rows are equal, as the pipeline makes them
        img_ids = img_ids[0] if img_ids is not None and img_ids.dim() == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids is not None and txt_ids.dim() == 3 else txt_ids
        kwargs = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states, "timestep": timestep}
        if self.family == "PixArtTransformer2DModel":
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        for name, value in (
            ("pooled_projections", pooled_projections),
            ("img_ids", img_ids),
            ("txt_ids", txt_ids),
            ("guidance", guidance),
        ):
            if value is not None:
                kwargs[name] = value
        with patching._controller(self.model).table_for_calls(table):
            return self.model(**kwargs, return_dict=False)[0]


def _dynamic_shapes(named: dict, *, patch: int, dynamic_batch: bool, dynamic_shape: bool) -> dict:
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=MAX_BATCH)
    sequence = Dim("sequence", min=1, max=MAX_SEQUENCE)
    tokens = Dim("image_tokens", min=1, max=MAX_IMAGE_TOKENS)
    specs: dict[str, dict | None] = {}
    for name, value in named.items():
        spec: dict[int, object] = {}
        if name == SCHEDULE_NAME:
            specs[name] = {0: batch} if dynamic_batch and value.dim() == 2 else None  # [batch, T]: per sample
            continue
        batched_ids = name in ("img_ids", "txt_ids") and value.dim() == 3  # [batch, n, 3] (per-sample graphs)
        if dynamic_batch and (name not in ("img_ids", "txt_ids") or batched_ids):
            spec[0] = batch
        if dynamic_shape:
            if name == "encoder_hidden_states":
                spec[1] = sequence
            elif name == "txt_ids":
                spec[int(batched_ids)] = sequence
            elif name == "img_ids":
                spec[int(batched_ids)] = tokens
            elif name == "hidden_states" and value.dim() == 3:
                spec[1] = tokens
            elif name == "hidden_states":
                spec[2] = Dim("latent_height", min=2, max=MAX_LATENT // patch) * patch
                spec[3] = Dim("latent_width", min=2, max=MAX_LATENT // patch) * patch
        specs[name] = spec or None
    return specs


def _squeeze_dim(self, dim: int):
    """aten.squeeze.dim for the ONNX exporter: squeezing a dimension that is not 1 is a no-op in
    PyTorch but an invalid graph in ONNX (PixArt squeezes its token dimension). A dynamic dimension
    is one the trace saw above 1 (its range starts at 4 tokens), so it is left as it is too."""
    from onnxscript import opset18 as op

    shape = self.shape
    if shape is not None and shape[dim] == 1:
        return op.Squeeze(self, op.Constant(value_ints=[dim]))
    return op.Identity(self)


def _dim_names(named: dict) -> dict[str, list]:
    names = dict(DIM_NAMES)
    latent_4d = named["hidden_states"].dim() == 4
    names["hidden_states"] = (
        ["batch", None, "latent_height", "latent_width"] if latent_4d else ["batch", "image_tokens", None]
    )
    names[OUTPUT_NAME] = names["hidden_states"]
    for ids in ("img_ids", "txt_ids"):
        if ids in named and named[ids].dim() == 3:
            names[ids] = ["batch", *names[ids]]
    names[SCHEDULE_NAME] = ["batch", None]  # [batch, T] per sample ([T] is static: no label)
    return names


@contextlib.contextmanager
def _export_state(model, schedule):
    own = patching.get_schedule(model)
    if schedule is None:
        if own is None:
            schedule = default_schedule()
            warnings.warn(
                f"to_onnx: the model is not patched and no schedule was given; exporting with {schedule!r}",
                stacklevel=4,
            )
        else:
            schedule = own
    if own is None:
        with patching.patched(model, schedule, backend="torch"):
            yield schedule
        return
    controller = patching._controller(model)
    backend = controller.backend
    try:  # the model's own span and streams stay; only the backend and table are the export's
        patching.patch(model, schedule, backend="torch")
        yield schedule
    finally:
        patching.patch(model, own, backend=backend)


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
    text_len: int = 8,
    check: bool = True,
) -> ExportResult:
    """Export a diffusers transformer (SD3, Flux, PixArt; or a pipeline's ``transformer``) to ONNX at
    ``path`` with the bypass in the graph. As the UNet export: a patched model exports with its own
    schedule and span, ``schedule=`` with another schedule, an unpatched model with
    ``default_schedule`` and the family's default span (with a warning); staged, checked with
    ONNX Runtime at several timesteps, and only then renamed into place (kill-safe). ``per_sample``:
    the schedule is an input [batch, T], a schedule per sample, and Flux's ``img_ids``/``txt_ids``
    take a batch dimension too (every input a serving engine batches has one)."""
    import onnx  # noqa: F401  (fail early with the install hint)

    schedule_as_input = schedule_as_input or per_sample
    owner, _ = targets.find_owner(model, "to_onnx")
    family_name(owner)
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset: the graph needs ONNX opset {MIN_OPSET} or newer, got {opset!r}")
    if schedule is not None and not isinstance(schedule, BypassSchedule):
        raise TypeError(f"schedule: expected a BypassSchedule, got {type(schedule).__name__}")
    check_example_batch(batch, dynamic_batch, MAX_BATCH)
    path = _check_target(path, overwrite)
    name = os.path.basename(path)
    with staging.Staging(os.path.dirname(path)) as stage, _export_state(owner, schedule) as schedule:
        source = owner
        if fp16:
            import copy

            source = copy.deepcopy(owner).half()
        dtype = torch.float16 if fp16 else None
        wrapper = TransformerForExport(source, None if schedule_as_input else schedule).eval()
        named = export_inputs(source, batch=batch, text_len=text_len, dtype=dtype)
        if per_sample:
            named[SCHEDULE_NAME] = per_sample_check_table(schedule, batch)
            for ids in ("img_ids", "txt_ids"):
                if ids in named:
                    named[ids] = named[ids].expand(batch, -1, -1).contiguous()
        elif schedule_as_input:
            named[SCHEDULE_NAME] = schedule.table()
        patch = int(getattr(source.config, "patch_size", 1) or 1)
        dynamic = _dynamic_shapes(named, patch=patch, dynamic_batch=dynamic_batch, dynamic_shape=dynamic_shape)
        staged = stage.file(name)
        trace_to_onnx(
            wrapper,
            named,
            staged,
            dynamic_shapes=dynamic,
            opset=opset,
            custom_translation_table={torch.ops.aten.squeeze.dim: _squeeze_dim},
        )
        meta = {
            "fp16": str(fp16).lower(),
            "family": family_name(source),
            "text_len": str(text_len),
            "latent_multiple": str(patch),
            "transformer_config": json.dumps(dict(source.config), default=list),
        }
        if named["hidden_states"].dim() == 4:
            meta["latent_size"] = str(named["hidden_states"].shape[2])
        else:
            meta["image_tokens"] = str(named["hidden_states"].shape[1])
        _finish_graph(
            staged,
            schedule,
            schedule_as_input=schedule_as_input,
            meta=meta,
            dim_names=_dim_names(named),
            per_sample=per_sample,
        )
        files = sorted(n for n in os.listdir(stage.path) if n == name or n.startswith(name + "."))
        error = None
        if check:
            base = {k: v for k, v in named.items() if k != "timestep"}
            error = max_relative_error(onnxruntime_session(staged, ["CPUExecutionProvider"]), source, base)
            limit = check_tolerance(fp16)
            if not error <= limit:
                raise RuntimeError(f"export check: ONNX Runtime differs from PyTorch by {error:.3g} (limit {limit:g})")
        published = stage.publish(files, overwrite=overwrite, graph=name)
    return ExportResult(
        path, list(named), schedule, opset, fp16, schedule_as_input, published, error, text_len, per_sample
    )


def reference_output(model: nn.Module, named: dict) -> torch.Tensor:
    """What the graph should compute: the patched PyTorch model on the same named inputs."""
    wrapper = TransformerForExport(model, None)
    table = named.get(SCHEDULE_NAME)
    if table is None:
        table = patching._controller(model).table
    args = {k: v for k, v in named.items() if k != SCHEDULE_NAME}
    with torch.no_grad():
        return wrapper(**args, bypass_schedule=table)


def max_relative_error(session, model: nn.Module, base: dict) -> float:
    """Largest error of the graph against the patched model over ``CHECK_TIMESTEPS`` (in the
    units the pipeline passes), relative to the largest output magnitude."""
    from bypass_kernels.export.onnx_export import run_onnx

    units = _units(family_name(model))
    worst = 0.0
    batch = base["hidden_states"].shape[0]
    for values in CHECK_TIMESTEPS:
        t = torch.tensor((values * batch)[:batch]) * units
        named = {**base, "timestep": t}
        expected = reference_output(model, named).float()
        got = run_onnx(session, named).float()
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


class OnnxRuntimeTransformer:
    """An exported transformer run by ONNX Runtime, usable as ``pipe.transformer`` (SD3, Flux, PixArt-Σ).

    It takes the pipeline's keyword call (``hidden_states=…, timestep=…, encoder_hidden_states=…``,
    and ``pooled_projections``, ``img_ids``, ``txt_ids``, ``guidance`` where the family has them)
    and has what those pipelines read from ``pipe.transformer``: ``config`` (the model's, stored in
    the graph), ``dtype``, ``device`` and ``cache_context``. Inputs the graph has no room for
    (ControlNet samples, attention kwargs with a LoRA scale, IP-adapter embeddings) raise TypeError.
    ``schedule``/``set_schedule`` as ``OnnxRuntimeUNet``.
    """

    _IGNORED_NONE = (
        "joint_attention_kwargs",
        "attention_kwargs",
        "block_controlnet_hidden_states",
        "controlnet_block_samples",
        "controlnet_single_block_samples",
        "skip_layers",
        "attention_mask",
        "encoder_attention_mask",
        "added_cond_kwargs",
        "cross_attention_kwargs",
    )

    def __init__(self, path: str, *, providers=None, schedule=None, session_options=None):
        from bypass_kernels.export.runtime import _ORT_TYPES, _frozen_config

        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no graph at {path!r}")
        meta = graph_metadata(path)
        if "transformer_config" not in meta:
            raise ValueError(f"path: {path!r} is not a transformer graph from export.to_onnx (no transformer config)")
        self.metadata = meta
        self.config = _frozen_config(json.loads(meta["transformer_config"]))
        self.session = onnxruntime_session(path, providers, session_options)
        specs = self.session.get_inputs()
        self.input_shapes = {s.name: list(s.shape) for s in specs}
        self.input_dtypes = {s.name: _ORT_TYPES.get(s.type, torch.float32) for s in specs}
        self.dtype = self.input_dtypes["hidden_states"]
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda" if on_cuda else "cpu")
        self._table = None
        self.schedule = None
        if SCHEDULE_NAME in self.input_shapes:
            self.set_schedule(BypassSchedule.parse(meta["schedule"]) if schedule is None else schedule)
        elif schedule is not None:
            raise ValueError("set_schedule: this graph has its schedule baked in; export with schedule_as_input=True")

    @property
    def per_sample(self) -> bool:
        """Whether the graph takes a schedule per sample (``bypass_schedule`` [batch, T])."""
        return takes_per_sample_schedule(self.input_shapes)

    def set_schedule(self, schedule) -> None:
        """As ``OnnxRuntimeUNet.set_schedule``: a schedule, or for a per-sample graph a list of schedules
        (one per image) or a [rows, T] tensor."""
        if SCHEDULE_NAME not in self.input_shapes:
            raise ValueError("set_schedule: this graph has its schedule baked in; export with schedule_as_input=True")
        table = schedule_table(schedule, per_sample=self.per_sample)
        length = self.input_shapes[SCHEDULE_NAME][-1]
        if table.dtype != torch.float32 or (isinstance(length, int) and table.shape[-1] != length):
            raise ValueError(f"set_schedule: expected a float32 table of length {length}, got {tuple(table.shape)}")
        self._table = table
        self.schedule = schedule if isinstance(schedule, (BypassSchedule, list, tuple)) else None

    @contextlib.contextmanager
    def cache_context(self, name: str):
        yield  # Flux pipelines enter it around each call; the graph caches nothing

    def to(self, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.dtype) and value != self.dtype:
                raise ValueError(f"to: an exported graph keeps its dtype ({self.dtype}); export another for {value}")
        return self

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        if len(args) == 1 and "hidden_states" not in kwargs:  # PixArt's pipelines pass the latents positionally
            kwargs["hidden_states"] = args[0]
        elif args:
            raise TypeError("the ONNX transformer takes hidden_states and then keywords, as diffusers pipelines do")
        for name in list(kwargs):
            if name in self.input_shapes:
                continue
            if name in self._IGNORED_NONE and not kwargs[name]:
                kwargs.pop(name)
                continue
            raise TypeError(f"{name}: the exported graph has no input for it (inputs: {', '.join(self.input_shapes)})")
        missing = [n for n in self.input_shapes if n not in kwargs and n != SCHEDULE_NAME]
        if missing:
            raise TypeError(f"missing graph inputs: {', '.join(missing)}")
        hidden = kwargs["hidden_states"]
        batch = hidden.shape[0]
        t = torch.as_tensor(kwargs["timestep"]).reshape(-1).float()
        kwargs["timestep"] = t.expand(batch) if t.numel() == 1 else t
        if "guidance" in kwargs:
            g = torch.as_tensor(kwargs["guidance"]).reshape(-1).float()
            kwargs["guidance"] = g.expand(batch) if g.numel() == 1 else g
        if SCHEDULE_NAME in self.input_shapes:
            kwargs[SCHEDULE_NAME] = table_for_batch(self._table, batch) if self.per_sample else self._table
        for ids in ("img_ids", "txt_ids"):  # a per-sample graph takes them with the batch dimension
            if ids in kwargs and len(self.input_shapes[ids]) == 3 and torch.as_tensor(kwargs[ids]).dim() == 2:
                kwargs[ids] = torch.as_tensor(kwargs[ids]).expand(batch, -1, -1)
        arrays = {
            name: torch.as_tensor(value).detach().to("cpu", self.input_dtypes[name]).contiguous().numpy()
            for name, value in kwargs.items()
        }
        out = torch.from_numpy(self.session.run([OUTPUT_NAME], arrays)[0]).to(hidden.device, hidden.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
