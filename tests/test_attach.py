"""How the patch attaches: one call's record per thread, exact types, shared blocks, in-place
blocks, copies of patched pipelines, and the torch.compile facts the mechanism rests on."""

import copy
import pickle
import sys
import threading

import pytest
import torch
from conftest import HAS_CUDA, example_inputs, gpu, hand_hook, run_unet
from test_reliability import Mid
from tiny_models import one_level_sd
from torch import nn

from bypass_kernels import BypassSchedule, is_patched, patch, unpatch
from bypass_kernels.presets import build_unet

SCHEDULE = BypassSchedule.linear(0.9, t_min=0)


def reference(unet, inputs, weight_of):
    handles = hand_hook(unet, weight_of)
    try:
        return run_unet(unet, inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def unet():
    return one_level_sd()  # the smallest SD-style UNet: Dynamo traces it in a fraction of tiny-sd's time


@pytest.fixture(autouse=True)
def _unpatched(unet):
    yield
    unpatch(unet)


# --------------------------------------------------------------------- one record per call and thread
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_threads_calling_a_compiled_patched_unet_each_get_their_own_lambda(unet, device, monkeypatch):
    """4 threads, t = 900 and 100 alternating: every call's output is its own timestep's."""
    model = copy.deepcopy(unet).to(device)
    batches = {t: example_inputs(model, batch=1, timestep=torch.tensor([float(t)])) for t in (900, 100)}
    batches = {
        t: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for t, b in batches.items()
    }
    expected = {t: reference(model, b, SCHEDULE.weight) for t, b in batches.items()}
    assert not torch.allclose(expected[900], expected[100], atol=1e-3)
    patch(model, SCHEDULE)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for b in batches.values():
        run_unet(compiled, b)  # compile once per timestep shape before the threads start
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    sys.setswitchinterval(1e-5)  # switch threads often: any state shared across calls shows
    wrong = []
    try:

        def worker(k):
            for i in range(15):
                t = 900 if (i + k) % 2 else 100
                if not torch.allclose(run_unet(compiled, batches[t]), expected[t], atol=1e-5, rtol=1e-5):
                    wrong.append(t)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(0.005)
    assert not wrong, f"{len(wrong)} of 60 calls got another call's λ"


def records_of(model) -> list[str]:
    """The per-thread records of ``model``'s class now (other tests' models may have left theirs)."""
    from bypass_kernels import records

    return [k for k in records._CALLS.__dict__ if k in records._record_keys(model._bypass.token)]


def mid_block_call(unet, inputs):
    """(a function that calls ``unet.mid_block`` alone with the arguments a UNet call gives it, its
    output now): the block called on its own, outside any UNet call."""
    captured = {}
    handle = unet.mid_block.register_forward_pre_hook(
        lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
    )
    run_unet(unet, inputs)
    handle.remove()

    def alone():
        with torch.no_grad():
            return unet.mid_block(*captured["args"], **captured["kwargs"])

    return alone, alone()


def test_a_call_that_fails_before_the_mid_block_leaves_nothing_behind(unet):
    """A UNet call that raises between the timestep and the mid-block, then the mid-block on its own:
    it is the plain mid-block, not blended with the failed call's timestep."""
    inputs = example_inputs(unet, batch=2, timestep=torch.tensor([999, 999]))
    mid_block_alone, plain = mid_block_call(unet, inputs)
    patch(unet, BypassSchedule.constant(1.0))
    bad = dict(inputs, encoder_hidden_states=torch.randn(2, 5, 7))  # wrong width: cross-attention raises
    with pytest.raises(RuntimeError):
        run_unet(unet, bad)
    assert torch.equal(mid_block_alone(), plain)
    torch.testing.assert_close(run_unet(unet, inputs), reference(unpatch(copy.deepcopy(unet)), inputs, lambda t: 1.0))


class TimedToy(nn.Module):
    """A time projection (the carrier) before a mid-block, as in a diffusers UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time_proj = Timesteps()
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = Mid()

    def forward(self, sample, timestep):
        return self.mid_block(self.conv_in(sample), self.time_proj(timestep)) * 2


@pytest.mark.parametrize("order", ["interrupted-then-compiled", "compiled-interrupted-compiled"])
def test_an_eager_call_interrupted_inside_the_span_does_not_break_compiled_calls(order, monkeypatch):
    """Ctrl-C (or any error) in an eager call after the timestep was taken and before the span's end
    leaves that call's record behind; compiled calls after it, traced with or without the record there,
    give their own λ every time (code traced with it there used to delete it on every call: KeyError),
    and the next eager call replaces it."""

    model = TimedToy().eval()
    expected = toy_reference(model, SCHEDULE)
    patch(model, SCHEDULE, timestep_module="time_proj")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    if order == "compiled-interrupted-compiled":
        torch.testing.assert_close(call(compiled), expected)

    def interrupted(self, hidden_states, temb=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Mid, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            call(model)
    assert records_of(model), "the interrupted call left no record: the test tests nothing"
    for _ in range(3):  # the first traces (or runs) with the record there
        torch.testing.assert_close(call(compiled), expected)
    torch.testing.assert_close(call(model), expected)
    assert not records_of(model)
    torch.testing.assert_close(call(compiled), expected)


@pytest.mark.parametrize(
    "order",
    [
        "wrapper-then-patch",
        "patch-then-wrapper",
        "patch-wrapper-unwrap",
        "patch-wrapper-unpatch-patch",
        "compile-wrap-both-then-patch",
    ],
)
def test_a_forward_wrapper_on_the_mid_block_in_any_order_blends_once(order):
    """Offloading libraries (accelerate, diffusers' hooks) set a module's ``forward`` as an instance
    attribute that calls the forward they found. Set before the patch, the block gets hooks; set after, the
    wrapper calls the attached forward. Every order blends exactly once, eager and compiled, and unpatch
    leaves the plain model."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    torch._dynamo.reset()  # TimedToy's forward is compiled by other tests too: its recompile limit is for this one
    model = TimedToy().eval()
    expected, plain = toy_reference(model, SCHEDULE), toy_reference(model, BypassSchedule.constant(0.0))
    wrap = lambda: add_hook_to_module(model.mid_block, ModelHook())  # noqa: E731
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    if order == "wrapper-then-patch":
        wrap()
    if order == "compile-wrap-both-then-patch":  # every role a hook: the compiled code must still see the patch
        torch.testing.assert_close(call(compiled), plain)
        wrap()
        add_hook_to_module(model.time_proj, ModelHook())
    patch(model, SCHEDULE, timestep_module="time_proj")
    if order in ("patch-then-wrapper", "patch-wrapper-unwrap", "patch-wrapper-unpatch-patch"):
        wrap()
    if order == "patch-wrapper-unwrap":
        remove_hook_from_module(model.mid_block)  # puts back the forward it found: the attached one, bound
    if order == "patch-wrapper-unpatch-patch":
        unpatch(model)
        torch.testing.assert_close(call(model), plain)
        patch(model, SCHEDULE, timestep_module="time_proj")
    for runnable in (model, compiled, model):
        torch.testing.assert_close(call(runnable), expected)
    unpatch(model)
    assert type(model.mid_block) is Mid and type(model.time_proj) is Timesteps and type(model) is TimedToy
    for runnable in (model, compiled):
        torch.testing.assert_close(call(runnable), plain)


def test_wrappers_stacked_on_the_mid_block_after_the_patch_keep_the_blend():
    """Each wrapper set after the patch puts a frame between the model's forward and the span's role,
    which looks for that forward's frame (eager mode): two dozen of them still blend."""
    model = TimedToy().eval()
    expected = toy_reference(model, SCHEDULE)
    patch(model, SCHEDULE, timestep_module="time_proj")
    for _ in range(24):
        model.mid_block.forward = lambda *args, inner=model.mid_block.forward, **kwargs: inner(*args, **kwargs)
    torch.testing.assert_close(call(model), expected)


def test_unpatch_under_a_class_put_over_the_attached_one_leaves_a_plain_block():
    """A library that swaps a patched block's class for a subclass of its own: unpatch cannot take the
    attached class away from under it, but takes its role, and the block runs as the plain block."""
    model = TimedToy().eval()
    plain = toy_reference(model, BypassSchedule.constant(0.0))
    patch(model, SCHEDULE, timestep_module="time_proj")
    attached = type(model.mid_block)
    model.mid_block.__class__ = type(attached.__name__, (attached,), {})
    torch.testing.assert_close(call(model), toy_reference(model, SCHEDULE))
    unpatch(model)
    torch.testing.assert_close(call(model), plain)


def test_the_timestep_module_called_alone_leaves_nothing_a_block_called_alone_uses(unet):
    """``unet.time_proj(t)`` outside a UNet call (to look at the embedding) writes a record no model
    frame owns; the mid-block called alone afterwards is the plain mid-block."""

    mid_block_alone, plain = mid_block_call(unet, example_inputs(unet, batch=2))
    patch(unet, BypassSchedule.constant(1.0))
    with torch.no_grad():
        unet.time_proj(torch.tensor([900.0, 900.0]))
    assert records_of(unet), "the carrier wrote no record: the test tests nothing"
    assert torch.equal(mid_block_alone(), plain)
    assert not records_of(unet)


FAIL_NEXT = []


@torch.library.custom_op("bypass_kernels_tests::fails_when_told", mutates_args=())
def fails_when_told(x: torch.Tensor) -> torch.Tensor:
    """An op that raises at run time inside compiled code when told to (as an out-of-memory error would)."""
    if FAIL_NEXT:
        FAIL_NEXT.clear()
        raise KeyboardInterrupt
    return x.clone()


fails_when_told.register_fake(lambda x: torch.empty_like(x))


class FailingMid(Mid):
    def forward(self, hidden_states, temb=None):
        return self.conv(fails_when_told(hidden_states))


def test_a_compiled_call_interrupted_inside_the_span_leaves_nothing_a_block_called_alone_uses():
    """The model's own timestep hook runs in a compiled frame of its own, so its record reaches the
    thread before the span: a compiled call that stops inside the span leaves it there, with no frame
    id. The mid-block called alone afterwards is the plain mid-block, and the next calls are right."""
    toy = Toy(FailingMid()).eval()
    h = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        plain = toy.mid_block(h)
    expected = toy_reference(toy, SCHEDULE)
    patch(toy, SCHEDULE)
    compiled = torch.compile(toy, backend="eager", fullgraph=True)
    torch.testing.assert_close(call(compiled), expected)
    FAIL_NEXT.append(True)
    with pytest.raises(KeyboardInterrupt):
        call(compiled)
    with torch.no_grad():
        assert torch.equal(toy.mid_block(h), plain)
    torch.testing.assert_close(call(compiled), expected)
    torch.testing.assert_close(call(toy), expected)


# --------------------------------------------------------------------- exact types
def test_the_model_keeps_its_exact_class_and_its_attached_modules_a_same_named_one(unet):
    """The model's class never changes (diffusers checks it exactly); the modules that carry a role
    (the timestep projection and the mid-block) get a subclass of their class with its name, module
    and pickling, and unpatch gives every module its exact class back."""
    classes = {name: type(m) for name, m in unet.named_modules()}
    patch(unet)
    changed = {name for name, m in unet.named_modules() if type(m) is not classes[name]}
    assert changed == {"time_proj", "mid_block"}
    assert type(unet) is classes[""]
    for name in changed:
        cls, base = type(unet.get_submodule(name)), classes[name]
        assert cls.__mro__[1] is base
        assert (cls.__name__, cls.__qualname__, cls.__module__) == (base.__name__, base.__qualname__, base.__module__)
    unpatch(unet)
    assert all(type(m) is classes[name] for name, m in unet.named_modules())


def test_from_config_of_a_patched_model_builds_a_plain_model(unet):
    patch(unet)
    fresh = type(unet).from_config(unet.config)
    assert type(fresh) is type(unet) and not is_patched(fresh)
    assert all(not type(m).__dict__.get("_bypass_base") for m in fresh.modules())


def test_from_pipe_and_register_modules_accept_a_patched_pipeline(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from tiny_pipelines import sd_pipeline

    pipe = sd_pipeline(tmp_path)
    patch(pipe, SCHEDULE)
    assert type(pipe.unet) is UNet2DConditionModel
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert img2img.unet is pipe.unet and is_patched(img2img)
    pipe.register_modules(unet=pipe.unet)
    image = torch.rand(1, 3, 32, 32)
    out = img2img("a cat", image=image, num_inference_steps=2, strength=0.9, output_type="pt").images
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------- shared blocks, parametrize
class Toy(nn.Module):
    def __init__(self, mid=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.mid_block = mid if mid is not None else Mid()

    def forward(self, sample, timestep):
        return self.mid_block(self.conv_in(sample)) * 2


X = torch.randn(2, 4, 5, 5)
T = torch.tensor([900.0, 300.0])


def toy_reference(toy, schedule, mid=None):
    with torch.no_grad():
        h = toy.conv_in(X)
        m = (mid or toy.mid_block)(h.clone())
        lam = torch.tensor([schedule.weight(v) for v in T.tolist()]).view(-1, 1, 1, 1)
        return ((1 - lam) * m + lam * h) * 2


def call(model):
    with torch.no_grad():
        return model(X, T)


def test_two_models_sharing_a_mid_block_cannot_both_be_patched():
    a = Toy()
    b = Toy(mid=a.mid_block)
    patch(a, SCHEDULE)
    with pytest.raises(ValueError, match="already bypassed through another model"):
        patch(b, SCHEDULE)
    assert not is_patched(b) and type(b) is Toy
    unpatch(b)  # nothing to undo
    unpatch(a)
    patch(b, SCHEDULE)
    torch.testing.assert_close(call(b), toy_reference(b, SCHEDULE))
    unpatch(b)
    assert type(a) is Toy and type(b) is Toy and type(a.mid_block) is Mid and "_bypass_roles" not in vars(a.mid_block)


class Leaf(nn.Conv2d):
    def __init__(self):
        super().__init__(4, 4, 3, padding=1)


@pytest.mark.parametrize("order", ["patch-parametrize-unpatch", "parametrize-patch-remove"])
def test_parametrize_on_a_leaf_mid_block(order):
    from torch.nn.utils import parametrizations, parametrize

    toy = Toy(mid=Leaf())
    if order == "patch-parametrize-unpatch":
        patch(toy, SCHEDULE)
        parametrizations.weight_norm(toy.mid_block)
        torch.testing.assert_close(call(toy), toy_reference(toy, SCHEDULE))
        unpatch(toy)
        assert parametrize.is_parametrized(toy.mid_block)
        torch.testing.assert_close(call(toy), toy_reference(toy, BypassSchedule.constant(0.0)))
    else:
        parametrizations.weight_norm(toy.mid_block)
        patch(toy, SCHEDULE)
        torch.testing.assert_close(call(toy), toy_reference(toy, SCHEDULE))
        parametrize.remove_parametrizations(toy.mid_block, "weight")
        assert not parametrize.is_parametrized(toy.mid_block) and is_patched(toy)
        torch.testing.assert_close(call(toy), toy_reference(toy, SCHEDULE))
        unpatch(toy)
    assert type(toy) is Toy and parametrize.type_before_parametrizations(toy.mid_block) is Leaf
    if parametrize.is_parametrized(toy.mid_block):
        parametrize.remove_parametrizations(toy.mid_block, "weight")
    assert type(toy.mid_block) is Leaf


# --------------------------------------------------------------------- blocks that write their input
class ReluMid(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.SiLU(inplace=True)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, hidden_states, temb=None):
        return self.conv(self.act(hidden_states))


class FunctionalInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, hidden_states, temb=None):
        return self.conv(hidden_states.relu_())


@pytest.mark.parametrize("mid", [ReluMid, lambda: nn.ReLU(inplace=True)], ids=["silu-inplace-first", "bare-relu"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_mid_block_with_inplace_modules_is_blended_with_its_real_input(mid, compiled):
    toy = Toy(mid=mid())
    expected = toy_reference(toy, SCHEDULE)
    patch(toy, SCHEDULE)
    model = torch.compile(toy, backend="eager", fullgraph=True) if compiled else toy
    torch.testing.assert_close(call(model), expected)


def test_inference_mode_runs_patched(unet):
    """Inference tensors carry no version counter: the in-place check steps aside, the blend runs."""
    inputs = example_inputs(unet, batch=2, timestep=torch.tensor([900, 300]))
    expected = reference(unet, inputs, SCHEDULE.weight)
    patch(unet, SCHEDULE)
    with torch.inference_mode():
        got = unet(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_mid_block_that_writes_its_input_by_hand_is_refused_in_eager_mode():
    toy = Toy(mid=FunctionalInPlace())
    patch(toy, SCHEDULE)
    with pytest.raises(ValueError, match="in place"):
        call(toy)


# --------------------------------------------------------------------- copies of a patched pipeline
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_a_patched_pipeline_keep_the_scheduler_check(tmp_path, how):
    from diffusers import DDIMScheduler
    from tiny_pipelines import sd_pipeline

    pipe = patch(sd_pipeline(tmp_path), SCHEDULE)
    clone = copy.deepcopy(pipe) if how == "deepcopy" else pickle.loads(pickle.dumps(pipe))
    assert clone.unet is not pipe.unet and is_patched(clone)
    clone.scheduler = DDIMScheduler(num_train_timesteps=500)
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        clone("a cat", num_inference_steps=2, output_type="pt")
    pipe("a cat", num_inference_steps=2, output_type="pt")  # the original is untouched
    unpatch(clone)
    assert "_bypass_link" not in clone.__dict__ and is_patched(pipe)


# --------------------------------------------------------------------- what the mechanism rests on
class Timesteps(nn.Module):
    def forward(self, t):
        return t[:, None].float()


class Carried(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_proj = Timesteps()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        return self.conv(x) + self.time_proj(t).mean()


def test_dynamo_does_not_see_new_hooks_but_sees_a_swapped_submodule_class():
    """The facts of torch.compile that the patch is built on (checked on the torch installed here):
    a hook added to a submodule after compiling is not seen (Dynamo skips guards on empty hook dicts),
    and swapping that submodule's class recompiles. If the first ever fails, hooks alone would do."""
    model = Carried()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = torch.randn(1, 4, 2, 2), torch.tensor([3.0])
    before = compiled(x, t)
    handle = model.time_proj.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    stale = compiled(x, t)
    assert torch.equal(stale, before), f"torch {torch.__version__} now guards on hooks"
    base = type(model.time_proj)
    model.time_proj.__class__ = type(base.__name__, (base,), {})
    seen = compiled(x, t)
    assert not torch.equal(seen, before)
    handle.remove()
    model.time_proj.__class__ = base
    assert torch.equal(compiled(x, t), before)


def _dynamo_log_of_a_compiled_patched(model, inputs, artifact: str, logger_name: str) -> str:
    """What Dynamo logs under ``artifact`` while compiling ``model``, patched (eager backend, one call)."""
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    torch._logging.set_logs(**{artifact: True})
    logger.addHandler(handler)
    try:
        torch._dynamo.reset()
        patch(model, SCHEDULE)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            compiled(**inputs)
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return "\n".join(lines)


def test_compiled_code_never_checks_that_the_record_lacks_an_attribute():
    """The guards of a compiled patched model test no attribute's absence on the per-thread record:
    such a check raises and clears an AttributeError on every call (about 6k instructions). Read from
    Dynamo's guard log; the log must show the guards at all (a TENSOR_MATCH), or the test says nothing."""
    inputs = dict(sample=torch.randn(2, 4, 3, 3), timestep=torch.tensor([800.0, 100.0]))
    log = _dynamo_log_of_a_compiled_patched(Toy().eval(), inputs, "guards", "torch._dynamo.guards.__guards")
    assert "TENSOR_MATCH" in log
    absent = [line for line in log.splitlines() if "NO_HASATTR" in line and "_CALLS" in line]
    assert not absent, absent


def test_compiled_code_checks_no_aliasing_through_the_patch_and_only_the_carriers_base_above_it(unet):
    """Two guards a patch can avoid, read from Dynamo's guard log: the compiled carrier hook reaches the
    torch module through none of this package's globals (a second path to an object torch.nn reaches
    costs a check that both are the same object, run in Python on every call), and calling the
    carrier (its attached class) looks up no call method above it (the class names its base's): the one
    class above it read is its base, for the forward the attached one runs."""
    log = _dynamo_log_of_a_compiled_patched(
        unet, example_inputs(unet, batch=2), "guards", "torch._dynamo.guards.__guards"
    )
    assert "TENSOR_MATCH" in log  # the guards are in the log at all
    ours = [line for line in log.splitlines() if "is G[" in line and "bypass_kernels" in line]
    assert not ours, ours
    # the one class above it that compiled code reads is its base, for the forward it runs (monkeypatched or not)
    hierarchy = [line for line in log.splitlines() if "['time_proj']).__mro__[" in line]
    assert hierarchy, "the attached forward's call of its base is not in the log: the test checks nothing"
    assert all("__mro__[1]" in line and "call" not in line.split("#")[0] for line in hierarchy), hierarchy


def test_compiled_code_checks_no_hook_dictionary_of_the_attached_modules(unet):
    """The roles live in the attached modules' forwards, not in hooks: the guards of a compiled patched
    UNet read none of its modules' hook dictionaries (each hook costs guards on the dictionaries
    ``Module._call_impl`` reads and on the hook object's type, code and attributes, on every call)."""
    log = _dynamo_log_of_a_compiled_patched(
        unet, example_inputs(unet, batch=2), "guards", "torch._dynamo.guards.__guards"
    )
    assert "TENSOR_MATCH" in log
    hooks = [line for line in log.splitlines() if "._forward_hooks" in line or "._forward_pre_hooks" in line]
    assert not hooks, hooks


@pytest.mark.parametrize("graph_break", [False, True])
def test_only_the_mid_block_compiled_blends_as_eager(unet, graph_break):
    """Regional compilation: the UNet runs eager (its carrier writes an eager record) and only the
    mid-block is compiled, its hooks inside (Module.compile), whole or split by a graph break in its
    forward (the span end then runs in a frame of its own): every call blends as the eager patch."""
    model = copy.deepcopy(unet)
    inputs = example_inputs(model, batch=2, timestep=torch.tensor([900.0, 150.0]))
    patch(model, SCHEDULE)
    expected = run_unet(model, inputs)
    if graph_break:
        forward = model.mid_block.forward

        def forward_then_break(*args, **kwargs):
            out = forward(*args, **kwargs)
            torch._dynamo.graph_break()
            return out

        model.mid_block.forward = forward_then_break

    torch._dynamo.reset()
    model.mid_block.compile(backend="eager")
    try:
        for _ in range(2):
            torch.testing.assert_close(run_unet(model, inputs), expected, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_a_pre_hook_of_the_users_that_replaces_the_mid_block_input_acts_alike_eager_and_compiled(unet):
    """A forward pre-hook registered on the mid-block after patch that hands it another input: the blend
    uses the input the block ran on, in eager mode as in compiled code (which reads the block's own)."""
    model = copy.deepcopy(unet)
    inputs = example_inputs(model, batch=2, timestep=torch.tensor([900.0, 150.0]))
    halve = model.mid_block.register_forward_pre_hook(lambda block, args: (args[0] * 0.5, *args[1:]))
    expected = reference(model, inputs, SCHEDULE.weight)  # the hand hook blends with the halved input
    halve.remove()
    patch(model, SCHEDULE)
    model.mid_block.register_forward_pre_hook(lambda block, args: (args[0] * 0.5, *args[1:]))
    torch.testing.assert_close(run_unet(model, inputs), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    try:
        compiled = run_unet(torch.compile(model, backend="eager", fullgraph=True), inputs)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_compiled_code_writes_nothing_back_after_its_graph():
    """The hooks add the per-thread record and delete it within the frame, so the compiled code has no
    write to replay after its graph (setting it to None was replayed on every call, through a path that
    raises and clears an AttributeError on a threading.local). Read from the UNet frame's final bytecode."""
    unet = build_unet("tiny-unet2d")
    inputs = example_inputs(unet, batch=2, timestep=torch.tensor([800.0, 100.0]))
    log = _dynamo_log_of_a_compiled_patched(unet, inputs, "bytecode", "torch._dynamo.convert_frame.__bytecode")
    modified = log[log.index("MODIFIED BYTECODE") :]  # must be there, or the test says nothing
    assert "__compiled_fn" in modified
    assert "_CALLS" not in modified, modified  # (the model's own output object is written: not ours)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@gpu
def test_compile_then_patch_then_cuda_graph_capture(unet):
    """torch.compile first, patch after, then capture one step in a CUDA graph and replay it for two
    timesteps written into the same input buffer: each replay equals the eager patched model."""
    model = copy.deepcopy(unet).cuda().half()
    inputs = example_inputs(model, batch=2, timestep=torch.tensor([900.0, 900.0]))
    inputs = {k: v.cuda().half() if v.is_floating_point() and k != "timestep" else v.cuda() for k, v in inputs.items()}
    compiled = torch.compile(model, fullgraph=True)
    run_unet(compiled, inputs)
    patch(model, SCHEDULE)
    static = {k: v.clone() for k, v in inputs.items()}
    for _ in range(2):
        run_unet(compiled, static)  # recompile after patch, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_unet(compiled, static)
    for t in (900.0, 150.0):
        static["timestep"].fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        expected = run_unet(model, dict(inputs, timestep=torch.tensor([t, t], device="cuda")))
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_a_patched_model_of_another_class_called_inside_keeps_the_outer_bypass():
    """A reference network or guidance trick calls a second patched model inside the first one's
    forward: each blends with its own λ (the inner call took the outer's record before, and the
    outer model ran unpatched)."""
    outer, inner = build_unet("tiny-sd"), build_unet("tiny-unet2d")
    x = example_inputs(outer, batch=2, timestep=torch.tensor([900.0, 300.0]))
    xi = example_inputs(inner, batch=2, timestep=torch.tensor([500.0, 500.0]))
    patch(outer, BypassSchedule.constant(0.9))
    patch(inner, BypassSchedule.constant(0.9))
    with torch.no_grad():
        expected = outer(**x).sample
        inner_alone = inner(**xi).sample
        seen = []
        handle = outer.down_blocks[1].register_forward_pre_hook(lambda m, a: seen.append(inner(**xi).sample))
        try:
            got = outer(**x).sample
        finally:
            handle.remove()
    assert torch.equal(got, expected)
    assert torch.equal(seen[0], inner_alone)


def test_attached_classes_keep_the_signature_of_their_base_forward():
    """Hooks that find a block's arguments by name (diffusers' context-parallel plans: "Parameter
    'hidden_states' not found in function signature") read inspect.signature of the forward."""
    import inspect

    import tiny_transformers as tt

    unet, wan = build_unet("tiny-sd"), tt.build("wan")
    modules = [unet.mid_block, unet.time_proj, wan.blocks[0], wan.blocks[1], wan.condition_embedder]
    before = [(inspect.signature(m.forward), inspect.signature(type(m).forward)) for m in modules]
    patch(unet)
    patch(wan, span=(0, 1))
    assert all(type(m).__dict__.get("_bypass_base") for m in modules)  # each has an attached class
    assert [(inspect.signature(m.forward), inspect.signature(type(m).forward)) for m in modules] == before
    unpatch(unet)
    unpatch(wan)
