"""Shape ranges (TensorRT optimization profiles) derived from an exported graph's named dimensions.

The graph names its dynamic dimensions (``batch``, ``latent_height``/``latent_width``, ``sequence``,
``timestep_count``, and Flux's ``image_tokens``), so one range per name applies to every input that
carries it: the batch range is the same for ``sample``, ``encoder_hidden_states``, ``text_embeds``
and ``time_ids``, which TensorRT requires. Defaults come from what the graph was exported with (its
metadata): the text length (``text_len``: 77 for SD/SDXL, 8 for the tiny presets), the latent size,
the packed image length.
"""

from __future__ import annotations

Triple = tuple[int, int, int]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

DEFAULT_BATCH = (1, 2, 8)
# The limits the exporter declared for each named dimension (see onnx_export._dynamic_shapes).
MAX_BATCH = 1024
MAX_SEQUENCE = 1024
MAX_LATENT = 4096
MAX_IMAGE_TOKENS = 65536


def as_triple(name: str, value, *, unit: str = "") -> Triple:
    """``value`` (an int, or (min, opt, max)) as a checked triple of positive ints; errors name ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int or (min, opt, max), got {type(value).__name__}") from None
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise TypeError(f"{name}: expected an int or three ints (min, opt, max), got {value!r}")
    lo, opt, hi = items
    if lo < 1:
        raise ValueError(f"{name}: min must be at least 1{unit}, got {lo}")
    if not lo <= hi:
        raise ValueError(f"{name}: min {lo} is above max {hi}")
    if not lo <= opt <= hi:
        raise ValueError(f"{name}: opt {opt} lies outside min..max = {lo}..{hi}")
    return lo, opt, hi


def parse_range(option: str, text: str) -> Triple:
    """A CLI range: ``N`` or ``MIN:OPT:MAX``; errors name ``option``."""
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise ValueError(f"{option}: expected N or MIN:OPT:MAX, got {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{option}: expected whole numbers (N or MIN:OPT:MAX), got {text!r}") from None
    return as_triple(option, values[0] if len(values) == 1 else tuple(values))


def _graph_dims(onnx_path: str):
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    dims = {}
    for value in model.graph.input:
        dims[value.name] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim
        ]
    meta = {p.key: p.value for p in model.metadata_props}
    return dims, meta


def default_profile(
    onnx_path: str,
    *,
    batch=None,
    resolution=None,
    text_len=None,
    image_tokens=None,
    vae_scale_factor: int = 8,
) -> Profile:
    """(min, opt, max) shapes for every dynamic input of an exported UNet graph, by input name.

    ``batch`` (default (1, 2, 8)), ``resolution`` (image pixels, height and width alike; default:
    half to twice the size exported with) and ``text_len`` (default: the length exported with) are
    ints or (min, opt, max) triples; for a Flux graph the packed latent length ``image_tokens``
    follows from ``resolution`` (``(pixels / (2·vae_scale_factor))²``) or is given (default: a
    quarter to four times the length exported with). ``timestep`` takes [1] or [batch], so its range is
    (1, 1, max batch). Every opt lies within its min and max; an error names the range and the
    inputs it applies to. Inputs with no dynamic dimension (``bypass_schedule``) have no entry.
    """
    dims, meta = _graph_dims(onnx_path)
    carriers: dict[str, list[str]] = {}
    for name, shape in dims.items():
        for d in shape:
            if isinstance(d, str):
                carriers.setdefault(d, []).append(name)

    def users(dim: str) -> str:
        return ", ".join(carriers.get(dim, [])) or "no input"

    ranges: dict[str, Triple] = {}
    if "batch" in carriers or batch is not None:
        if "batch" not in carriers:
            fixed = dims.get("sample", dims.get("hidden_states"))[0]
            if as_triple("batch", batch) != (fixed, fixed, fixed):
                raise ValueError(f"batch: this graph's batch is fixed at {fixed} (exported with dynamic_batch=False)")
        else:
            b = as_triple(f"batch (for {users('batch')})", DEFAULT_BATCH if batch is None else batch)
            if b[2] > MAX_BATCH:
                raise ValueError(f"batch (for {users('batch')}): max {b[2]} is above the graph's limit {MAX_BATCH}")
            ranges["batch"] = b
            ranges["timestep_count"] = (1, 1, b[2])
    if "latent_height" in carriers:
        multiple = int(meta.get("bypass_kernels.latent_multiple", "1"))
        step = vae_scale_factor * multiple
        if resolution is None:
            exported = int(meta.get("bypass_kernels.latent_size", "64")) * vae_scale_factor
            resolution = (max(step, (exported // 2) // step * step), exported, exported * 2)
        lo, opt, hi = as_triple(f"resolution (pixels, for {users('latent_height')})", resolution)
        for value in (lo, opt, hi):
            if value % step:
                raise ValueError(
                    f"resolution: {value} is not a multiple of {step} (VAE factor {vae_scale_factor} × the UNet's "
                    f"downsampling {multiple}); allowed: multiples of {step} up to {MAX_LATENT * vae_scale_factor}"
                )
        if hi // vae_scale_factor > MAX_LATENT:
            raise ValueError(f"resolution: max {hi} is above the graph's limit {MAX_LATENT * vae_scale_factor}")
        ranges["latent_height"] = ranges["latent_width"] = (
            lo // vae_scale_factor,
            opt // vae_scale_factor,
            hi // vae_scale_factor,
        )
    elif resolution is not None and "image_tokens" not in carriers:
        raise ValueError("resolution: this graph's height and width are fixed (exported with dynamic_shape=False)")
    if "image_tokens" in carriers:
        if image_tokens is None and resolution is not None:
            lo, opt, hi = as_triple("resolution (pixels)", resolution)
            image_tokens = tuple(max(1, (r // (2 * vae_scale_factor)) ** 2) for r in (lo, opt, hi))
        if image_tokens is None:
            n = int(meta.get("bypass_kernels.image_tokens", "4096"))
            image_tokens = (max(1, n // 4), n, min(MAX_IMAGE_TOKENS, n * 4))
        tokens = as_triple(f"image_tokens (for {users('image_tokens')})", image_tokens)
        if tokens[2] > MAX_IMAGE_TOKENS:
            raise ValueError(f"image_tokens: max {tokens[2]} is above the graph's limit {MAX_IMAGE_TOKENS}")
        ranges["image_tokens"] = tokens
    elif image_tokens is not None:
        raise ValueError("image_tokens: this graph has no packed image tokens (only Flux graphs do)")
    if "sequence" in carriers:
        if text_len is None:
            if "bypass_kernels.text_len" not in meta:
                raise ValueError(
                    "text_len: the graph does not record the text length it was exported with (exported by an "
                    "older bypass_kernels); pass text_len=(min, opt, max), e.g. 77 for SD/SDXL"
                )
            text_len = int(meta["bypass_kernels.text_len"])
        t = as_triple(f"text_len (for {users('sequence')})", text_len)
        if t[2] > MAX_SEQUENCE:
            raise ValueError(
                f"text_len (for {users('sequence')}): max {t[2]} is above the graph's limit {MAX_SEQUENCE}"
            )
        ranges["sequence"] = t
    elif text_len is not None and not any(n == "encoder_hidden_states" for n in dims):
        raise ValueError("text_len: this graph has no text input (encoder_hidden_states)")

    profile: Profile = {}
    for name, shape in dims.items():
        if all(isinstance(d, int) for d in shape):
            continue  # static input (e.g. bypass_schedule): no profile entry needed
        picks = []
        for pick in range(3):
            out = []
            for d in shape:
                if isinstance(d, int):
                    out.append(d)
                elif d in ranges:
                    out.append(ranges[d][pick])
                else:
                    raise ValueError(f"default_profile: no rule for dimension {d!r} of input {name!r}")
            picks.append(tuple(out))
        profile[name] = (picks[0], picks[1], picks[2])
    return profile


def describe(profile: Profile, name: str) -> str:
    lo, opt, hi = profile[name]
    return f"{name}: min {list(lo)}, opt {list(opt)}, max {list(hi)}"
