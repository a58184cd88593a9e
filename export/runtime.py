"""What lets an exported UNet stand in for ``pipe.unet``, shared by the ONNX Runtime and TensorRT runners.

diffusers' SD, SDXL, image-to-image and ControlNet pipelines read these from ``pipe.unet`` (diffusers
0.3x, ``pipelines/stable_diffusion*/`` and ``pipelines/controlnet/``; ``tests/test_export_runtime.py``
lists them from the installed source and checks each):

- ``config`` with attribute access: ``in_channels``, ``sample_size``, ``time_cond_proj_dim``,
  ``addition_time_embed_dim``, ``_diffusers_version`` (and the rest of the UNet's config);
- ``add_embedding.linear_1.in_features`` (SDXL's check of its ``time_ids`` length);
- ``dtype`` and ``device``;
- the call: ``unet(sample, t, encoder_hidden_states=..., timestep_cond=None, cross_attention_kwargs=None,
  added_cond_kwargs=..., return_dict=False)[0]``, positionally or by keyword, with ``t`` a Python
  number, a 0-d tensor, ``[1]`` or ``[batch]``; ``return_dict=True`` gives ``.sample``.

Inputs the graph has no room for (ControlNet residuals, ``timestep_cond``, ``class_labels``, an attention
mask, LoRA scales) raise TypeError naming them, rather than being dropped.
"""

from __future__ import annotations

import inspect
import json
import os
from types import SimpleNamespace

import torch
from bypass_kernels.export.onnx_export import OUTPUT_NAME, SCHEDULE_NAME

# diffusers' UNet2DConditionModel.forward and UNet2DModel.forward, in their positional order.
_COND_PARAMS = (
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "added_cond_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
    "return_dict",
)
_UNCOND_PARAMS = ("class_labels", "return_dict")
_BATCH_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids")


def _signature(params) -> inspect.Signature:
    P = inspect.Parameter
    items = [P("sample", P.POSITIONAL_OR_KEYWORD), P("timestep", P.POSITIONAL_OR_KEYWORD)]
    items += [P(n, P.POSITIONAL_OR_KEYWORD, default=True if n == "return_dict" else None) for n in params]
    return inspect.Signature(items)


def _frozen_config(config: dict):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)  # a dict with attribute access, as diffusers models have


def load_config(config, *beside: str) -> dict:
    """``config`` as a plain dict: a dict, a diffusers config (FrozenDict), a path to a JSON file, or None
    (then ``config.json`` in the folder of the first of ``beside``)."""
    if config is None:
        path = os.path.join(os.path.dirname(os.path.abspath(beside[0])), "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"config: none given and no {path!r}; pass config= (the UNet's config dict)")
        config = path
    if isinstance(config, (str, os.PathLike)):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    if hasattr(config, "items"):
        return dict(config.items())
    raise TypeError(f"config: expected a dict, a diffusers config or a JSON path, got {type(config).__name__}")


def timestep_vector(timestep, batch: int, device) -> torch.Tensor:
    """A Python number, 0-d, [1] or [batch] timestep as a float32 vector of 1 or ``batch`` values."""
    plain = isinstance(timestep, (int, float, torch.Tensor)) and not isinstance(timestep, bool)
    if not plain and not hasattr(timestep, "__array__"):
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")
    t = torch.as_tensor(timestep)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timestep: expected real numbers, got {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
        raise ValueError(f"timestep: expected a number, [1] or [batch = {batch}] values, got shape {list(t.shape)}")
    return t.reshape(-1).to(device=device, dtype=torch.float32)


def schedule_table(schedule, *, per_sample: bool) -> torch.Tensor:
    """The float32 table a runner feeds: [T] from a BypassSchedule or a tensor; for a per-sample graph also
    [rows, T] from a list of schedules (one per image) or a 2-D tensor."""
    from bypass_kernels.schedule import BypassSchedule

    if isinstance(schedule, BypassSchedule):
        return schedule.table()
    if isinstance(schedule, torch.Tensor):
        table = schedule.detach()
    elif per_sample and isinstance(schedule, (list, tuple)):
        table = BypassSchedule.stack(schedule)
    else:
        kinds = "a BypassSchedule, a list of them (one per image) or a tensor" if per_sample else "a BypassSchedule"
        raise TypeError(f"schedule: expected {kinds} or a tensor, got {type(schedule).__name__}")
    if table.dim() != 1 and not (per_sample and table.dim() == 2):
        raise ValueError(
            f"schedule: expected a table of shape [T]{' or [rows, T]' if per_sample else ''}, got {list(table.shape)}"
            + ("" if per_sample else "; a schedule per sample needs a graph exported with per_sample=True")
        )
    return table


def takes_per_sample_schedule(input_shapes: dict) -> bool:
    """Whether a graph with these inputs takes a schedule per sample (``bypass_schedule`` [batch, T])."""
    return len(input_shapes.get(SCHEDULE_NAME, ())) == 2


def table_for_batch(table: torch.Tensor, batch: int) -> torch.Tensor:
    """The [batch, T] input of a per-sample graph from a runner's table: one schedule for every sample,
    or one per image (twice over where classifier-free guidance doubled the batch)."""
    from bypass_kernels.attached import table_rows

    if table.dim() == 1:
        return table.expand(batch, -1)
    return table_rows(table, batch).expand(batch, -1)


class PipelineUNet:
    """Base of the runners: the attributes and call convention of a diffusers UNet (see the module doc).

    Subclasses set ``input_shapes`` (name → declared dims: ints, or None/str where dynamic),
    ``input_dtypes`` (name → torch dtype) and implement ``_execute(feeds) -> latent``.
    """

    input_shapes: dict[str, list]
    input_dtypes: dict[str, torch.dtype]

    def _setup(self, config: dict, *, dtype: torch.dtype, device: torch.device, schedule_len: int | None):
        self.config = _frozen_config(config)
        self.dtype = dtype
        self.device = torch.device(device)
        self._schedule_len = schedule_len
        self._table = None
        self.schedule = None
        if config.get("addition_embed_type") == "text_time":
            width = config.get("projection_class_embeddings_input_dim")
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))
        self._conditional = "encoder_hidden_states" in self.input_shapes
        self._signature = _signature(_COND_PARAMS if self._conditional else _UNCOND_PARAMS)

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def takes_schedule(self) -> bool:
        return SCHEDULE_NAME in self.input_shapes

    @property
    def per_sample(self) -> bool:
        """Whether the graph takes a schedule per sample (``bypass_schedule`` [batch, T])."""
        return takes_per_sample_schedule(self.input_shapes)

    def set_schedule(self, schedule) -> None:
        """The bypass table for graphs exported with ``schedule_as_input=True``: a BypassSchedule or a
        float32 tensor of length T; for graphs exported with ``per_sample=True`` also a list of
        schedules, one per image of the pipeline's batch (the rows of a batch doubled by
        classifier-free guidance follow), or a [rows, T] tensor. Takes effect on the next call
        (captured CUDA graphs included)."""
        if not self.takes_schedule:
            raise ValueError(
                f"set_schedule: this graph has its schedule baked in; export with schedule_as_input=True to "
                f"change it at run time (graph inputs: {', '.join(self.input_shapes)})"
            )
        table = schedule_table(schedule, per_sample=self.per_sample)
        if table.is_floating_point() and not bool(torch.isfinite(table).all()):
            raise ValueError("schedule: the table has NaN or infinite values; λ must be finite (0 to 1)")
        if table.shape[-1] != self._schedule_len:
            raise ValueError(
                f"schedule: this graph takes a table of {self._schedule_len} values (its num_train_timesteps), "
                f"got shape {list(table.shape)}"
            )
        table = table.to(self.device, torch.float32).contiguous()
        if self._table is None or self._table.shape != table.shape:
            self._table = table
        else:
            self._table.copy_(table)  # same storage: bound addresses and captured graphs see the new values
        self.schedule = schedule

    # -- the call ---------------------------------------------------------------------------------
    def _bind_call(self, args, kwargs) -> dict:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}: {exc} (call it like the diffusers UNet)") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def _named_inputs(self, call: dict) -> dict[str, torch.Tensor]:
        sample = call["sample"]
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample: expected a tensor, got {type(sample).__name__}")
        unsupported = []
        for name, value in call.items():
            if name in ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "return_dict"):
                continue
            if name == "cross_attention_kwargs" and not value:
                continue
            if value is not None:
                unsupported.append(name)
        if unsupported:
            raise TypeError(
                f"{type(self).__name__}: the exported graph has no input for {', '.join(sorted(unsupported))}; "
                "export a graph that takes them, or run the PyTorch UNet"
            )
        named = {"sample": sample, "timestep": timestep_vector(call["timestep"], sample.shape[0], sample.device)}
        if self._conditional:
            if call.get("encoder_hidden_states") is None:
                raise ValueError("encoder_hidden_states: this graph needs it (a text-conditioned UNet)")
            named["encoder_hidden_states"] = call["encoder_hidden_states"]
        added = call.get("added_cond_kwargs") or {}
        wanted = [n for n in ("text_embeds", "time_ids") if n in self.input_shapes]
        missing = [n for n in wanted if added.get(n) is None]
        if missing:
            raise ValueError(f"added_cond_kwargs: this graph (SDXL-style) needs {', '.join(missing)}")
        extra = sorted(k for k, v in added.items() if k not in wanted and v is not None)
        if extra:
            raise TypeError(f"added_cond_kwargs: the exported graph has no input for {', '.join(extra)}")
        named.update({n: added[n] for n in wanted})
        if self.takes_schedule:
            if self._table is None:
                raise ValueError(f"this graph takes {SCHEDULE_NAME!r} as an input: call set_schedule(...) first")
            named[SCHEDULE_NAME] = table_for_batch(self._table, sample.shape[0]) if self.per_sample else self._table
        self._check_shapes(named)
        return named

    def _check_shapes(self, named: dict[str, torch.Tensor]) -> None:
        batch = named["sample"].shape[0]
        for name, tensor in named.items():
            declared = self.input_shapes[name]
            shape = list(tensor.shape)
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, shape, strict=False)
            ):
                shown = ["?" if not (isinstance(d, int) and d > 0) else d for d in declared]
                raise ValueError(f"{name}: the graph takes shape {shown}, got {shape}")
            if (name in _BATCH_INPUTS or (name == SCHEDULE_NAME and self.per_sample)) and shape[0] != batch:
                raise ValueError(f"{name}: batch {shape[0]} differs from the sample's batch {batch}")
        # The graph traces one path of the UNet's upsamplers, the one for sizes its downsampling divides.
        multiple = int(getattr(self, "metadata", {}).get("latent_multiple", 1))
        height, width = named["sample"].shape[2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"sample: this graph takes latent heights and widths that are multiples of {multiple} (the UNet's "
                f"downsampling), got {height}x{width}; choose an image size whose latents are (e.g. multiples of "
                f"{multiple * 8} pixels with an 8x VAE)"
            )

    def __call__(self, *args, **kwargs):
        call = self._bind_call(args, kwargs)
        named = self._named_inputs(call)
        sample = named["sample"]
        latent = self._execute(named).to(device=sample.device, dtype=sample.dtype)
        if not call["return_dict"]:
            return (latent,)
        return self._output(latent)

    forward = __call__

    def to(self, *args, **kwargs):
        """For pipelines that move ``pipe.unet`` (offload hooks call ``unet.to("cpu")``): the session or
        engine stays where it was created, so a device move is a no-op; a dtype change is refused."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.dtype) and value != self.dtype:
                raise ValueError(f"to: an exported graph keeps its dtype ({self.dtype}); export another for {value}")
        return self

    def _output(self, latent: torch.Tensor):
        if self._conditional:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=latent)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=latent)

    def _execute(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover (abstract)
        raise NotImplementedError


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


class OnnxRuntimeUNet(PipelineUNet):
    """An exported bypass UNet run by ONNX Runtime, usable as ``pipe.unet``.

    ``path``: the graph ``to_onnx`` wrote. ``config``: the UNet's config (dict, diffusers config or JSON
    path); default: the config stored in the graph at export, else ``config.json`` beside it.
    ``providers``: ONNX Runtime execution providers (default: CUDA where present, else CPU).
    ``schedule``: for graphs exported with ``schedule_as_input=True``; default: the schedule the graph
    was exported with (its metadata). ``set_schedule`` changes it between calls. ``session_options``:
    an ``onnxruntime.SessionOptions`` (e.g. threads, or ``session.intra_op.allow_spinning = "0"`` so
    that idle ONNX Runtime threads do not spin while PyTorch runs the rest of the pipeline).
    """

    def __init__(self, path: str, *, config=None, providers=None, schedule=None, session_options=None):
        from bypass_kernels.export.onnx_export import graph_metadata, onnxruntime_session

        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no graph at {path!r}")
        meta = graph_metadata(path)
        if config is None and "unet_config" in meta:
            config = json.loads(meta["unet_config"])
        config = load_config(config, path)
        self.session = onnxruntime_session(path, providers, session_options)
        specs = self.session.get_inputs()
        self.input_shapes = {s.name: list(s.shape) for s in specs}
        self.input_dtypes = {s.name: _ORT_TYPES.get(s.type, torch.float32) for s in specs}
        if "sample" not in self.input_shapes or "timestep" not in self.input_shapes:
            raise ValueError(f"path: {path!r} is not a UNet graph from to_onnx (inputs {list(self.input_shapes)})")
        on_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        length = self.input_shapes.get(SCHEDULE_NAME, [None])[-1]
        self._setup(
            config,
            dtype=self.input_dtypes["sample"],
            device=torch.device("cuda" if on_cuda else "cpu"),
            schedule_len=length if isinstance(length, int) else None,
        )
        self.metadata = meta
        if self.takes_schedule:
            if schedule is None:
                from bypass_kernels.schedule import BypassSchedule

                schedule = BypassSchedule.parse(meta["schedule"])
            self.set_schedule(schedule)
        elif schedule is not None:
            self.set_schedule(schedule)  # raises: the schedule is baked in

    def _execute(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays = {
            name: tensor.detach().to("cpu", self.input_dtypes[name]).contiguous().numpy()
            for name, tensor in feeds.items()
        }
        return torch.from_numpy(self.session.run([OUTPUT_NAME], arrays)[0])
