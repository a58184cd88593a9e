"""patch / unpatch / set_schedule on diffusers UNets, against an independent hand-written hook."""

import copy
import threading
import time

import pytest
import torch
from conftest import available_backends, example_inputs, hand_hook, run_unet
from torch import nn

import bypass_kernels
from bypass_kernels import BypassSchedule, is_patched, patch, patched, set_schedule, unpatch

BACKENDS = available_backends("cpu")


def snapshot(module: nn.Module):
    """Everything patch() may touch, for exact before/after comparisons."""
    rows = []
    for name, mod in module.named_modules():
        hooks = tuple(
            tuple(getattr(mod, attr).items())
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called",
            )
        )
        rows.append((name, type(mod), tuple(mod.__dict__), mod.__dict__.get("forward"), hooks))
    return rows, [n for n, _ in module.named_buffers()], list(module.state_dict())


def role_count(module: nn.Module) -> int:
    """The patch's roles attached in ``module``: hooks, and role objects in attached forwards."""
    attrs = ("_forward_hooks", "_forward_pre_hooks")
    hooks = sum(len(getattr(m, a)) for m in module.modules() for a in attrs)
    return hooks + sum(r is not None for m in module.modules() for r in vars(m).get("_bypass_roles", ()))


def reference(unet, inputs, weight_of, **overrides):
    handles = hand_hook(unet, weight_of)
    try:
        return run_unet(unet, inputs, **overrides)
    finally:
        for h in handles:
            h.remove()


class Identity(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_zero_is_the_unpatched_model(any_unet, backend):
    inputs = example_inputs(any_unet, batch=2, timestep=torch.tensor([999, 600]))
    expected = run_unet(any_unet, inputs)
    patch(any_unet, BypassSchedule.constant(0.0), backend=backend)
    assert torch.equal(run_unet(any_unet, inputs), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_one_is_the_model_without_its_mid_block(any_unet, backend):
    inputs = example_inputs(any_unet, batch=2, timestep=torch.tensor([999, 600]))
    mid = any_unet.mid_block
    any_unet.mid_block = Identity()
    try:
        expected = run_unet(any_unet, inputs)
    finally:
        any_unet.mid_block = mid
    patch(any_unet, BypassSchedule.constant(1.0), backend=backend)
    assert torch.equal(run_unet(any_unet, inputs), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "timestep",
    [
        torch.tensor([900.0, 700.0]),  # per sample
        torch.tensor(899.5),  # 0-d, a tie (rounds to 900)
        torch.tensor([998.5]),  # [1], a tie (rounds to 998)
        torch.tensor([1500, -4]),  # out of range: clamped
        torch.tensor([750, 750], dtype=torch.int32),
        850,  # Python int
        654.3,  # Python float
    ],
    ids=["per_sample", "zero_d_tie", "one_tie", "out_of_range", "int32", "py_int", "py_float"],
)
def test_intermediate_lambda_matches_hand_written_hook(any_unet, backend, timestep):
    schedule = BypassSchedule.linear(0.8, t_min=300)
    inputs = example_inputs(any_unet, batch=2, timestep=timestep)
    expected = reference(any_unet, inputs, schedule.weight)
    unpatched = run_unet(any_unet, inputs)
    patch(any_unet, schedule, backend=backend)
    got = run_unet(any_unet, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, unpatched, atol=1e-3)


def test_timestep_positional_and_keyword(tiny_sd):
    inputs = example_inputs(tiny_sd, batch=1, timestep=torch.tensor([950]))
    patch(tiny_sd, BypassSchedule.constant(0.5))
    by_keyword = run_unet(tiny_sd, inputs)
    with torch.no_grad():
        positional = tiny_sd(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])[0]
    assert torch.equal(by_keyword, positional)


def test_pre_blend_controlnet_residual_ordering(tiny_sd):
    """The blend acts on the mid-block's own output; the ControlNet residual is added afterwards."""
    inputs = example_inputs(tiny_sd, batch=2, timestep=torch.tensor([999, 800]))
    shapes = []
    handle = tiny_sd.mid_block.register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    downs = []
    hooks = [tiny_sd.conv_in.register_forward_hook(lambda mod, args, out: downs.append(out.shape))]
    for block in tiny_sd.down_blocks:
        hooks.append(block.register_forward_hook(lambda mod, args, out: downs.extend(r.shape for r in out[1])))
    run_unet(tiny_sd, inputs)
    for h in [handle, *hooks]:
        h.remove()
    gen = torch.Generator().manual_seed(3)
    residuals = dict(
        down_block_additional_residuals=tuple(torch.randn(s, generator=gen) for s in downs),
        mid_block_additional_residual=5 * torch.randn(shapes[0], generator=gen),
    )
    schedule = BypassSchedule.constant(0.7)
    expected = reference(tiny_sd, inputs, schedule.weight, **residuals)

    # The wrong order (residual added first, then blended) gives a different answer, so the test can fail.
    r = residuals["mid_block_additional_residual"]
    wrong = tiny_sd.mid_block.register_forward_hook(lambda mod, args, out: 0.3 * (out + r) + 0.7 * args[0] - r)
    wrong_result = run_unet(tiny_sd, inputs, **residuals)
    wrong.remove()
    assert not torch.allclose(wrong_result, expected, atol=1e-3)

    patch(tiny_sd, schedule)
    torch.testing.assert_close(run_unet(tiny_sd, inputs, **residuals), expected, atol=1e-5, rtol=1e-5)


def test_unpatch_restores_exactly(any_unet):
    inputs = example_inputs(any_unet, batch=2)
    before, expected = snapshot(any_unet), run_unet(any_unet, inputs)
    patch(any_unet)
    assert is_patched(any_unet)
    assert snapshot(any_unet)[2] == before[2]  # state_dict keys unchanged while patched
    unpatch(any_unet)
    assert snapshot(any_unet) == before
    assert not is_patched(any_unet)
    assert torch.equal(run_unet(any_unet, inputs), expected)
    unpatch(any_unet)  # second call: a no-op
    assert snapshot(any_unet) == before


def test_patching_twice_replaces_the_schedule(tiny_sd):
    inputs = example_inputs(tiny_sd, batch=1, timestep=torch.tensor([999]))
    patch(tiny_sd, BypassSchedule.constant(0.9))
    once = role_count(tiny_sd)
    patch(tiny_sd, BypassSchedule.constant(0.2))
    assert role_count(tiny_sd) == once == 3  # timestep, span start, span end
    got = run_unet(tiny_sd, inputs)
    unpatch(tiny_sd)
    expected = reference(tiny_sd, inputs, BypassSchedule.constant(0.2).weight)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_set_schedule_writes_the_same_storage(tiny_sd):
    patch(tiny_sd, BypassSchedule.constant(0.1))
    table = tiny_sd._bypass.table
    ptr = table.data_ptr()
    set_schedule(tiny_sd, BypassSchedule.cosine(0.5, t_min=100))
    assert tiny_sd._bypass.table is table and table.data_ptr() == ptr
    assert torch.equal(table, BypassSchedule.cosine(0.5, t_min=100).table())
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.cosine(0.5, t_min=100)


def test_patched_context_manager_restores(tiny_sd):
    with patched(tiny_sd, BypassSchedule.constant(0.4)) as model:
        assert model is tiny_sd and is_patched(tiny_sd)
    assert not is_patched(tiny_sd)
    patch(tiny_sd, BypassSchedule.constant(0.1))
    with patched(tiny_sd, BypassSchedule.constant(0.4)):
        assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.constant(0.4)
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.constant(0.1)


def test_table_is_float32_on_the_host_and_on_the_device_the_blend_runs(tiny_sd):
    model = copy.deepcopy(tiny_sd)
    keys = list(model.state_dict())
    patch(model)
    assert list(model.state_dict()) == keys and list(model.named_buffers()) == list(tiny_sd.named_buffers())
    model.to(torch.float16).half().bfloat16()
    assert model._bypass.table.dtype == torch.float32 and model._bypass.table.device.type == "cpu"
    assert torch.equal(model._bypass.table, bypass_kernels.default_schedule().table())
    model.to("meta")  # the host copy stays real memory; the blend makes a copy where it runs
    assert model._bypass.table_on(torch.device("meta")).device.type == "meta"
    assert torch.equal(model._bypass.table, bypass_kernels.default_schedule().table())


def test_fp16_model_runs_patched(tiny_sd):
    model = copy.deepcopy(tiny_sd).to(torch.bfloat16)
    inputs = example_inputs(model, batch=2, timestep=torch.tensor([999, 700]))
    schedule = BypassSchedule.linear(0.5, t_min=400)
    expected = reference(model, inputs, schedule.weight)
    patch(model, schedule)
    torch.testing.assert_close(run_unet(model, inputs), expected, atol=0, rtol=0)


def test_deepcopy_of_a_patched_model_is_independent(tiny_sd):
    inputs = example_inputs(tiny_sd, batch=1, timestep=torch.tensor([999]))
    patch(tiny_sd, BypassSchedule.constant(0.3))
    clone = copy.deepcopy(tiny_sd)
    assert is_patched(clone)
    set_schedule(clone, BypassSchedule.constant(0.9))
    torch.testing.assert_close(
        run_unet(clone, inputs), reference(unpatch(copy.deepcopy(clone)), inputs, lambda t: 0.9), atol=1e-5, rtol=1e-5
    )
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.constant(0.3)
    unpatch(clone)
    assert is_patched(tiny_sd) and not is_patched(clone)


class SlowMid(nn.Module):
    """A mid-block that sleeps, so concurrent calls interleave inside the patched region."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, hidden_states, emb=None):
        time.sleep(0.002)
        return self.conv(hidden_states) * 2


class ToyUNet(nn.Module):
    """Any module with a shape-preserving mid_block and a (sample, timestep) signature."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = SlowMid()

    def forward(self, sample, timestep):
        return self.mid_block(self.conv_in(sample)) + 0


def test_threads_each_get_their_own_timestep():
    torch.manual_seed(0)
    toy = ToyUNet().eval()
    schedule = BypassSchedule.linear(1.0, t_min=0)
    x = torch.randn(1, 4, 6, 6)
    timesteps = [0, 250, 500, 750, 999]
    with torch.no_grad():
        expected = {t: reference_toy(toy, x, schedule.weight(t)) for t in timesteps}
    patch(toy, schedule)
    errors = []

    def worker(t):
        for _ in range(20):
            with torch.no_grad():
                out = toy(x, torch.tensor([t]))
            if not torch.allclose(out, expected[t], atol=1e-6):
                errors.append(t)

    threads = [threading.Thread(target=worker, args=(t,)) for t in timesteps]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


def reference_toy(toy, x, lam):
    h = toy.conv_in(x)
    m = toy.mid_block(h)
    return (1 - lam) * m + lam * h


def test_generic_module_and_pipeline_like_object():
    toy = ToyUNet()

    class FakePipe:  # any object with a .unet, as DiffusionPipeline has
        unet = toy

    pipe = FakePipe()
    assert patch(pipe) is pipe and is_patched(toy) and is_patched(pipe)
    unpatch(pipe)
    assert not is_patched(toy)


def test_compiled_module_is_patched_through_orig_mod(tiny_sd):
    compiled = torch.compile(tiny_sd)
    patch(compiled)
    assert is_patched(tiny_sd)
    unpatch(compiled)
    assert not is_patched(tiny_sd)


class Widening(nn.Module):
    def forward(self, hidden_states, emb=None):
        return torch.cat([hidden_states, hidden_states], dim=1)


@pytest.mark.parametrize(
    ("make", "kwargs", "exc", "match"),
    [
        (lambda u: nn.Linear(2, 2), {}, TypeError, "neither a mid-block"),
        (lambda u: "unet", {}, TypeError, "neither a mid-block"),
        (lambda u: u, {"schedule": 0.3}, TypeError, "BypassSchedule"),
        (lambda u: u, {"backend": "fastest"}, ValueError, "backend"),
        (lambda u: u, {"backend": "cuda"}, bypass_kernels.BackendUnavailableError, "unavailable"),
        (
            lambda u: u,
            {"schedule": BypassSchedule.constant(0.1, num_train_timesteps=500), "pipe": True},
            ValueError,
            "num_train_timesteps",
        ),
    ],
)
def test_bad_input_leaves_the_model_unchanged(tiny_sd, make, kwargs, exc, match):
    kwargs = dict(kwargs)
    target = make(tiny_sd)
    if kwargs.pop("pipe", False):
        from diffusers import DDIMScheduler

        class Pipe:
            unet = tiny_sd
            scheduler = DDIMScheduler(num_train_timesteps=1000)

        target = Pipe()
    before = snapshot(tiny_sd)
    with pytest.raises(exc, match=match):
        patch(target, **kwargs)
    assert snapshot(tiny_sd) == before


def test_mid_block_none_is_a_value_error(tiny_unet2d):
    model = copy.deepcopy(tiny_unet2d)
    model.mid_block = None
    with pytest.raises(ValueError, match="no mid-block"):
        patch(model)


def test_shape_changing_mid_block_is_refused():
    toy = ToyUNet()
    toy.mid_block = Widening()
    patch(toy)
    with pytest.raises(ValueError, match="shape"):
        toy(torch.randn(1, 4, 3, 3), torch.tensor([999]))


def test_mid_block_declaring_other_channels_is_refused_at_patch_time(tiny_sd):
    model = copy.deepcopy(tiny_sd)
    model.mid_block.resnets[-1].out_channels = 7
    before = snapshot(model)
    with pytest.raises(ValueError, match="channels"):
        patch(model)
    assert snapshot(model) == before


def test_set_schedule_errors(tiny_sd):
    with pytest.raises(ValueError, match="not patched"):
        set_schedule(tiny_sd, BypassSchedule.constant(0.1))
    patch(tiny_sd)
    with pytest.raises(ValueError, match="patch"):
        set_schedule(tiny_sd, BypassSchedule.constant(0.1, num_train_timesteps=10))
    with pytest.raises(ValueError, match="missing key 'strength'"):
        set_schedule(tiny_sd, {"shape": "constant"})
    with pytest.raises(TypeError, match="BypassSchedule"):
        set_schedule(tiny_sd, 0.3)


def test_schedules_as_spec_strings_and_dicts(tiny_sd):
    """patch and set_schedule take what the command line takes (a spec) and what to_dict() gives."""
    inputs = example_inputs(tiny_sd, batch=2, timestep=torch.tensor([999, 700]))
    expected = reference(tiny_sd, inputs, BypassSchedule.linear(0.3, t_min=500).weight)
    patch(tiny_sd, "linear:0.3:500")
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.linear(0.3, t_min=500)
    torch.testing.assert_close(run_unet(tiny_sd, inputs), expected, atol=1e-5, rtol=1e-5)
    set_schedule(tiny_sd, BypassSchedule.cosine(0.5, t_min=100).to_dict())
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.cosine(0.5, t_min=100)
    with pytest.raises(ValueError, match="schedule spec"):
        patch(tiny_sd, "linear:lots")
    assert bypass_kernels.get_schedule(tiny_sd) == BypassSchedule.cosine(0.5, t_min=100)


def test_missing_timestep_is_a_clear_error():
    toy = ToyUNet()
    h = toy.conv_in(torch.randn(1, 4, 3, 3)).detach()
    expected = toy.mid_block(h)
    patch(toy)
    assert torch.equal(toy.mid_block(h), expected)  # the mid-block on its own, outside the UNet: untouched
    with pytest.raises(TypeError, match="called without a timestep"):
        toy(sample=torch.randn(1, 4, 3, 3))


def test_table_for_calls_overrides_the_table_in_its_block(tiny_sd):
    inputs = example_inputs(tiny_sd, batch=2, timestep=torch.tensor([999, 400]))
    other = BypassSchedule.cosine(0.9, t_min=200)
    expected = reference(tiny_sd, inputs, other.weight)
    patch(tiny_sd, BypassSchedule.constant(0.1))
    with tiny_sd._bypass.table_for_calls(other.table()):
        got = run_unet(tiny_sd, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "table" not in bypass_kernels.records._CALLS.__dict__  # dropped after the block
    default = reference(unpatch(copy.deepcopy(tiny_sd)), inputs, BypassSchedule.constant(0.1).weight)
    torch.testing.assert_close(run_unet(tiny_sd, inputs), default, atol=1e-5, rtol=1e-5)
