"""Tiny diffusers pipelines built offline (random weights, a byte-level tokenizer): Stable Diffusion,
ControlNet and T2I-Adapter, for the model-coverage and offload tests. Nothing is downloaded."""

from __future__ import annotations

import json

import tiny_transformers
import torch

from bypass_kernels.presets import build_unet

# A UNet whose mid-block receives a T2I-Adapter residual (the T2I-Adapter-XL layout: the adapter has one
# more feature map than the UNet has down blocks, and the last one matches the mid-block's output).
ADAPTER_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)


def clip_byte_vocab(folder):
    """A byte-level CLIP vocabulary with no merges: a real tokenizer with nothing downloaded."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def tiny_text_encoder(folder, hidden: int, projection: int | None = None):
    """(tokenizer, CLIP text encoder) of width ``hidden``; with ``projection``, SDXL's second encoder kind."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = clip_byte_vocab(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return tokenizer, cls(config).eval()


def tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
        **overrides,
    ).eval()


def sd_components(folder, *, unet=None) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler of a tiny Stable Diffusion (latents 16x16 for 32x32 images)."""
    from diffusers import DDIMScheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, text_encoder = tiny_text_encoder(folder, 32)
        vae = tiny_vae()
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet("tiny-sd") if unet is None else unet,
        scheduler=DDIMScheduler(num_train_timesteps=1000),
    )


def sdxl_pipeline(folder, unet):
    """StableDiffusionXLPipeline around ``unet`` (an SDXL-shaped UNet: cross_attention_dim 32 = 16 + 16, both
    encoders' penultimate states; text_embeds 32 = the second encoder's projection), Euler (fractional t)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    (folder / "tok1").mkdir()
    (folder / "tok2").mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, text_encoder = tiny_text_encoder(folder / "tok1", 16)
        tokenizer_2, text_encoder_2 = tiny_text_encoder(folder / "tok2", 16, projection=32)
        vae = tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(num_train_timesteps=1000),  # fractional timesteps
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _no_safety(pipe_cls, **components):
    pipe = pipe_cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return _no_safety(StableDiffusionPipeline, **sd_components(folder))


def controlnet_pipeline(folder):
    """StableDiffusionControlNetPipeline; the ControlNet's zero convolutions get random weights, so its
    residuals (the mid-block's included) are not zero."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    components = sd_components(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():
            for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                module.weight.normal_(0.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, 0.2)
    return _no_safety(StableDiffusionControlNetPipeline, **components, controlnet=controlnet.eval(), image_encoder=None)


def adapter_pipeline(folder):
    """StableDiffusionAdapterPipeline with a full_adapter_xl T2I-Adapter whose last feature map is added to
    the UNet's mid-block output."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = UNet2DConditionModel(**ADAPTER_UNET).eval()
        adapter = T2IAdapter(
            in_channels=3,
            channels=(32, 64, 64, 64),
            num_res_blocks=1,
            downscale_factor=4,
            adapter_type="full_adapter_xl",
        ).eval()
    return _no_safety(StableDiffusionAdapterPipeline, **sd_components(folder, unet=unet), adapter=adapter)


def condition_image(seed: int = 7):
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_pipeline(pipe, *, seed: int = 0, steps: int = 5, **kwargs):
    """Images (numpy) of one seeded text-to-image call; ControlNet/adapter pipelines get a condition image."""
    if hasattr(pipe, "controlnet") or hasattr(pipe, "adapter"):
        kwargs.setdefault("image", condition_image())
    out = pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return out.images


def run_img2img(pipe, strength: float, *, seed: int = 0):
    """Images (numpy) of one seeded image-to-image call built from ``pipe``'s components (SD or SDXL)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    xl = "text_encoder_2" in pipe.components
    cls = StableDiffusionXLImg2ImgPipeline if xl else StableDiffusionImg2ImgPipeline
    img2img = cls(**pipe.components, **({"requires_aesthetics_score": False} if xl else {}))
    img2img.set_progress_bar_config(disable=True)
    out = img2img(
        "a red square",
        image=condition_image(7),
        strength=strength,
        num_inference_steps=10,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


# --------------------------------------------------------------------- transformer (DiT) pipelines
def tiny_t5(max_len: int = 32, d_model: int = 32):
    """(T5 tokenizer from an in-memory Unigram vocabulary: no files, no sentencepiece; T5 encoder)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_len)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, T5EncoderModel(config).eval()


def sd3_pipeline(folder, *, num_layers: int = 4):
    """StableDiffusion3Pipeline: two CLIP encoders with projection and a T5, an SD3 transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        (folder / "clip1").mkdir()
        (folder / "clip2").mkdir()
        tok1, te1 = tiny_text_encoder(folder / "clip1", 16, projection=16)
        tok2, te2 = tiny_text_encoder(folder / "clip2", 16, projection=16)
        tok3, te3 = tiny_t5()
        transformer = tiny_transformers.build(
            "sd3",
            sample_size=16,
            num_layers=num_layers,
            joint_attention_dim=32,  # T5's width (the CLIP states are concatenated and padded to it)
            pooled_projection_dim=32,  # the two CLIP projections side by side
            pos_embed_max_size=16,
        )
        vae = tiny_vae(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(folder, **transformer_config):
    """FluxPipeline with a dynamically shifting flow-matching scheduler (as FLUX.1-dev's); ``transformer_config``
    overrides the tiny transformer's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok1, te1 = tiny_text_encoder(folder, 16)
        tok2, te2 = tiny_t5()
        transformer = tiny_transformers.build("flux", joint_attention_dim=32, **transformer_config)  # T5's width
        vae = tiny_vae(shift_factor=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_sigma_pipeline(folder):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, text_encoder = tiny_t5()
        transformer = tiny_transformers.build("pixart", sample_size=16, caption_channels=32)  # T5's width
        vae = tiny_vae()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


DIT_PIPELINES = {"sd3": sd3_pipeline, "flux": flux_pipeline, "pixart-sigma": pixart_sigma_pipeline}
# what each pipeline call needs at 32x32 pixels besides the prompt
DIT_CALL = {
    "sd3": dict(max_sequence_length=32),
    "flux": dict(max_sequence_length=32, guidance_scale=3.5),
    "pixart-sigma": dict(max_sequence_length=32, use_resolution_binning=False, clean_caption=False),
}
