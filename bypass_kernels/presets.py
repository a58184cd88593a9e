"""UNet configurations built locally with random weights (no hub access), and matching inputs.

Tiny presets make tests, the main command and export run offline in seconds; the ``sd15`` and
``sdxl`` presets have the real architectures' shapes for benchmarks. (Tiny configs of the other
diffusers UNet classes, for tests only, are in tests/tiny_models.py.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bypass_kernels.transformer_presets import TRANSFORMER_PRESETS, build_transformer, transformer_inputs

__all__ = [
    "PRESETS",
    "TRANSFORMER_PRESETS",
    "Preset",
    "build_transformer",
    "build_unet",
    "example_inputs",
    "load_unet",
    "transformer_inputs",
]


@dataclass(frozen=True)
class Preset:
    kind: str  # "cond" (UNet2DConditionModel) or "uncond" (UNet2DModel)
    config: dict


_TINY_SD = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)

PRESETS: dict[str, Preset] = {
    "tiny-sd": Preset("cond", _TINY_SD),
    "tiny-sdxl": Preset(
        "cond",
        dict(
            _TINY_SD,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
    ),
    "tiny-unet2d": Preset(
        "uncond",
        dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=16,
        ),
    ),
    # Stable Diffusion 1.5's UNet shape (860M parameters), random weights.
    "sd15": Preset(
        "cond",
        dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
    ),
    # Stable Diffusion XL's UNet shape (2.6B parameters), random weights.
    "sdxl": Preset(
        "cond",
        dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
}


def build_unet(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A preset UNet with seeded random weights, in eval mode."""
    if name not in PRESETS:
        raise ValueError(f"model preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    from diffusers import UNet2DConditionModel, UNet2DModel

    preset = PRESETS[name]
    cls = UNet2DConditionModel if preset.kind == "cond" else UNet2DModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**preset.config)
    model = model.to(device)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def load_unet(name_or_path: str, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """A preset name, a local diffusers UNet folder, or a local pipeline folder (its ``unet/``)."""
    if name_or_path in PRESETS:
        return build_unet(name_or_path, dtype=dtype, device=device)
    if not os.path.isdir(name_or_path):
        raise ValueError(f"model: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local folder")
    from diffusers import UNet2DConditionModel, UNet2DModel

    folder = os.path.join(name_or_path, "unet") if os.path.isdir(os.path.join(name_or_path, "unet")) else name_or_path
    config = UNet2DConditionModel.load_config(folder)
    cls = UNet2DModel if config.get("_class_name") == "UNet2DModel" else UNet2DConditionModel
    return cls.from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def example_inputs(unet, batch: int = 2, *, timestep=None, seed: int = 0, size: int | None = None) -> dict:
    """Keyword inputs for ``unet(**inputs)`` with seeded random tensors of the model's dtype/device."""
    param = next(unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = size or cfg.sample_size
    size = size if isinstance(size, int) else size[0]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

    timestep = torch.tensor([999.0] * batch) if timestep is None else timestep
    inputs = {"sample": rand(batch, cfg.in_channels, size, size), "timestep": timestep}
    if hasattr(cfg, "cross_attention_dim") and cfg.get("cross_attention_dim"):
        text_len = 8 if cfg.cross_attention_dim <= 64 else 77
        inputs["encoder_hidden_states"] = rand(batch, text_len, cfg.cross_attention_dim)
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": rand(batch, text_dim), "time_ids": rand(batch, 6)}
    return inputs
