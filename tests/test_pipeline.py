"""A real diffusers pipeline, built locally from tiny components, patched end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import hand_hook

import bypass_kernels
from bypass_kernels import BypassSchedule, default_schedule
from bypass_kernels.presets import build_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _clip_byte_vocab(folder):
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


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = _clip_byte_vocab(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    ).eval()
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet("tiny-sd"),
        scheduler=DDIMScheduler(num_train_timesteps=1000),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def t2i(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=4.0,
        generator=generator,
        output_type="np",
    )
    return out.images


def i2i(pipe, strength, seed=0):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out = img2img(
        "a red square",
        image=image,
        strength=strength,
        num_inference_steps=10,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def with_hand_hook(pipe, schedule, run):
    handles = hand_hook(pipe.unet, schedule.weight)
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def test_text_to_image_patched_pipeline(pipe):
    schedule = BypassSchedule.linear(0.6, t_min=300)
    plain = t2i(pipe)
    expected = with_hand_hook(pipe, schedule, lambda: t2i(pipe))
    assert bypass_kernels.patch(pipe, schedule) is pipe
    try:
        got = t2i(pipe)
    finally:
        bypass_kernels.unpatch(pipe)
    assert got.shape == (1, 32, 32, 3) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
    np.testing.assert_array_equal(t2i(pipe), plain)  # unpatched again: the original output


def test_image_to_image_starts_part_way_down_the_table(pipe):
    schedule = default_schedule()  # zero below t = 500
    low_plain, high_plain = i2i(pipe, 0.4), i2i(pipe, 0.95)
    high_expected = with_hand_hook(pipe, schedule, lambda: i2i(pipe, 0.95))
    with bypass_kernels.patched(pipe, schedule):
        low, high = i2i(pipe, 0.4), i2i(pipe, 0.95)
    np.testing.assert_array_equal(low, low_plain)  # timesteps below 500 only: λ = 0 throughout
    np.testing.assert_allclose(high, high_expected, atol=1e-4)
    assert np.abs(high - high_plain).max() > 1e-3


def test_pipeline_scheduler_length_is_checked(pipe):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        bypass_kernels.patch(pipe, BypassSchedule.constant(0.1, num_train_timesteps=500))
    assert not bypass_kernels.is_patched(pipe)


def test_patched_pipeline_with_compiled_unet_compiles_once(pipe):
    """``pipe.unet = torch.compile(pipe.unet, fullgraph=True)`` on a patched pipeline: text-to-image
    and image-to-image at two strengths (different timesteps, different starting points down the
    table) reuse one graph, and the images equal the hand-hook reference."""
    from torch._dynamo.testing import CompileCounterWithBackend

    schedule = BypassSchedule.linear(0.6, t_min=300)
    expected_t2i = with_hand_hook(pipe, schedule, lambda: t2i(pipe))
    expected_i2i = with_hand_hook(pipe, schedule, lambda: i2i(pipe, 0.95))
    unet = pipe.unet
    bypass_kernels.patch(pipe, schedule)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    pipe.unet = torch.compile(unet, backend=counter, fullgraph=True)
    try:
        got_t2i = t2i(pipe)
        got_i2i = i2i(pipe, 0.95)
        i2i(pipe, 0.5)
        frames = counter.frame_count
    finally:
        pipe.unet = unet
        bypass_kernels.unpatch(pipe)
        torch._dynamo.reset()
    assert frames == 1  # no graph break, no recompile across timesteps, strengths or pipelines
    np.testing.assert_allclose(got_t2i, expected_t2i, atol=1e-3)
    np.testing.assert_allclose(got_i2i, expected_i2i, atol=1e-3)
