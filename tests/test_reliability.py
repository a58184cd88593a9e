"""The patch under the orders, faults and inputs users bring: compile before patch, half-applied
patches, the meta device, pickling, a swapped scheduler, video-shaped batches."""

import copy
import pickle

import pytest
import torch
from conftest import example_inputs, hand_hook, run_unet
from tiny_models import one_level_sd
from torch import nn

import bypass_kernels
from bypass_kernels import BypassSchedule, controller, is_patched, patch, set_schedule, unpatch
from bypass_kernels.presets import build_unet

SCHEDULE = BypassSchedule.linear(0.8, t_min=300)
OTHER = BypassSchedule.constant(0.5)


class Mid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, hidden_states, temb=None):
        return self.conv(hidden_states)


class Toy(nn.Module):
    """The smallest UNet-like module: (sample, timestep) in, a shape-preserving mid-block inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = Mid()

    def forward(self, sample, timestep):
        return self.mid_block(self.conv_in(sample)) * 2


def toy_reference(toy, x, t, schedule):
    """Hand-written: λ per sample from schedule.weight, blended in float32."""
    with torch.no_grad():
        h = toy.conv_in(x)
        m = toy.mid_block.conv(h)
        lam = torch.tensor([schedule.weight(v) for v in torch.as_tensor(t).reshape(-1).tolist()]).view(-1, 1, 1, 1)
        return ((1 - lam) * m + lam * h) * 2


def unpatched_reference(toy, x):
    with torch.no_grad():
        return toy.mid_block.conv(toy.conv_in(x)) * 2


X = torch.randn(2, 4, 5, 5)
T = torch.tensor([900.0, 400.0])


def call(model):
    with torch.no_grad():
        return model(X, T)


def compiled_toy(how):
    toy = Toy()
    if how == "torch.compile":
        return toy, torch.compile(toy, backend="eager", fullgraph=True)
    toy.compile(backend="eager", fullgraph=True)  # Module.compile(): the module itself is compiled
    return toy, toy


COMPILES = ["torch.compile", "Module.compile"]


@pytest.mark.parametrize("how", COMPILES)
def test_compile_run_patch_run(how):
    toy, compiled = compiled_toy(how)
    torch.testing.assert_close(call(compiled), unpatched_reference(toy, X))
    patch(compiled, SCHEDULE)
    assert is_patched(compiled)
    torch.testing.assert_close(call(compiled), toy_reference(toy, X, T, SCHEDULE))


@pytest.mark.parametrize("how", COMPILES)
def test_patch_compile_run_unpatch_run(how):
    toy = Toy()
    patch(toy, SCHEDULE)
    compiled = torch.compile(toy, backend="eager", fullgraph=True) if how == "torch.compile" else toy
    if how == "Module.compile":
        toy.compile(backend="eager", fullgraph=True)
    torch.testing.assert_close(call(compiled), toy_reference(toy, X, T, SCHEDULE))
    unpatch(compiled)
    torch.testing.assert_close(call(compiled), unpatched_reference(toy, X))


@pytest.mark.parametrize("how", COMPILES)
def test_every_transition_takes_effect_on_a_compiled_model(how):
    toy, compiled = compiled_toy(how)
    call(compiled)
    steps = [
        ("patch", SCHEDULE),
        ("unpatch", None),
        ("patch", OTHER),  # a new controller behind an already-seen marker class
        ("set_schedule", SCHEDULE),
        ("patched", OTHER),
        ("unpatch", None),
    ]
    for action, schedule in steps:
        if action == "patch":
            patch(compiled, schedule)
        elif action == "unpatch":
            unpatch(compiled)
        elif action == "set_schedule":
            set_schedule(compiled, schedule)
        if action == "patched":
            with bypass_kernels.patched(compiled, schedule):
                torch.testing.assert_close(call(compiled), toy_reference(toy, X, T, schedule), msg=action)
            torch.testing.assert_close(call(compiled), toy_reference(toy, X, T, SCHEDULE), msg="after patched()")
        elif schedule is None:
            torch.testing.assert_close(call(compiled), unpatched_reference(toy, X), msg=action)
        else:
            torch.testing.assert_close(call(compiled), toy_reference(toy, X, T, schedule), msg=action)


def test_pipeline_whose_unet_was_compiled_and_run_then_patched():
    unet = one_level_sd()  # the smallest SD-style UNet: a quick Dynamo trace
    inputs = example_inputs(unet, batch=2, timestep=torch.tensor([950, 400]))
    expected_plain = run_unet(unet, inputs)
    handles = hand_hook(unet, SCHEDULE.weight)
    expected = run_unet(unet, inputs)
    for h in handles:
        h.remove()

    class Pipe:  # what patch() reads of a pipeline: .unet (and .scheduler, absent here)
        pass

    pipe = Pipe()
    pipe.unet = torch.compile(unet, backend="eager", fullgraph=True)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), expected_plain)
    patch(pipe, SCHEDULE)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), expected, atol=1e-5, rtol=1e-5)
    unpatch(pipe)
    torch.testing.assert_close(run_unet(pipe.unet, inputs), expected_plain)


# --------------------------------------------------------------------- atomic patch
class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = torch.jit.script(Mid())

    def forward(self, sample, timestep):
        return self.mid_block(self.conv_in(sample))


def state_of(model):
    rows = []
    for name, module in model.named_modules():
        hooks = [
            len(getattr(module, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called")
        ]
        rows.append((name, type(module), sorted(module.__dict__), hooks))
    return rows


def test_a_patch_that_cannot_attach_leaves_the_model_exactly_as_it_was():
    model = Scripted()
    before = state_of(model)
    x = torch.randn(1, 4, 5, 5)
    expected = model(x, 10)
    with pytest.raises(TypeError, match="ScriptModule"):
        patch(model, SCHEDULE)
    assert state_of(model) == before and not is_patched(model)
    assert torch.equal(model(x, 10), expected)
    unpatch(model)  # nothing to do, no error


def test_a_failure_while_attaching_is_rolled_back(monkeypatch):
    toy = Toy()
    before = state_of(toy)

    change_class = controller._set_class_below_parametrizations

    def refuse(module, cls):  # the span's class, after the model's timestep hook is attached
        if module is toy.mid_block:
            raise RuntimeError("classes cannot change here")
        change_class(module, cls)

    monkeypatch.setattr(controller, "_set_class_below_parametrizations", refuse)  # where install calls it
    with pytest.raises(TypeError, match="classes cannot change here"):
        patch(toy, SCHEDULE)
    monkeypatch.undo()
    assert state_of(toy) == before and not is_patched(toy)
    torch.testing.assert_close(call(toy), unpatched_reference(toy, X))


# --------------------------------------------------------------------- meta device, pickling
@pytest.mark.parametrize("load", ["to_empty", "assign"])
def test_a_model_patched_on_meta_materialises_and_runs(load):
    real = Toy()
    with torch.device("meta"):
        model = Toy()
    patch(model, SCHEDULE)
    if load == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(real.state_dict())
    else:
        model.load_state_dict(real.state_dict(), assign=True)
    torch.testing.assert_close(call(model), toy_reference(real, X, T, SCHEDULE))


def test_pickle_and_deepcopy_keep_the_patch_and_the_class_name():
    toy = patch(Toy(), SCHEDULE)
    expected = toy_reference(toy, X, T, SCHEDULE)
    for clone in (pickle.loads(pickle.dumps(toy)), copy.deepcopy(toy)):
        assert type(clone).__name__ == "Toy" and isinstance(clone, Toy) and is_patched(clone)
        torch.testing.assert_close(call(clone), expected)
        unpatch(clone)
        assert type(clone) is Toy and type(clone.mid_block) is Mid
        torch.testing.assert_close(call(clone), unpatched_reference(toy, X))
    assert is_patched(toy)


def test_class_names_seen_by_diffusers_do_not_change():
    unet = build_unet("tiny-sd")
    plain = type(unet)
    patch(unet)
    assert type(unet).__name__ == plain.__name__ and type(unet).__module__ == plain.__module__
    assert isinstance(unet, plain) and unet.config == unpatch(copy.deepcopy(unet)).config
    unpatch(unet)
    assert type(unet) is plain


# --------------------------------------------------------------------- schedulers and user errors
def test_a_swapped_scheduler_with_another_T_is_refused_at_the_next_call():
    from diffusers import DDIMScheduler

    class Pipe:
        pass

    pipe = Pipe()
    pipe.unet = Toy()
    pipe.scheduler = DDIMScheduler()
    patch(pipe, SCHEDULE)
    call(pipe.unet)
    pipe.scheduler = DDIMScheduler(num_train_timesteps=500)
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        call(pipe.unet)


def test_unpatch_of_something_else_names_unpatch():
    with pytest.raises(TypeError, match=r"bypass_kernels\.unpatch"):
        unpatch(None)


# --------------------------------------------------------------------- frames folded into the batch
class VideoToy(nn.Module):
    """Folds F frames into the batch before the mid-block, sample-major, as diffusers' video UNets do."""

    def __init__(self, frames=3):
        super().__init__()
        torch.manual_seed(0)
        self.frames = frames
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = Mid()

    def forward(self, sample, timestep):  # sample [B, C, F, H, W]
        b, c, f, h, w = sample.shape
        x = self.conv_in(sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
        return self.mid_block(x).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("compiled", [False, True])
def test_per_sample_timesteps_repeat_over_folded_frames(compiled):
    video = VideoToy()
    x = torch.randn(2, 4, 3, 5, 5)
    t = torch.tensor([950.0, 320.0])
    with torch.no_grad():
        h = video.conv_in(x.permute(0, 2, 1, 3, 4).reshape(6, 4, 5, 5))
        m = video.mid_block.conv(h)
        lam = torch.tensor([SCHEDULE.weight(v) for v in (950, 950, 950, 320, 320, 320)]).view(-1, 1, 1, 1)
        expected = ((1 - lam) * m + lam * h).reshape(2, 3, 4, 5, 5).permute(0, 2, 1, 3, 4)
    patch(video, SCHEDULE)
    model = torch.compile(video, backend="eager", fullgraph=True) if compiled else video
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), expected)
