"""What a patch attaches to: the model, the span of blocks it bypasses, and where the timestep is.

``resolve`` turns what the user passed (a model, a compiled model, a pipeline) into a
``Target``:

- a diffusers UNet: the span is its mid-block; the timestep is read where the forward hands it to
  ``time_proj``, inside the forward;
- a diffusers transformer (DiT): the span is a run of blocks i..j over its block lists in execution
  order (Flux: ``transformer_blocks`` then ``single_transformer_blocks``); the timestep is read at
  the model's time embedder, the first submodule its forward passes it to (``TRANSFORMERS``);
- any other module with a ``mid_block``: the timestep is read from its own ``timestep`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn


# --------------------------------------------------------------------- what a patch attaches to
@dataclass(frozen=True)
class Stream:
    """One tensor stream of a span: where it enters block i and where it leaves block j."""

    name: str  # the keyword of block i's forward (``hidden_states``)
    position: int  # its positional index in block i's forward
    output_index: int | None  # its index in block j's output tuple; None: the output is this tensor
    blend: bool = True  # False: carried through unchanged (e.g. the text stream, when asked)


@dataclass(frozen=True)
class Span:
    """Blocks ``first`` .. ``last`` (the same module for a span of one) and their streams."""

    first: nn.Module
    last: nn.Module
    streams: tuple[Stream, ...]
    modules: tuple[nn.Module, ...]  # every block of the span, in order (for checks)
    single: bool = field(init=False)  # one stream, which block j returns as a tensor (a UNet's mid-block)

    def __post_init__(self):
        object.__setattr__(self, "single", len(self.streams) == 1 and self.streams[0].output_index is None)

    def __repr__(self) -> str:  # class names, not the modules' own (long) reprs
        blocks = type(self.first).__name__ if self.first is self.last else f"{len(self.modules)} blocks"
        streams = ", ".join(s.name + ("" if s.blend else " (passed through)") for s in self.streams)
        return f"Span({blocks}; {streams})"


@dataclass(frozen=True)
class Carrier:
    """Where the timestep is read. ``module`` None: the model's own argument ``arg`` (name, position)."""

    module: nn.Module | None
    scale: float = 1.0  # table units per unit the carrier receives: table t = offset + scale · t
    arg: tuple[str, int] = ("timestep", 1)
    offset: float = 0.0  # Mochi's model receives 1000 − t: offset 1000, scale −1
    first_half: bool = False  # QwenImage with zero_cond_t embeds [t, 0·t] (the image, its reference): λ from t

    def __repr__(self) -> str:
        where = type(self.module).__name__ if self.module is not None else f"the model's {self.arg[0]!r} argument"
        return f"Carrier({where}, scale={self.scale:g}, offset={self.offset:g})"


# diffusers UNets whose forward passes the [batch] timesteps to ``self.time_proj`` once per call
# (I2VGenXLUNet also projects fps with it, and class_embed_type="timestep" the class labels: those
# read the timestep from the model's argument instead).
UNET_CARRIERS = frozenset(
    {
        "UNet2DConditionModel",
        "UNet2DModel",
        "UNet3DConditionModel",
        "UNetMotionModel",
        "UNetSpatioTemporalConditionModel",
    }
)


@dataclass(frozen=True)
class BlockIO:
    """How a transformer block takes and returns its streams (diffusers 0.42)."""

    inputs: tuple[tuple[str, int], ...]  # (keyword, position) of each stream in forward; the image stream first
    outputs: dict  # stream keyword -> index in the returned tuple (None: the block returns that tensor)


_IMAGE_ONLY = BlockIO((("hidden_states", 0),), {"hidden_states": None})
_TEXT_FIRST = BlockIO(
    (("hidden_states", 0), ("encoder_hidden_states", 1)), {"encoder_hidden_states": 0, "hidden_states": 1}
)
_IMAGE_FIRST = BlockIO(
    (("hidden_states", 0), ("encoder_hidden_states", 1)), {"hidden_states": 0, "encoder_hidden_states": 1}
)
BLOCKS: dict[str, BlockIO] = {
    "JointTransformerBlock": _TEXT_FIRST,  # SD3 / SD3.5 (the last block returns (None, hidden))
    "FluxTransformerBlock": _TEXT_FIRST,
    "FluxSingleTransformerBlock": _TEXT_FIRST,
    "QwenImageTransformerBlock": _TEXT_FIRST,
    "BasicTransformerBlock": _IMAGE_ONLY,  # PixArt-α/Σ
    "SanaTransformerBlock": _IMAGE_ONLY,
    "WanTransformerBlock": _IMAGE_ONLY,
    "LTXVideoTransformerBlock": _IMAGE_ONLY,
    "CogVideoXBlock": _IMAGE_FIRST,
    "MochiTransformerBlock": _IMAGE_FIRST,
    "HunyuanVideoTransformerBlock": _IMAGE_FIRST,
    "HunyuanVideoSingleTransformerBlock": _IMAGE_FIRST,
    "HunyuanVideoTokenReplaceTransformerBlock": _IMAGE_FIRST,
    "HunyuanVideoTokenReplaceSingleTransformerBlock": _IMAGE_FIRST,
}


@dataclass(frozen=True)
class Family:
    """A diffusers transformer class: its block lists in execution order and its time embedder."""

    block_lists: tuple[str, ...]
    embedder: str  # submodule whose first argument is the call's timestep, once per call
    scale: float = 1.0  # table units per unit the embedder receives (QwenImage: σ in [0, 1])
    reversed: bool = False  # the model receives 1000 − t (Mochi: its scheduler inverts σ); the table is read at t
    presets: tuple[tuple[str, tuple[int, int], str], ...] = ()  # (name, (i, j), source)


_STG = "spatiotemporal skip guidance, arXiv 2411.18664"
TRANSFORMERS: dict[str, Family] = {
    "SD3Transformer2DModel": Family(
        ("transformer_blocks",),
        "time_text_embed",
        presets=(("sd3.5-slg", (7, 9), "skip-layer guidance layers of SD3.5 Medium, Stability-AI/sd3.5 sd3_infer.py"),),
    ),
    "FluxTransformer2DModel": Family(("transformer_blocks", "single_transformer_blocks"), "time_text_embed"),
    "PixArtTransformer2DModel": Family(("transformer_blocks",), "adaln_single"),
    "SanaTransformer2DModel": Family(("transformer_blocks",), "time_embed"),
    "WanTransformer3DModel": Family(("blocks",), "condition_embedder", presets=(("stg", (2, 2), _STG),)),
    "CogVideoXTransformer3DModel": Family(("transformer_blocks",), "time_proj", presets=(("stg", (11, 11), _STG),)),
    "HunyuanVideoTransformer3DModel": Family(
        ("transformer_blocks", "single_transformer_blocks"), "time_text_embed", presets=(("stg", (2, 2), _STG),)
    ),
    "LTXVideoTransformer3DModel": Family(("transformer_blocks",), "time_embed", presets=(("stg", (19, 19), _STG),)),
    "MochiTransformer3DModel": Family(
        ("transformer_blocks",), "time_embed", reversed=True, presets=(("stg", (34, 34), _STG),)
    ),
    "QwenImageTransformer2DModel": Family(("transformer_blocks",), "time_text_embed", scale=1000.0),
}


@dataclass(frozen=True)
class Target:
    owner: nn.Module  # the model whose forward runs the span
    pipeline: object | None  # the pipeline it was reached through, if any
    carrier: Carrier
    span: Span
    family: str  # "unet", "transformer" or "module" (a model this package does not know by class)


# --------------------------------------------------------------------- finding the model
def models_of(model, caller: str = "patch") -> tuple[list[nn.Module], object | None]:
    """([the model(s) to patch], the pipeline they came from or None). A pipeline gives its ``unet``
    or its ``transformer`` and ``transformer_2`` (Wan 2.2's second expert), whichever of them is set."""
    pipeline = None
    found = [model]
    if not isinstance(model, nn.Module):
        experts = (getattr(model, "transformer", None), getattr(model, "transformer_2", None))
        transformers = [m for m in experts if m is not None]
        if getattr(model, "unet", None) is not None:
            pipeline, found = model, [model.unet]
        elif transformers:  # either may be None (Wan 2.2 pipelines load with transformer=None)
            pipeline, found = model, transformers
    found = [_unwrapped(m) for m in found]
    for m in found:
        if not isinstance(m, nn.Module) or not (hasattr(m, "mid_block") or _family(m) is not None):
            raise TypeError(
                f"bypass_kernels.{caller}: expected a diffusers UNet or transformer (see the support matrix), a "
                f"DiffusionPipeline, or an nn.Module with a .mid_block; got {type(model).__name__}, which has neither "
                "a mid-block nor known transformer blocks"
            )
    return found, pipeline


def _unwrapped(model):
    """The model inside a wrapper: a torch.compile'd module's ``_orig_mod``, or the ``module`` an engine's
    wrapper forwards to (xDiT's transformer wrappers, DataParallel-style), while the wrapper itself is no
    model this package knows."""
    for _ in range(8):
        if isinstance(model, nn.Module) and (_family(model) is not None or "mid_block" in model._modules):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = model._modules.get("module") if isinstance(model, nn.Module) else None
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def find_owner(model, caller: str = "patch") -> tuple[nn.Module, object | None]:
    """(the model to patch, the pipeline it came from or None): the first of ``models_of``."""
    found, pipeline = models_of(model, caller)
    return found[0], pipeline


def _family(model: nn.Module) -> Family | None:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("diffusers.") and cls.__name__ in TRANSFORMERS:
            return TRANSFORMERS[cls.__name__]
    return None


# --------------------------------------------------------------------- resolving
def resolve(
    owner: nn.Module,
    pipeline=None,
    caller: str = "patch",
    *,
    span=None,
    streams: str = "all",
    timestep_module: str | None = None,
    timestep_scale: float | None = None,
) -> Target:
    """The target for one model (from ``models_of``). ``span``: for a transformer, inclusive
    block indices ``(i, j)`` (or one index) over its blocks in execution order, a block name
    (``"single_transformer_blocks.3"``), a pair of names, or a preset name; None: the default
    span. ``streams``: ``"all"`` blends every stream a block returns, ``"image"`` the image stream only."""
    if streams not in ("all", "image"):
        raise ValueError(f"bypass_kernels.{caller}: streams must be 'all' or 'image', got {streams!r}")
    if timestep_scale is not None and (
        isinstance(timestep_scale, bool)
        or not isinstance(timestep_scale, (int, float))
        or not 0 < timestep_scale < math.inf
    ):
        raise ValueError(
            f"bypass_kernels.{caller}: timestep_scale must be a finite positive number (table units per unit the "
            f"timestep module receives, e.g. 1000.0 for a model given sigma in [0, 1]), got {timestep_scale!r}"
        )
    family = _family(owner)
    if family is not None:
        target_span = _transformer_span(owner, family, span, streams, caller)
        name = timestep_module or family.embedder
        scale = family.scale if timestep_scale is None else float(timestep_scale)
        offset = 0.0
        if family.reversed:  # table t = scale · (1000 − model t)
            scale, offset = -scale, 1000.0 * scale
        first_half = bool(getattr(getattr(owner, "config", None), "zero_cond_t", False))  # QwenImage-Edit-2511
        carrier = Carrier(_named_carrier(owner, name, caller), scale, offset=offset, first_half=first_half)
        return Target(owner, pipeline, carrier, target_span, "transformer")
    if span not in (None, "mid_block"):
        raise ValueError(
            f"bypass_kernels.{caller}: span={span!r}: {type(owner).__name__} bypasses its mid-block; span is for "
            "transformer models"
        )
    mid = owner.mid_block
    if mid is None:
        raise ValueError(
            f"bypass_kernels.{caller}: {type(owner).__name__} has no mid-block (mid_block is None, e.g. "
            "mid_block_type=None in its config), so there is nothing to bypass"
        )
    if not isinstance(mid, nn.Module):
        raise TypeError(f"bypass_kernels.{caller}: mid_block must be an nn.Module, got {type(mid).__name__}")
    unet_span = Span(first=mid, last=mid, streams=(Stream("hidden_states", 0, None),), modules=(mid,))
    module = _named_carrier(owner, timestep_module, caller) if timestep_module else _unet_carrier(owner)
    carrier = Carrier(module, 1.0 if timestep_scale is None else float(timestep_scale))
    return Target(owner, pipeline, carrier, unet_span, "unet" if module is not None else "module")


def _named_carrier(owner: nn.Module, name: str, caller: str) -> nn.Module:
    try:
        module = owner.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"bypass_kernels.{caller}: timestep_module={name!r}: {type(owner).__name__} has no such submodule"
        ) from None
    if module is owner:
        raise ValueError(f"bypass_kernels.{caller}: timestep_module must name a submodule, not the model itself")
    return module


def _unet_carrier(owner: nn.Module) -> nn.Module | None:
    """``owner.time_proj`` where ``owner`` is (a subclass of) a diffusers UNet that calls it once per
    call with the timesteps; None otherwise."""
    known = any(
        cls.__name__ in UNET_CARRIERS and cls.__module__.startswith("diffusers.") for cls in type(owner).__mro__
    )
    config = getattr(owner, "config", None)
    if getattr(config, "class_embed_type", None) == "timestep":  # time_proj also projects the class labels
        return None
    time_proj = owner._modules.get("time_proj")
    return time_proj if known and isinstance(time_proj, nn.Module) else None


# --------------------------------------------------------------------- transformer spans
def blocks_of(owner: nn.Module, family: Family) -> list[tuple[str, nn.Module]]:
    """(name, block) for every block in execution order, e.g. ``("single_transformer_blocks.0", …)``."""
    out = []
    for list_name in family.block_lists:
        for i, block in enumerate(getattr(owner, list_name, None) or ()):
            out.append((f"{list_name}.{i}", block))
    return out


def default_span(n: int) -> tuple[int, int]:
    """This package's own default: the middle 1/16 of the blocks (at least one), centred on block n//2
    (a UNet's mid-block is about that share of its depth). Not from the paper: no published work
    applies the partial bypass to transformers."""
    width = max(1, math.ceil(n / 16))
    i = max(0, n // 2 - width // 2)
    return i, min(n - 1, i + width - 1)


# The config key that counts each block list (every family here: num_layers for the first list).
_LAYER_COUNTS = {"single_transformer_blocks": "num_single_layers"}


def block_lists(owner: nn.Module) -> tuple[str, ...]:
    """The names of a transformer's block lists (none for a UNet)."""
    family = _family(owner)
    return family.block_lists if family is not None else ()


def check_blocks_whole(owner: nn.Module, caller: str) -> None:
    """Refuse a transformer whose block lists hold fewer blocks than its config names: an engine split
    them across processes (pipeline parallelism: xDiT's PipeFusion gives each stage a slice), so a
    span's blocks can run in different processes, and block numbers are no longer the model's."""
    config = getattr(owner, "config", None)
    for list_name in block_lists(owner):
        key = _LAYER_COUNTS.get(list_name, "num_layers")
        expected = config.get(key) if hasattr(config, "get") else None
        held = len(getattr(owner, list_name, None) or ())
        if isinstance(expected, int) and held != expected:
            raise ValueError(
                f"bypass_kernels.{caller}: {type(owner).__name__}.{list_name} holds {held} of the {expected} blocks "
                f"its config names ({key}): its blocks were split across processes (pipeline parallelism, e.g. "
                "xDiT's PipeFusion, gives each stage a slice), so a span's blocks may run in different processes. "
                "Run without pipeline parallelism (xDiT: pipefusion_parallel_degree=1; sequence and CFG "
                "parallelism keep every block in each process)"
            )


def _transformer_span(owner: nn.Module, family: Family, span, streams: str, caller: str) -> Span:
    check_blocks_whole(owner, caller)
    blocks = blocks_of(owner, family)
    n = len(blocks)
    if n == 0:
        raise ValueError(f"bypass_kernels.{caller}: {type(owner).__name__} has no transformer blocks")
    names = [name for name, _ in blocks]
    i, j = _span_indices(span, names, family, type(owner).__name__, caller)
    first, last = blocks[i][1], blocks[j][1]
    io_first, io_last = _block_io(first, caller), _block_io(last, caller)
    stream_list = []
    for k, (name, position) in enumerate(io_first.inputs):
        if name not in io_last.outputs:
            raise ValueError(
                f"bypass_kernels.{caller}: span {names[i]}..{names[j]}: block {type(first).__name__} takes "
                f"{name!r} but {type(last).__name__} does not return it; choose a span within one block kind"
            )
        stream_list.append(Stream(name, position, io_last.outputs[name], blend=(streams == "all" or k == 0)))
    return Span(first=first, last=last, streams=tuple(stream_list), modules=tuple(b for _, b in blocks[i : j + 1]))


def _block_io(block: nn.Module, caller: str) -> BlockIO:
    for cls in type(block).__mro__:
        if cls.__name__ in BLOCKS:
            return BLOCKS[cls.__name__]
    raise TypeError(
        f"bypass_kernels.{caller}: block class {type(block).__name__} is not one this package knows how its "
        f"streams enter and leave (known: {', '.join(sorted(BLOCKS))})"
    )


def _span_indices(span, names: list[str], family: Family, model: str, caller: str) -> tuple[int, int]:
    n = len(names)
    presets = {name: ij for name, ij, _ in family.presets}

    def index(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"bypass_kernels.{caller}: span: expected block indices or names, got {value!r}")
        if isinstance(value, str):
            if value not in names:
                raise ValueError(
                    f"bypass_kernels.{caller}: span: {model} has no block {value!r} (blocks: {names[0]} .. "
                    f"{names[-1]}; presets: {', '.join(presets) or 'none'})"
                )
            return names.index(value)
        if not 0 <= value < n:
            raise ValueError(
                f"bypass_kernels.{caller}: span: block index {value} is out of range 0..{n - 1} for {model}"
            )
        return value

    if span is None:
        return default_span(n)
    if isinstance(span, str) and span not in presets and span not in names:
        families = sorted(cls for cls, f in TRANSFORMERS.items() if any(p == span for p, _, _ in f.presets))
        if families:
            raise ValueError(
                f"bypass_kernels.{caller}: span preset {span!r} is for {', '.join(families)}, not {model} "
                f"(its presets: {', '.join(presets) or 'none'}); give this model's blocks as indices or names"
            )
    if isinstance(span, str) and span in presets:
        i, j = presets[span]
        if j >= n:
            raise ValueError(
                f"bypass_kernels.{caller}: span preset {span!r} is blocks {i}..{j}, but this {model} has {n} blocks"
            )
        return i, j
    if isinstance(span, (tuple, list)):
        if len(span) != 2:
            raise ValueError(f"bypass_kernels.{caller}: span: expected (first, last), got {span!r}")
        i, j = index(span[0]), index(span[1])
    else:
        i = j = index(span)
    if i > j:
        raise ValueError(f"bypass_kernels.{caller}: span: the first block ({i}) comes after the last ({j})")
    return i, j
