"""Tiny configurations of every diffusers UNet class with a mid-block, for tests.

Random weights, seconds to build and run on a CPU. They are not presets of the package
(bypass_kernels.presets.PRESETS): their inputs differ (video samples, image embeddings, fps), so
``example_inputs`` does not serve them; use ``tiny_model_inputs``.
"""

from __future__ import annotations

import torch

from bypass_kernels.presets import PRESETS

_TINY_SIMPLE_CROSS_ATTN = dict(  # DeepFloyd IF / unCLIP: UNetMidBlock2DSimpleCrossAttn, a projected text encoder
    sample_size=16,
    in_channels=3,
    out_channels=6,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
    resnet_time_scale_shift="scale_shift",
    encoder_hid_dim=24,
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
)

_TINY_KANDINSKY = {  # Kandinsky 2.2's decoder: the image embedding is both the context and the added embedding
    **_TINY_SIMPLE_CROSS_ATTN,
    "in_channels": 4,
    "out_channels": 8,
    "encoder_hid_dim_type": "image_proj",
    "addition_embed_type": "image",
}

_TINY_UNET3D = dict(  # ModelScope text-to-video; sample (B, C, F, H, W)
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

_TINY_MOTION_ADAPTER = dict(  # AnimateDiff, with a motion module in the mid-block
    block_out_channels=(32, 64),
    motion_layers_per_block=1,
    motion_transformer_layers_per_block=1,
    motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=2,
    motion_norm_num_groups=32,
    motion_max_seq_length=8,
    use_motion_mid_block=True,
)

_TINY_SVD = dict(  # Stable Video Diffusion; sample (B, F, C, H, W), image latents concatenated on C
    sample_size=16,
    in_channels=8,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=3 * 8,
    cross_attention_dim=32,
    num_attention_heads=(2, 4),
    num_frames=4,
)

_TINY_I2VGEN_XL = {**_TINY_UNET3D, "attention_head_dim": 4}  # I2VGen-XL; sample (B, C, F, H, W)

# name -> (diffusers class, config). "motion" is built from the "sd" UNet and a MotionAdapter.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "unet2d": ("UNet2DModel", PRESETS["tiny-unet2d"].config),
    "sd": ("UNet2DConditionModel", PRESETS["tiny-sd"].config),
    "sdxl": ("UNet2DConditionModel", PRESETS["tiny-sdxl"].config),
    "simple-cross-attn": ("UNet2DConditionModel", _TINY_SIMPLE_CROSS_ATTN),
    "kandinsky": ("UNet2DConditionModel", _TINY_KANDINSKY),
    "unet3d": ("UNet3DConditionModel", _TINY_UNET3D),
    "motion": ("UNetMotionModel", _TINY_MOTION_ADAPTER),
    "svd": ("UNetSpatioTemporalConditionModel", _TINY_SVD),
    "i2vgen-xl": ("I2VGenXLUNet", _TINY_I2VGEN_XL),
}

# Where each video class keeps its frames in ``sample``; it folds them batch-major, (B, F) -> B·F, before
# the mid-block (diffusers 0.42: unet_3d_condition.py, unet_motion_model.py, unet_i2vgen_xl.py permute
# (B, C, F, H, W) -> (B, F, C, H, W) and reshape; unet_spatio_temporal_condition.py flattens (B, F)).
FRAME_DIM = {"UNet3DConditionModel": 2, "UNetMotionModel": 2, "I2VGenXLUNet": 2, "UNetSpatioTemporalConditionModel": 1}


def _seeded_unet(config: dict, seed: int):
    """A UNet2DConditionModel of ``config`` with seeded random weights (the same on every call), in eval mode."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval()


_ONE_LEVEL_SD = dict(
    sample_size=8,
    block_out_channels=(16,),
    layers_per_block=1,
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    cross_attention_dim=8,
    attention_head_dim=8,
    norm_num_groups=8,
)


def one_level_sd(*, seed: int = 0):
    """The smallest SD-style UNet2DConditionModel: one level, a cross-attention mid-block, no
    up/down-sampling. Quick to compile and export where what is tested is not the model's size."""
    return _seeded_unet(_ONE_LEVEL_SD, seed)


# The UNets of the shared ONNX graphs (conftest's sd_graph, sdxl_graph) and of the pipelines that run them:
# tiny-sd's and tiny-sdxl's widths and text sizes, with attention in the mid-block only. What these graphs
# check is the bypass in the mid-block, the inputs and the shape rules; each exports in a half to a third
# of the time of the preset it stands for. The SD one halves its latents once (shapes must be multiples
# of 2); the SDXL one has one level, with SDXL's added conditioning (text_embeds, time_ids).
GRAPH_UNETS = {
    "sd": dict(
        PRESETS["tiny-sd"].config,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "sdxl": dict(
        PRESETS["tiny-sdxl"].config,
        block_out_channels=(32,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        transformer_layers_per_block=1,
    ),
}


def graph_unet(name: str, *, seed: int = 0):
    """The UNet ``GRAPH_UNETS[name]`` with seeded random weights (the same weights on every call)."""
    return _seeded_unet(GRAPH_UNETS[name], seed)


def build_tiny_model(name: str, *, seed: int = 0):
    """A tiny model of ``TINY_MODELS`` with seeded random weights, float32, on the CPU, in eval mode."""
    if name not in TINY_MODELS:
        raise ValueError(f"tiny model: expected one of {', '.join(TINY_MODELS)}, got {name!r}")
    import diffusers

    cls_name, config = TINY_MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cls_name == "UNetMotionModel":
            unet = diffusers.UNet2DConditionModel(**PRESETS["tiny-sd"].config)
            adapter = diffusers.MotionAdapter(**config)
            model = diffusers.UNetMotionModel.from_unet2d(unet, adapter)
        else:
            model = getattr(diffusers, cls_name)(**config)
    return model.eval()


def tiny_model_inputs(model, batch: int = 2, *, frames: int = 3, timestep=None, seed: int = 0) -> dict:
    """Keyword inputs for ``model(**inputs)`` of a ``TINY_MODELS`` model (any size of those configs):
    seeded random tensors of the model's dtype/device; video models get ``frames`` frames."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    cls_name = type(model).__name__
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(param.device, param.dtype)

    timestep = torch.tensor([999.0] * batch) if timestep is None else timestep
    if cls_name == "UNetSpatioTemporalConditionModel":
        return {
            "sample": rand(batch, frames, cfg.in_channels, size, size),
            "timestep": timestep,
            "encoder_hidden_states": rand(batch, 1, cfg.cross_attention_dim),
            "added_time_ids": rand(batch, 3),
        }
    if cls_name == "I2VGenXLUNet":
        return {
            "sample": rand(batch, cfg.in_channels, frames, size, size),
            "timestep": timestep,
            "fps": torch.full((batch,), 8.0).to(param.device),
            "image_latents": rand(batch, 4, frames, size, size),
            "image_embeddings": rand(batch, cfg.cross_attention_dim),
            "encoder_hidden_states": rand(batch, 8, cfg.cross_attention_dim),
        }
    if cls_name in ("UNet3DConditionModel", "UNetMotionModel"):
        context = rand(batch, 8, cfg.cross_attention_dim)
        if cls_name == "UNetMotionModel":  # AnimateDiff's pipelines repeat the prompt over the frames themselves
            context = context.repeat_interleave(frames, dim=0)
        return {
            "sample": rand(batch, cfg.in_channels, frames, size, size),
            "timestep": timestep,
            "encoder_hidden_states": context,
        }
    if cls_name == "UNet2DModel":
        return {"sample": rand(batch, cfg.in_channels, size, size), "timestep": timestep}
    inputs = {"sample": rand(batch, cfg.in_channels, size, size), "timestep": timestep}
    if cfg.get("encoder_hid_dim_type") == "image_proj":  # Kandinsky 2.2: no text, the image embedding is the context
        inputs["encoder_hidden_states"] = None
        inputs["added_cond_kwargs"] = {"image_embeds": rand(batch, cfg.encoder_hid_dim)}
        return inputs
    context_dim = cfg.encoder_hid_dim or cfg.cross_attention_dim
    inputs["encoder_hidden_states"] = rand(batch, 8, context_dim)
    if cfg.get("addition_embed_type") == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": rand(batch, text_dim), "time_ids": rand(batch, 6)}
    return inputs
