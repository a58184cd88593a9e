"""The span bypass on diffusers transformers (DiTs): SD3, Flux, PixArt, Sana, Wan, CogVideoX,
HunyuanVideo, LTX-Video, Mochi, QwenImage, each tiny, against hand-written hooks and against the
model with its span deleted."""

import copy
import pickle

import pytest
import tiny_transformers as tt
import torch
from conftest import HAS_CUDA, gpu
from torch import nn

import bypass_kernels
from bypass_kernels import BypassSchedule, patch, set_schedule, unpatch
from bypass_kernels.targets import default_span

# Test data written from the diffusers source, independently of bypass_kernels.targets:
# block lists in execution order, and where each block returns (hidden, text); None: a tensor.
LISTS = {
    "sd3": ("transformer_blocks",),
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "pixart": ("transformer_blocks",),
    "sana": ("transformer_blocks",),
    "wan": ("blocks",),
    "cogvideox": ("transformer_blocks",),
    "hunyuanvideo": ("transformer_blocks", "single_transformer_blocks"),
    "ltx": ("transformer_blocks",),
    "mochi": ("transformer_blocks",),
    "qwenimage": ("transformer_blocks",),
}
RETURNS = {  # (hidden, text) indices
    "sd3": (1, 0),
    "flux": (1, 0),
    "cogvideox": (0, 1),
    "hunyuanvideo": (0, 1),
    "mochi": (0, 1),
    "qwenimage": (1, 0),
}
# Flux pipelines pass t/1000 (the model multiplies by 1000 inside); QwenImage's pass σ = t/1000 as is
TABLE_UNITS = {"flux": 1000.0, "qwenimage": 1000.0}
# Mochi's scheduler inverts σ (invert_sigmas) and its pipeline passes 1000 − t: the noisiest step reads 0
REVERSED = {"mochi"}


def blocks(model, name):
    return [b for lst in LISTS[name] for b in getattr(model, lst)]


def table_timestep(name, kwargs):
    t = kwargs["timestep"].float() * TABLE_UNITS.get(name, 1.0)
    return (1000.0 - t if name in REVERSED else t).tolist()


def hand_span(model, name, i, j, lams, *, text=True):
    """Independent reference: hooks on blocks i and j that blend with the given per-sample λ in float32."""
    bs = blocks(model, name)
    kept = {}

    def enter(module, args, kwargs):
        kept["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        kept["e"] = enc

    def leave(module, args, kwargs, out):
        lam = torch.tensor(lams, dtype=torch.float32)

        def mix(m, h):
            w = lam.reshape(*lam.shape, *([1] * (m.dim() - lam.dim())))  # per sample [B] or per token [B, S]
            return ((1 - w) * m.float() + w * h.float()).to(m.dtype)

        if name not in RETURNS:
            return mix(out, kept["h"])
        hi, ti = RETURNS[name]
        out = list(out)
        out[hi] = mix(out[hi], kept["h"])
        if text and out[ti] is not None:
            out[ti] = mix(out[ti], kept["e"])
        return tuple(out)

    return [
        bs[i].register_forward_pre_hook(enter, with_kwargs=True),
        bs[j].register_forward_hook(leave, with_kwargs=True),
    ]


class PassThrough(nn.Module):
    """A deleted block: returns its streams unchanged, in its own block kind's output order."""

    def __init__(self, name):
        super().__init__()
        self.order = RETURNS.get(name)

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if self.order is None:
            return hidden_states
        out = [None, None]
        out[self.order[0]], out[self.order[1]] = hidden_states, encoder_hidden_states
        return tuple(out)


def without_span(model, name, i, j, kwargs):
    """The model's output with blocks i..j deleted by hand (λ = 1 must equal it)."""
    clone = copy.deepcopy(model)
    k = 0
    for lst in LISTS[name]:
        modules = getattr(clone, lst)
        for idx in range(len(modules)):
            if i <= k <= j:
                modules[idx] = PassThrough(name)
            k += 1
    return tt.run(clone, kwargs)


def timesteps_for(name):
    if name in REVERSED:
        return [100.0, 700.0]  # table t 900 and 300
    return [0.9, 0.3] if name in TABLE_UNITS else [900.0, 300.0]


@pytest.fixture(scope="module", params=tt.NAMES)
def family(request):
    return request.param, tt.build(request.param)


@pytest.fixture(autouse=True)
def _unpatched(request):
    # diffusers wraps every model's forward in one decorator: compiled code of all ten families
    # would share that code object's cache (8 entries) within this one test process
    torch._dynamo.reset()
    yield
    if "family" in request.fixturenames:
        unpatch(request.getfixturevalue("family")[1])


def test_lambda_zero_is_the_model_bit_for_bit(family):
    name, model = family
    kwargs = tt.inputs(name, timesteps_for(name))
    expected = tt.run(model, kwargs)
    patch(model, BypassSchedule.constant(0.0))
    assert torch.equal(tt.run(model, kwargs), expected)


def test_lambda_one_is_the_model_with_its_span_deleted(family):
    name, model = family
    n = len(blocks(model, name))
    i, j = (n - 3, n - 2) if name in ("flux", "hunyuanvideo") else (0, 1)  # Flux/Hunyuan: dual into single
    kwargs = tt.inputs(name, timesteps_for(name))
    expected = without_span(model, name, i, j, kwargs)
    patch(model, BypassSchedule.constant(1.0), span=(i, j))
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("streams", ["all", "image"])
def test_per_sample_lambda_matches_a_hand_written_span_hook(family, streams):
    name, model = family
    schedule = BypassSchedule.linear(0.8, t_min=200)
    kwargs = tt.inputs(name, timesteps_for(name))
    i, j = default_span(len(blocks(model, name)))
    lams = [schedule.weight(t) for t in table_timestep(name, kwargs)]
    assert lams[0] != lams[1]
    handles = hand_span(model, name, i, j, lams, text=streams == "all")
    expected = tt.run(model, kwargs)
    for h in handles:
        h.remove()
    patch(model, schedule, streams=streams)
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=1e-5, rtol=1e-5)


def test_unpatch_restores_every_module_exactly(family):
    name, model = family

    def snapshot():
        return [
            (n, type(m), tuple(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks))
            for n, m in model.named_modules()
        ]

    before = snapshot()
    patch(model, span=0)
    changed = [row[0] for row, old in zip(snapshot(), before, strict=True) if row != old]
    assert set(changed) <= {"", tt_embedder(name), blocks_name(model, name, 0)}  # the model: its _bypass
    unpatch(model)
    assert snapshot() == before


def tt_embedder(name):
    return bypass_kernels.targets.TRANSFORMERS[tt.CONFIGS[name][0]].embedder


def blocks_name(model, name, index):
    return bypass_kernels.targets.blocks_of(model, bypass_kernels.targets.TRANSFORMERS[tt.CONFIGS[name][0]])[index][0]


def test_compile_first_then_patch_then_set_schedule_then_unpatch(family):
    """The order users take: compile, run, patch (one recompile: the patch takes effect), change the
    schedule (no recompile), patch a copy (this frame untouched), unpatch (the plain model again)."""
    from torch._dynamo.testing import CompileCounter

    name, _ = family
    # The span, one block after it (and one single-stream block): Dynamo traces this model twice, in a
    # time that grows with its blocks; the span's rules are tested on the full models
    fewer = {"num_layers": 2} | ({"num_single_layers": 1} if name in ("flux", "hunyuanvideo") else {})
    model = tt.build(name, **fewer)
    kwargs = tt.inputs(name, timesteps_for(name))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    plain = tt.run(compiled, kwargs)
    patch(compiled, BypassSchedule.constant(1.0), span=0)
    expected = without_span(model, name, 0, 0, kwargs)
    torch.testing.assert_close(tt.run(compiled, kwargs), expected, atol=2e-6, rtol=2e-6)
    assert counter.frame_count == 2  # one graph for the plain model, one for the patched
    set_schedule(model, BypassSchedule.cosine(0.4, t_min=100))
    again = tt.run(compiled, kwargs)
    patch(copy.deepcopy(model), BypassSchedule.constant(0.0))  # a patch elsewhere does not touch this frame
    assert counter.frame_count == 2  # the new schedule is data: no recompile
    torch.testing.assert_close(again, tt.run(model, kwargs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(again, expected, atol=1e-4)  # and it took effect
    unpatch(compiled)
    assert torch.equal(tt.run(compiled, kwargs), plain)


def test_one_blend_kernel_per_stream(family):
    name, model = family
    kwargs = tt.inputs(name, timesteps_for(name))
    patch(model, BypassSchedule.constant(0.5), backend="cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        tt.run(model, kwargs)
    calls = sum(e.count for e in prof.key_averages() if e.key == "bypass_kernels::blend_")
    assert calls == (2 if name in RETURNS else 1)


def test_deepcopy_and_pickle_of_a_patched_transformer(family):
    name, model = family
    kwargs = tt.inputs(name, timesteps_for(name))
    patch(model, BypassSchedule.linear(0.6), span=(0, 1))
    expected = tt.run(model, kwargs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(tt.run(clone, kwargs), expected)
        assert bypass_kernels.is_patched(clone)
        set_schedule(clone, BypassSchedule.constant(0.0))
        torch.testing.assert_close(tt.run(model, kwargs), expected)  # the original keeps its own table


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_diffusers_block_hooks_find_the_metadata_of_patched_blocks(name):
    """diffusers' first-block cache and layer skip (the skip-layer guiders) look each block up by its exact
    class: a patched block's attached class has its class's entry. The cache at threshold 0 recomputes
    every block, so it gives the patched output; skipping the span's last block runs."""
    from diffusers.hooks import FirstBlockCacheConfig, LayerSkipConfig, apply_layer_skip

    model = tt.build(name)
    kwargs = tt.inputs(name, timesteps_for(name))
    patch(model, BypassSchedule.constant(0.7))
    expected = tt.run(model, kwargs)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with model.cache_context("test"):
        torch.testing.assert_close(tt.run(model, kwargs), expected)
    model.disable_cache()
    last = {module: n for n, module in model.named_modules()}[model._bypass.span.last]
    stack, index = last.rsplit(".", 1)
    apply_layer_skip(model, LayerSkipConfig(indices=[int(index)], fqn=stack, skip_attention=True, skip_ff=True))
    assert torch.isfinite(tt.run(model, kwargs)).all()


# --------------------------------------------------------------------- spans: names, presets, errors
def test_span_by_block_names_and_one_index():
    model = tt.build("flux")
    kwargs = tt.inputs("flux", timesteps_for("flux"))
    patch(model, BypassSchedule.constant(1.0), span=("transformer_blocks.1", "single_transformer_blocks.0"))
    by_name = tt.run(model, kwargs)
    patch(model, BypassSchedule.constant(1.0), span=(1, 2))
    torch.testing.assert_close(tt.run(model, kwargs), by_name)
    patch(model, BypassSchedule.constant(1.0), span="single_transformer_blocks.1")
    torch.testing.assert_close(tt.run(model, kwargs), without_span(model, "flux", 3, 3, kwargs), atol=2e-6, rtol=2e-6)
    unpatch(model)


def test_the_sd35_skip_layer_preset_is_blocks_7_to_9():
    model = tt.build("sd3", num_layers=10)
    kwargs = tt.inputs("sd3", [900.0, 300.0])
    patch(model, BypassSchedule.constant(1.0), span="sd3.5-slg")
    torch.testing.assert_close(tt.run(model, kwargs), without_span(model, "sd3", 7, 9, kwargs), atol=2e-6, rtol=2e-6)
    unpatch(model)
    with pytest.raises(ValueError, match=r"sd3\.5-slg.*7\.\.9.*4 blocks"):
        patch(tt.build("sd3"), span="sd3.5-slg")


@pytest.mark.parametrize(
    ("span", "exc", "match"),
    [
        ((0, 9), ValueError, "out of range 0..3"),
        ((2, 1), ValueError, "comes after"),
        ("transformer_blocks.9", ValueError, "no block 'transformer_blocks.9'"),
        ("stg", ValueError, "preset 'stg' is for"),  # another family's preset, named as such
        (1.5, TypeError, "indices or names"),
        ((0, 1, 2), ValueError, r"\(first, last\)"),
    ],
)
def test_bad_spans_are_refused_before_anything_changes(span, exc, match):
    model = tt.build("sd3")
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(exc, match=match):
        patch(model, span=span)
    assert not bypass_kernels.is_patched(model)
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_unet_takes_no_span():
    from bypass_kernels.presets import build_unet

    with pytest.raises(ValueError, match="span is for transformer"):
        patch(build_unet("tiny-unet2d"), span=(0, 1))


def test_other_arguments_are_checked():
    model = tt.build("pixart")
    with pytest.raises(ValueError, match="streams must be"):
        patch(model, streams="text")
    with pytest.raises(ValueError, match="timestep_scale"):
        patch(model, timestep_scale=0)
    with pytest.raises(ValueError, match="no such submodule"):
        patch(model, timestep_module="nope")
    assert not bypass_kernels.is_patched(model)


def test_timestep_scale_reads_the_table_in_other_units():
    """A model given σ in [0, 1] with timestep_scale=1000 reads the same λ as one given σ·1000."""
    model = tt.build("pixart")
    schedule = BypassSchedule.linear(0.9)
    kwargs = tt.inputs("pixart", [900.0, 300.0])
    patch(model, schedule)
    expected = tt.run(model, kwargs)
    scaled = dict(kwargs, timestep=kwargs["timestep"] / 1000)
    patch(model, schedule, timestep_scale=1000.0)
    plain_scaled = tt.run(unpatch(copy.deepcopy(model)), scaled)
    got = tt.run(model, scaled)
    assert not torch.allclose(got, plain_scaled, atol=1e-4)  # the bypass acts at the scaled timestep
    hand = hand_span(model, "pixart", *default_span(3), [schedule.weight(900.0), schedule.weight(300.0)])
    unpatch(model)
    reference = tt.run(model, scaled)
    for h in hand:
        h.remove()
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, got)  # the embedder itself sees other values: only λ agrees


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@gpu
def test_flux_on_cuda_bf16_eager_compiled_and_captured():
    """A tiny Flux in bfloat16 on the GPU: the patched model (the GPU kernels, one per stream) equals a
    hand-written span hook; compiled after the patch and captured in a CUDA graph, each replay equals
    eager for two timesteps written into the same buffer."""
    model = tt.build("flux").cuda().to(torch.bfloat16)
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in tt.inputs("flux", [0.9, 0.3]).items()}
    kwargs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    schedule = BypassSchedule.linear(0.8, t_min=200)
    i, j = default_span(len(blocks(model, "flux")))
    seen = [float(t) for t in (kwargs["timestep"] * 1000).to(torch.bfloat16)]  # what the embedder receives
    handles = hand_span(model, "flux", i, j, [schedule.weight(t) for t in seen])
    expected = tt.run(model, kwargs)
    for h in handles:
        h.remove()
    patch(model, schedule)
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=2e-2, rtol=2e-2)
    compiled = torch.compile(model, fullgraph=True)
    static = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    for _ in range(2):
        tt.run(compiled, static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(**static, return_dict=False)[0]
    for t in (0.95, 0.2):
        static["timestep"].fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        eager = tt.run(model, dict(kwargs, timestep=torch.full((2,), t, device="cuda", dtype=torch.bfloat16)))
        torch.testing.assert_close(out, eager, atol=3e-2, rtol=3e-2)


def _tokens(model, name, kwargs) -> int:
    """How many tokens the span's image stream has (read from its first block's input)."""
    seen = []
    handle = blocks(model, name)[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("hidden_states", args[0] if args else None)).shape[1]),
        with_kwargs=True,
    )
    tt.run(model, kwargs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["ltx", "wan"])
def test_a_timestep_per_token_gives_each_token_its_own_lambda(name):
    """LTX's image-to-video and condition pipelines and Wan 2.2 TI2V pass a [batch, tokens] timestep
    (conditioning tokens at 0), which the model flattens: each token takes its own timestep's λ,
    eager and compiled."""
    model = tt.build(name)
    kwargs = tt.inputs(name, [900.0, 300.0])
    tokens = _tokens(model, name, kwargs)
    timestep = torch.tensor([900.0, 300.0])[:, None].repeat(1, tokens)
    timestep[:, : tokens // 4] = 0.0  # the conditioning frame's tokens: clean
    kwargs["timestep"] = timestep
    schedule = BypassSchedule.linear(0.8, t_min=200)
    lams = [[schedule.weight(float(t)) for t in row] for row in timestep]
    handles = hand_span(model, name, *default_span(len(blocks(model, name))), lams)
    expected = tt.run(model, kwargs)
    for h in handles:
        h.remove()
    patch(model, schedule)
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(tt.run(compiled, kwargs), expected, atol=1e-5, rtol=1e-5)
    unpatch(model)


def test_qwenimage_edit_with_zero_cond_t_reads_lambda_from_the_images_timestep():
    """Qwen-Image-Edit-2511 (zero_cond_t) embeds [t, 0·t], for the image and its reference: each
    sample's λ is its own t's, over all its tokens."""
    model = tt.build("qwenimage", zero_cond_t=True)
    kwargs = tt.inputs("qwenimage", timesteps_for("qwenimage"))
    kwargs["img_shapes"] = [[(1, 2, 4), (1, 2, 4)]] * 2  # the image, then its reference: 8 + 8 tokens
    schedule = BypassSchedule.linear(0.8, t_min=200)
    lams = [schedule.weight(t) for t in table_timestep("qwenimage", kwargs)]
    handles = hand_span(model, "qwenimage", *default_span(len(blocks(model, "qwenimage"))), lams)
    expected = tt.run(model, kwargs)
    for h in handles:
        h.remove()
    patch(model, schedule)
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=1e-5, rtol=1e-5)
    unpatch(model)


def test_bfloat16_qwenimage_reads_the_index_of_its_float32_timestep():
    """σ·1000 in bfloat16 can land an index or two off; the carrier scales in float32."""
    model = tt.build("qwenimage").to(torch.bfloat16)
    kwargs = tt.inputs("qwenimage", [0.301, 0.301])
    kwargs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    table = torch.zeros(1000)
    table[round(float(torch.tensor(0.301, dtype=torch.bfloat16).float()) * 1000)] = 1.0  # λ 1 at one index only
    expected = without_span(model, "qwenimage", *default_span(3), kwargs)
    patch(model, BypassSchedule.from_table(table))
    torch.testing.assert_close(tt.run(model, kwargs), expected, atol=0, rtol=0)
    unpatch(model)


def test_patching_again_without_a_span_keeps_the_present_span():
    """A second patch with other streams (or only a new schedule) re-attaches at the span already
    patched, not at the family's default (it moved to the default before)."""
    model = tt.build("sd3")
    patch(model, BypassSchedule.constant(1.0), span=(0, 1))
    patch(model, BypassSchedule.constant(1.0), streams="image")
    controller = model._bypass
    assert controller.span.first is model.transformer_blocks[0] and controller.span.last is model.transformer_blocks[1]
    assert {s.name: s.blend for s in controller.span.streams} == {
        "hidden_states": True,
        "encoder_hidden_states": False,
    }
    patch(model, BypassSchedule.constant(0.5))
    assert model._bypass.span.first is model.transformer_blocks[0]
    unpatch(model)
