"""The ComfyUI node against the real ComfyUI model code (a checkout named by COMFYUI_PATH): samplers,
clone isolation, re-application, FreeU, a ControlNet residual, torch.compile, lowvram, Flux and SD3
spans, install and a workflow."""

import asyncio
import json
import os

import comfyui_boot as cb
import pytest
import torch

pytestmark = pytest.mark.skipif(not cb.AVAILABLE, reason=cb.REASON)

WORKFLOW = os.path.join(os.path.dirname(__file__), "..", "examples", "comfyui_workflow.json")


@pytest.fixture(scope="module")
def comfy():
    return cb.boot()


@pytest.fixture(scope="module")
def sd15(comfy):
    return cb.tiny_model("sd15")


def test_the_tiny_models_sample_with_comfyuis_own_sigmas(comfy, sd15):
    """The tiny models' weights are random, their sampling buffers are not: the steps, and so the
    fraction-of-sampling and timestep lookups, run at the noise levels of the real models."""
    model, _, _ = sd15
    sampling = model.get_model_object("model_sampling")
    assert 14.0 < float(sampling.sigma_max) < 15.0 and 0.02 < float(sampling.sigma_min) < 0.03  # SD1.x


def node(model, strength, *, shape="linear", window="timesteps", start=0.0, end=999.0, **optional):
    from bypass_kernels.comfyui.nodes import MidBlockBypass

    return MidBlockBypass().apply(model, strength, shape, window, start, end, **optional)[0]


def identity_middle(model):
    """The model with an empty middle block (ComfyUI calls its layers in turn: none, h passes through)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    m = model.clone()
    m.add_object_patch("diffusion_model.middle_block", TimestepEmbedSequential())
    return m


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [("euler", "normal"), ("dpmpp_2m", "karras"), ("ddim", "ddim_uniform"), ("uni_pc", "simple"), ("heun", "normal")],
)
def test_lambda_zero_is_bit_equal_and_lambda_one_is_an_identity_middle_block(sd15, sampler, scheduler):
    model, cond, latent = sd15
    plain = cb.sample(model, cond, latent, sampler=sampler, scheduler=scheduler)
    assert torch.equal(
        cb.sample(node(model, 0.0, shape="constant"), cond, latent, sampler=sampler, scheduler=scheduler), plain
    )
    skipped = cb.sample(identity_middle(model), cond, latent, sampler=sampler, scheduler=scheduler)
    bypassed = cb.sample(node(model, 1.0, shape="constant"), cond, latent, sampler=sampler, scheduler=scheduler)
    torch.testing.assert_close(bypassed, skipped, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(bypassed, plain, atol=1e-4)


def test_a_batch_with_cfg_gives_each_row_its_lambda(sd15):
    model, cond, _ = sd15
    latent = torch.zeros(2, 4, 8, 8)
    plain = cb.sample(model, cond, latent, cfg=5.0)
    assert torch.equal(cb.sample(node(model, 0.0, shape="constant"), cond, latent, cfg=5.0), plain)
    torch.testing.assert_close(
        cb.sample(node(model, 1.0, shape="constant"), cond, latent, cfg=5.0),
        cb.sample(identity_middle(model), cond, latent, cfg=5.0),
        atol=1e-6,
        rtol=1e-6,
    )


def test_the_input_model_is_never_changed_and_reapplying_replaces(sd15):
    model, cond, latent = sd15
    plain = cb.sample(model, cond, latent)
    wrappers_before = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()}
    strong = node(model, 0.9)
    assert not torch.allclose(cb.sample(strong, cond, latent), plain, atol=1e-4)
    assert torch.equal(cb.sample(model, cond, latent), plain)  # the original, after the clone sampled
    assert {k: {kk: list(vv) for kk, vv in v.items()} for k, v in model.wrappers.items()} == wrappers_before
    assert "bypass_kernels" not in model.model_options and not model.injections
    again = node(strong, 0.0)  # applied to a bypassed model: replaces, never stacks
    assert torch.equal(cb.sample(again, cond, latent), plain)
    assert len(again.get_wrappers("apply_model", "bypass_kernels")) == 1


def test_fraction_of_sampling_acts_on_the_first_steps_only(sd15):
    """λ by fraction: a window over the first half of 4 steps changes the result; a window that starts
    after the last step (start 0.9 of 4 steps: none) leaves it bit-equal."""
    model, cond, latent = sd15
    plain = cb.sample(model, cond, latent, steps=4)
    early = cb.sample(node(model, 0.9, window="fraction of sampling", start=0.0, end=0.5), cond, latent, steps=4)
    none = cb.sample(node(model, 0.9, window="fraction of sampling", start=0.9, end=1.0), cond, latent, steps=4)
    assert not torch.allclose(early, plain, atol=1e-4) and torch.equal(none, plain)
    with pytest.raises(ValueError, match="fractions of sampling"):
        node(model, 0.5, window="fraction of sampling", start=0.0, end=500.0)


def test_a_schedule_spec_overrides_the_inputs(sd15):
    model, cond, latent = sd15
    by_spec = cb.sample(node(model, 0.0, schedule="constant:1.0"), cond, latent)
    torch.testing.assert_close(by_spec, cb.sample(identity_middle(model), cond, latent), atol=1e-6, rtol=1e-6)


def test_composes_with_freeu_in_either_order(comfy, sd15):
    from comfy_extras.nodes_freelunch import FreeU_V2

    model, cond, latent = sd15
    freeu = FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    both = cb.sample(node(freeu, 0.8), cond, latent)
    other_order = cb.sample(FreeU_V2().patch(node(model, 0.8), 1.3, 1.4, 0.9, 0.2)[0], cond, latent)
    assert torch.equal(both, other_order)
    assert not torch.allclose(both, cb.sample(freeu, cond, latent), atol=1e-5)
    assert not torch.allclose(both, cb.sample(node(model, 0.8), cond, latent), atol=1e-5)


def test_a_controlnet_middle_residual_is_added_after_the_blend(comfy, sd15):
    """λ = 1 with a middle residual r: the first output block receives h_in + r (the blend, then
    ComfyUI's apply_control), where h_in is the middle block's input."""
    import comfy.patcher_extension as extension

    model, cond, latent = sd15
    seen = {}
    residual = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(9))

    def control(executor, x, t, c_concat, c_crossattn, ctrl, transformer_options, **kwargs):
        ctrl = {"middle": [residual[: x.shape[0]]], "input": [], "output": []}
        return executor(x, t, c_concat, c_crossattn, ctrl, transformer_options, **kwargs)

    def output_patch(h, hsp, transformer_options):
        if transformer_options["block"] == ("output", 0):
            seen.setdefault("h_out", h.clone())
        return h, hsp

    m = node(model, 1.0, shape="constant")
    m.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, "test_control", control)
    m.set_model_output_block_patch(output_patch)

    def keep_input(module, args):
        seen.setdefault("h_in", args[0].clone())

    handle = model.model.diffusion_model.middle_block[0].register_forward_pre_hook(keep_input)
    try:
        cb.sample(m, cond, latent, steps=1)
    finally:
        handle.remove()
    r = residual[: seen["h_in"].shape[0]]
    torch.testing.assert_close(seen["h_out"], seen["h_in"] + r, atol=1e-6, rtol=1e-6)


def test_torch_compile_model_traces_without_graph_breaks(comfy, sd15):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    model, cond, latent = sd15
    eager = cb.sample(node(model, 0.8), cond, latent)
    compiled = node(model, 0.8).clone()
    set_torch_compile_wrapper(model=compiled, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    got = cb.sample(compiled, cond, latent)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)


def test_lowvram_weights_moving_per_layer_give_the_same_result(comfy, sd15, monkeypatch):
    mm = comfy.model_management
    model, cond, latent = sd15
    full = cb.sample(node(model, 0.8), cond, latent)
    original = mm.LoadedModel.model_load
    monkeypatch.setattr(
        mm.LoadedModel,
        "model_load",
        lambda self, lowvram_model_memory=0, force_patch_weights=False: original(self, 64 * 1024, force_patch_weights),
    )
    mm.unload_all_models()
    patched = node(model, 0.8)
    low = cb.sample(patched, cond, latent)
    assert patched.model.model_lowvram  # the weights were cast per layer on this run
    mm.unload_all_models()
    torch.testing.assert_close(low, full, atol=1e-6, rtol=1e-6)


def test_sdxl(comfy):
    model, cond, latent = cb.tiny_model("sdxl")
    plain = cb.sample(model, cond, latent, sampler="dpmpp_2m", scheduler="karras")
    assert torch.equal(cb.sample(node(model, 0.0), cond, latent, sampler="dpmpp_2m", scheduler="karras"), plain)
    torch.testing.assert_close(
        cb.sample(node(model, 1.0, shape="constant"), cond, latent, sampler="dpmpp_2m", scheduler="karras"),
        cb.sample(identity_middle(model), cond, latent, sampler="dpmpp_2m", scheduler="karras"),
        atol=1e-6,
        rtol=1e-6,
    )


def skip_blocks(model, keys):
    m = model.clone()
    for kind, i in keys:
        m.set_model_patch_replace(lambda args, extra: args, "dit", kind, i)
    return m


@pytest.mark.parametrize(
    ("name", "span", "keys"),
    [
        ("flux", "0-1", [("double_block", 0), ("double_block", 1)]),
        ("flux", "1-2", [("double_block", 1), ("single_block", 0)]),  # dual into single
        ("flux", "3", [("single_block", 1)]),
        ("sd3", "1-2", [("double_block", 1), ("double_block", 2)]),  # the last block has no text output
    ],
)
def test_transformer_spans(comfy, name, span, keys):
    model, cond, latent = cb.tiny_model(name)
    plain = cb.sample(model, cond, latent, scheduler="simple")
    assert torch.isfinite(plain).all()
    assert torch.equal(cb.sample(node(model, 0.0, span=span), cond, latent, scheduler="simple"), plain)
    bypassed = cb.sample(node(model, 1.0, shape="constant", span=span), cond, latent, scheduler="simple")
    torch.testing.assert_close(
        bypassed, cb.sample(skip_blocks(model, keys), cond, latent, scheduler="simple"), atol=1e-5, rtol=1e-5
    )
    image_only = cb.sample(
        node(model, 1.0, shape="constant", span=span, streams="image"), cond, latent, scheduler="simple"
    )
    assert not torch.allclose(image_only, plain, atol=1e-5)


def test_a_unet_takes_no_span_and_bad_spans_name_the_range(comfy, sd15):
    with pytest.raises(ValueError, match="middle block"):
        node(sd15[0], 0.5, span="1-2")
    flux = cb.tiny_model("flux")[0]
    with pytest.raises(ValueError, match=r"0\.\.3"):
        node(flux, 0.5, span="2-9")


def test_install_writes_a_custom_node_that_comfyui_loads(comfy, tmp_path):
    import nodes

    from bypass_kernels.comfyui.install import install

    root = tmp_path / "ComfyUI"
    root.mkdir()
    os.symlink(os.path.join(cb.PATH, "nodes.py"), root / "nodes.py")
    os.symlink(os.path.join(cb.PATH, "comfy"), root / "comfy")
    folder = install(str(root))
    assert install(str(root)) == folder  # again: nothing to do
    assert asyncio.run(nodes.load_custom_node(folder))
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["MidBlockBypass"] == "Mid-Block / Span Bypass"
    with pytest.raises(ValueError, match="not a ComfyUI checkout"):
        install(str(tmp_path))


def test_the_example_workflow_validates_and_runs(comfy, sd15):
    """examples/comfyui_workflow.json (API format) against the real node classes and their input types;
    then run it, with the checkpoint loader's model and conditioning given by the tiny model."""
    import nodes
    from comfy_execution.validation import validate_node_input

    from bypass_kernels.comfyui.nodes import NODE_CLASS_MAPPINGS

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    classes = {**nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    with open(WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    for key, spec in workflow.items():
        cls = classes[spec["class_type"]]
        required = cls.INPUT_TYPES()["required"]
        optional = cls.INPUT_TYPES().get("optional", {})
        for name in required:
            assert name in spec["inputs"], (key, name)
        for name, value in spec["inputs"].items():
            kind = (required.get(name) or optional.get(name))[0]
            if isinstance(value, list):  # a link: [node, output index]
                source = classes[workflow[value[0]]["class_type"]]
                assert validate_node_input(source.RETURN_TYPES[value[1]], kind), (key, name)
            elif isinstance(kind, list) and kind:  # a combo (a file list is empty here: no checkpoints)
                assert value in kind, (key, name, value)
    model, cond, latent = sd15
    bypass = next(k for k, s in workflow.items() if s["class_type"] == "MidBlockBypass")
    inputs = {k: v for k, v in workflow[bypass]["inputs"].items() if k != "model"}
    patched = NODE_CLASS_MAPPINGS["MidBlockBypass"]().apply(model, **inputs)[0]
    sampler = next(s for s in workflow.values() if s["class_type"] == "KSampler")["inputs"]
    out = nodes.common_ksampler(
        patched, 0, 2, sampler["cfg"], sampler["sampler_name"], sampler["scheduler"], cond, cond, {"samples": latent}
    )[0]["samples"]
    assert torch.isfinite(out).all() and out.shape == latent.shape


def _spy_blends(monkeypatch):
    """Every blend the node makes: (rows blended, t read, λ read), from the kernel's own arguments."""
    import bypass_kernels.comfyui.bypass as bypass

    seen = []
    real = bypass._blend

    def spy(m, h, call):
        table, t = call
        index = t.float().round().clamp(0, table.numel() - 1).long()
        seen.append((m.shape[1], t.flatten().tolist(), table[index].flatten().tolist()))
        return real(m, h, call)

    monkeypatch.setattr(bypass, "_blend", spy)
    return seen


@pytest.mark.parametrize("shifted", [False, True], ids=["flux", "after-ModelSamplingFlux"])
def test_flux_reads_lambda_at_1000_sigma(comfy, monkeypatch, shifted):
    """ComfyUI's Flux model sampling gives σ as the timestep: the table is read at 1000·σ. (Its
    model-sampling classes are built on the fly, so the Flux one was never recognised by name and every
    step read λ at index 0 or 1; a constant λ could not show it.)"""
    from bypass_kernels import BypassSchedule

    model, cond, latent = cb.tiny_model("flux")
    if shifted:
        from comfy_extras.nodes_model_advanced import ModelSamplingFlux

        model = ModelSamplingFlux().patch(model, 1.15, 0.5, 64, 64)[0]
    seen = _spy_blends(monkeypatch)
    cb.sample(node(model, 1.0, span="1-2"), cond, latent, scheduler="simple", cfg=1.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)[:-1]
    schedule = BypassSchedule.linear(1.0, 0, 999)
    assert [round(t[0]) for _, t, _ in seen] == [round(1000 * float(s)) for s in sigmas]
    assert [lam[0] for _, _, lam in seen] == pytest.approx([schedule.weight(1000 * float(s)) for s in sigmas])
    assert seen[0][2][0] > 0.5  # the first, noisiest step acts


def test_flux_single_block_span_with_image_streams_leaves_the_text_tokens(comfy, monkeypatch):
    """Inside Flux's single blocks the stream is [txt; img]: streams='image' blends the image tokens
    only (it blended the whole sequence, the same as 'all')."""
    model, cond, latent = cb.tiny_model("flux")
    seen = _spy_blends(monkeypatch)
    image = cb.sample(node(model, 1.0, shape="constant", span="2", streams="image"), cond, latent, scheduler="simple")
    image_rows = {rows for rows, _, _ in seen}
    seen.clear()
    everything = cb.sample(node(model, 1.0, shape="constant", span="2"), cond, latent, scheduler="simple")
    joint_rows = {rows for rows, _, _ in seen}
    text_tokens = cond[0][0].shape[1]
    assert joint_rows == {rows + text_tokens for rows in image_rows}, (image_rows, joint_rows)
    assert not torch.allclose(image, everything, atol=1e-5)


def test_continuous_noise_level_models_refuse_a_timestep_schedule_that_would_not_act(comfy, sd15):
    """CosXL and Playground v2.5 sample with ModelSamplingContinuousEDM: the timestep is ln(σ)/4, so a
    window in timesteps read λ at t ≈ 0 and did nothing. Refused at the first call with what to use;
    the fraction of sampling acts."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    model, cond, latent = sd15
    edm = ModelSamplingContinuousEDM().patch(model, "v_prediction", 120.0, 0.002)[0]
    with pytest.raises(ValueError, match="fraction of sampling"):
        cb.sample(node(edm, 0.5, start=500.0), cond, latent)
    plain = cb.sample(edm, cond, latent)
    bypassed = cb.sample(node(edm, 1.0, window="fraction of sampling", start=0.0, end=0.5), cond, latent)
    assert not torch.allclose(bypassed, plain, atol=1e-4)
    cb.sample(node(edm, 0.5, shape="constant", start=0.0), cond, latent)  # λ = 0.5 at every timestep: it acts


@pytest.mark.parametrize(("start", "end"), [(0.0, 0.4), (0.0, 1000.0), (100.5, 900.0), (500.0, 500.0)])
def test_a_timesteps_window_takes_whole_timesteps_below_1000(comfy, sd15, start, end):
    with pytest.raises(ValueError, match=r"whole training timesteps 0 <= start < end <= 999"):
        node(sd15[0], 0.3, start=start, end=end)


@pytest.mark.parametrize("text", ["/etc/hostname", "schedule.json", "C:\\\\bypass.json"])
def test_the_schedule_input_reads_no_files(comfy, sd15, text):
    """A shared workflow must not read or probe files on the machine that runs it."""
    with pytest.raises(ValueError, match="reads no files"):
        node(sd15[0], 0.3, schedule=text)


@pytest.mark.parametrize("text", ["linear:x.json", "constant:0.3:x.json"])
def test_an_inline_spec_naming_a_file_is_not_opened(comfy, sd15, tmp_path, monkeypatch, text):
    """``linear:x.json`` passed the node's inline-spec filter and was opened as a file in ComfyUI's working
    folder (a present file and a missing one gave different errors)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as missing:
        node(sd15[0], 0.3, schedule=text)
    (tmp_path / text).write_text('{"shape": "constant", "strength": 0.5}')
    with pytest.raises(ValueError) as present:
        node(sd15[0], 0.3, schedule=text)
    assert str(present.value) == str(missing.value) and "cannot read" not in str(present.value)


def test_a_schedule_for_another_number_of_timesteps_is_refused(comfy, sd15):
    """A JSON schedule with num_train_timesteps 100 on a 1000-timestep model read its table at clamp(t, 0, 99)."""
    model, cond, latent = sd15
    text = '{"shape": "constant", "strength": 0.5, "t_min": 50, "num_train_timesteps": 100}'
    with pytest.raises(ValueError, match="built for num_train_timesteps=100, but this model has 1000"):
        cb.sample(node(model, 0.3, schedule=text), cond, latent)
