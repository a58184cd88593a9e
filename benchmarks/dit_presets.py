"""Transformer (DiT) models for the step benchmark: real widths, fewer blocks, random weights.

``flux-reduced``: FLUX.1-dev's width (24 heads × 128, text width 4096, guidance embedding) with 2
dual-stream and 4 single-stream blocks instead of 19 and 38, at 1024² (4096 packed image tokens,
512 text tokens). ``sd35-reduced``: SD3.5 Medium's width (24 heads × 64, RMS qk-norm, dual
attention) with 4 blocks instead of 24, at 1024² (latent 128², 333 text tokens), a CFG batch of 2.
``tiny-flux``: a CPU smoke preset. The bypass spans blocks 1..2 (Flux: the last dual and first
single block) so that every blend runs, on each stream.
"""

from __future__ import annotations

import torch

from bypass_kernels.transformer_presets import TRANSFORMER_PRESETS

PRESETS = {
    "flux-reduced": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        dict(batch=1, image_tokens=4096, text_tokens=512),
    ),
    "sd35-reduced": (
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=(0, 1, 2, 3),
        ),
        dict(batch=2, latent=128, text_tokens=333),
    ),
    "tiny-flux": (*TRANSFORMER_PRESETS["tiny-flux"], dict(batch=1, image_tokens=64, text_tokens=16)),  # CPU smoke runs
}
SPAN = (1, 2)


def build(name: str, device, dtype) -> torch.nn.Module:
    import diffusers

    class_name, config, _ = PRESETS[name]
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, class_name)(**config)
    return model.to(device=device, dtype=dtype).eval()


def inputs(name: str, model, device, dtype, batch: int | None = None) -> dict:
    """One step's keyword arguments; ``timestep`` is a [batch] float32 buffer the loop refills. ``batch``:
    the preset's unless given."""
    class_name, config, shape = PRESETS[name]
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    b = shape["batch"] if batch is None else batch
    if class_name == "FluxTransformer2DModel":
        n, L = shape["image_tokens"], shape["text_tokens"]
        return dict(
            hidden_states=rand(b, n, config["in_channels"]),
            encoder_hidden_states=rand(b, L, config["joint_attention_dim"]),
            pooled_projections=rand(b, config["pooled_projection_dim"]),
            timestep=torch.full((b,), 0.999, device=device, dtype=dtype),
            img_ids=torch.zeros(n, 3, device=device, dtype=dtype),
            txt_ids=torch.zeros(L, 3, device=device, dtype=dtype),
            guidance=torch.full((b,), 3.5, device=device, dtype=dtype),
        )
    s, L = shape["latent"], shape["text_tokens"]
    return dict(
        hidden_states=rand(b, config["in_channels"], s, s),
        encoder_hidden_states=rand(b, L, config["joint_attention_dim"]),
        pooled_projections=rand(b, config["pooled_projection_dim"]),
        timestep=torch.full((b,), 999.0, device=device),
    )


def timestep_units(name: str) -> float:
    """Pipeline units per training timestep (Flux pipelines pass t/1000)."""
    return 1e-3 if PRESETS[name][0] == "FluxTransformer2DModel" else 1.0
