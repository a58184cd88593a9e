"""Tiny diffusers transformers (DiTs) of every family the package bypasses, with seeded random weights,
and inputs for one call: for trying spans offline, as ``presets.build_unet("tiny-sd")`` is for UNets.

    from bypass_kernels.presets import build_transformer, transformer_inputs

    model = build_transformer("tiny-flux")
    out = model(**transformer_inputs("tiny-flux", 0.7), return_dict=False)[0]

Nothing is downloaded; each call takes milliseconds on the CPU. The timestep is given in the units the
family's pipelines pass (Flux and QwenImage: t/1000, so 0.7 is t = 700).
"""

from __future__ import annotations

import torch

# name: (diffusers class name, config)
TRANSFORMER_PRESETS = {
    "tiny-sd3": (
        "SD3Transformer2DModel",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=8,
        ),
    ),
    "tiny-flux": (
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        ),
    ),
    "tiny-pixart": (
        "PixArtTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=3,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=16,
            use_additional_conditions=False,
        ),
    ),
    "tiny-sana": (
        "SanaTransformer2DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=3,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=1,
        ),
    ),
    "tiny-wan": (
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=3,
            rope_max_seq_len=32,
        ),
    ),
    "tiny-cogvideox": (
        "CogVideoXTransformer3DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=3,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=5,
        ),
    ),
    "tiny-hunyuanvideo": (
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(2, 2, 4),
        ),
    ),
    "tiny-ltx": (
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=3,
            caption_channels=16,
        ),
    ),
    "tiny-mochi": (
        "MochiTransformer3DModel",
        dict(
            patch_size=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=3,
            pooled_projection_dim=16,
            in_channels=4,
            text_embed_dim=16,
            time_embed_dim=8,
            max_sequence_length=5,
        ),
    ),
    "tiny-qwenimage": (
        "QwenImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=16,
            out_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
        ),
    ),
}


def build_transformer(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """The preset transformer ``name`` (``tiny-flux``, ``tiny-sd3``...: ``TRANSFORMER_PRESETS``) with
    seeded random weights, in eval mode; ``overrides`` change its config."""
    import diffusers

    if name not in TRANSFORMER_PRESETS:
        raise ValueError(f"transformer preset: expected one of {', '.join(TRANSFORMER_PRESETS)}, got {name!r}")
    class_name, config = TRANSFORMER_PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, class_name)(**{**config, **overrides}).eval()


def transformer_inputs(name: str, timestep, *, batch: int = 2, seed: int = 1) -> dict:
    """Keyword arguments for one forward; ``timestep`` in the units the pipeline passes (Flux and
    QwenImage: t/1000)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).clone()
    text = rand(batch, 5, 16)
    if name == "tiny-sd3":
        return dict(
            hidden_states=rand(batch, 4, 8, 8),
            encoder_hidden_states=text,
            pooled_projections=rand(batch, 16),
            timestep=t,
        )
    if name == "tiny-flux":
        return dict(
            hidden_states=rand(batch, 16, 16),
            encoder_hidden_states=text,
            pooled_projections=rand(batch, 16),
            timestep=t,
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.full((batch,), 3.5),
        )
    if name == "tiny-pixart":
        return dict(
            hidden_states=rand(batch, 4, 8, 8),
            encoder_hidden_states=text,
            timestep=t.long() if float(t[0]).is_integer() else t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if name == "tiny-sana":
        return dict(hidden_states=rand(batch, 4, 8, 8), encoder_hidden_states=text, timestep=t)
    if name == "tiny-wan":
        return dict(hidden_states=rand(batch, 4, 2, 8, 8), encoder_hidden_states=text, timestep=t)
    if name == "tiny-cogvideox":
        return dict(hidden_states=rand(batch, 3, 4, 8, 8), encoder_hidden_states=text, timestep=t)
    if name == "tiny-hunyuanvideo":
        return dict(
            hidden_states=rand(batch, 4, 1, 8, 8),
            timestep=t,
            encoder_hidden_states=text,
            encoder_attention_mask=torch.ones(batch, 5),
            pooled_projections=rand(batch, 8),
            guidance=torch.full((batch,), 6000.0),
        )
    if name == "tiny-ltx":  # packed video tokens: 2 frames of 4x4
        return dict(
            hidden_states=rand(batch, 2 * 4 * 4, 4),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=torch.ones(batch, 5),
            num_frames=2,
            height=4,
            width=4,
        )
    if name == "tiny-mochi":
        return dict(
            hidden_states=rand(batch, 4, 2, 8, 8),
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=torch.ones(batch, 5),
        )
    if name == "tiny-qwenimage":  # packed latents: 4x4 patches of 2x2x4 channels
        return dict(
            hidden_states=rand(batch, 16, 16),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=torch.ones(batch, 5),
            timestep=t,
            img_shapes=[[(1, 4, 4)]] * batch,
        )
    raise ValueError(f"transformer preset: expected one of {', '.join(TRANSFORMER_PRESETS)}, got {name!r}")
