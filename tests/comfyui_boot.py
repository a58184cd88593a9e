"""Import a ComfyUI checkout for the tests (CPU, deterministic) and build tiny ComfyUI models offline.

The checkout comes from the environment variable COMFYUI_PATH (ComfyUI is not on the package
index and is not shipped with this project); without it the ComfyUI tests skip. On a CPU-only
machine the CUDA build of torchvision does not load beside a CPU torch, and ComfyUI imports
``torchvision.transforms`` (unused for these models) at import time: a stand-in module is provided
when torchvision is missing, as is ``protocol`` (a module of ComfyUI's server, not needed here).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

PATH = os.environ.get("COMFYUI_PATH", "")
AVAILABLE = bool(PATH) and os.path.isfile(os.path.join(PATH, "nodes.py"))
REASON = "set COMFYUI_PATH to a ComfyUI checkout (its nodes.py and comfy/) to run the ComfyUI tests"


def boot():
    """Import comfy (CPU mode, PyTorch attention, no smart memory) from COMFYUI_PATH; returns it."""
    if "comfy.model_management" in sys.modules:
        import comfy

        return comfy
    sys.path.insert(0, PATH)
    import transformers  # noqa: F401  (transformers>=5 looks torchvision up at import: before the stand-in)

    if importlib.util.find_spec("torchvision") is None:
        vision = types.ModuleType("torchvision")
        vision.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        vision.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"] = vision
        sys.modules["torchvision.transforms"] = vision.transforms
    if "protocol" not in sys.modules:
        protocol = types.ModuleType("protocol")
        protocol.BinaryEventTypes = type(
            "BinaryEventTypes",
            (),
            {"PREVIEW_IMAGE": 1, "UNENCODED_PREVIEW_IMAGE": 2, "TEXT": 3, "PREVIEW_IMAGE_WITH_METADATA": 4},
        )
        sys.modules["protocol"] = protocol
    from comfy.cli_args import args

    args.cpu = True
    args.disable_smart_memory = True
    args.use_pytorch_cross_attention = True  # the CPU default reads free memory per call: graph breaks
    import comfy
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy


def fill(model, seed: int = 0, std: float = 0.05):
    """ComfyUI's layers skip weight initialisation: seeded random weights, by hand.

    Floating-point buffers too: SD3's ``pos_embed`` is a ``torch.empty`` buffer that a checkpoint
    fills, so left alone it holds whatever memory it got (NaN on some machines). Not the sampling
    buffers (``model_sampling``'s sigmas): ComfyUI computes them, and sampling needs the real ones."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "model_sampling" not in name:
                b.copy_(torch.randn(b.shape, generator=gen) * std)
    return model


SD15 = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 32,
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL = {
    **SD15,
    "num_classes": "sequential",
    "adm_in_channels": 64 + 6 * 256,
    "context_dim": 64,
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "use_linear_in_transformer": True,
}
FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 4,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [4, 6, 6],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}
SD3 = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 3,
    "input_size": None,
    "adm_in_channels": 32,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 192}},
    "num_patches": 64 * 64,
    "pos_embed_max_size": 64,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def tiny_model(name: str, seed: int = 0):
    """(a ModelPatcher of a tiny random-weight model, its positive conditioning, an empty latent)."""
    import torch

    comfy = boot()
    config, kind = {"sd15": (SD15, "SD15"), "sdxl": (SDXL, "SDXL"), "flux": (FLUX, "Flux"), "sd3": (SD3, "SD3")}[name]
    model_config = getattr(comfy.supported_models, kind)(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = fill(model_config.get_model({}), seed)
    mm = comfy.model_management
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    gen = torch.Generator().manual_seed(seed + 1)
    if name == "sd15":
        cond, latent = [[torch.randn(1, 8, 32, generator=gen), {}]], torch.zeros(1, 4, 8, 8)
    elif name == "sdxl":
        extra = {"pooled_output": torch.randn(1, 64, generator=gen), "width": 64, "height": 64}
        cond, latent = [[torch.randn(1, 8, 64, generator=gen), extra]], torch.zeros(1, 4, 8, 8)
    elif name == "flux":
        extra = {"pooled_output": torch.randn(1, 32, generator=gen), "guidance": 3.5}
        cond, latent = [[torch.randn(1, 8, 32, generator=gen), extra]], torch.zeros(1, 16, 8, 8)
    else:
        cond, latent = (
            [[torch.randn(1, 8, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]],
            torch.zeros(1, 16, 8, 8),
        )
    return patcher, cond, latent


def sample(model, cond, latent, *, sampler="euler", scheduler="normal", steps=3, cfg=2.0, negative=None, seed=0):
    comfy = boot()
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, cond, negative or cond, latent, seed=seed, disable_pbar=True
    )
