import contextlib
import json
import math

import pytest
import torch

# the module-scoped fixture "pipe" (a tiny text-to-image pipeline), for the image-to-image test;
# without transformers test_pipeline skips itself, and only that test here is skipped
with contextlib.suppress(pytest.skip.Exception):
    from test_pipeline import pipe  # noqa: F401

from bypass_kernels import BypassSchedule, default_schedule
from bypass_kernels.schedule import timestep_index


def test_default_is_linear_point_three_from_half():
    s = default_schedule()
    assert s == BypassSchedule.linear(0.3, t_min=500)
    assert s.weight(999) == pytest.approx(0.3)
    assert s.weight(500) == 0.0 and s.weight(100) == 0.0


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine"])
def test_formulas_against_method(shape):
    s = getattr(BypassSchedule, shape)(0.6, t_min=200, t_max=800, num_train_timesteps=1000)
    table = s.table()
    assert table.dtype == torch.float32 and table.shape == (1000,)
    for t in range(1000):
        if t < 200 or t > 800:
            expected = 0.0
        else:
            x = (t - 200) / 600
            expected = {"constant": 0.6, "linear": 0.6 * x, "cosine": 0.6 * (1 - math.cos(math.pi * x)) / 2}[shape]
        assert table[t].item() == pytest.approx(expected, abs=1e-7), t
    assert s.weight(800) == pytest.approx(0.6)


@pytest.mark.parametrize("T", [2, 3, 4, 1000, 1001])
def test_default_schedule_for_every_valid_T(T):
    s = default_schedule(num_train_timesteps=T)
    assert s.weight(T - 1) == pytest.approx(0.3) and s.weight(0) == 0.0 and s.table().shape == (T,)


def test_huge_timesteps_clamp_like_infinity():
    s = BypassSchedule.from_table(torch.linspace(0, 1, 1000))
    assert s.weight(10**400) == s.weight(float("inf")) == 1.0
    assert s.weight(-(10**400)) == s.weight(float("-inf")) == 0.0


def test_t_max_none_means_last_timestep():
    s = BypassSchedule.linear(1.0, num_train_timesteps=50)
    assert s.to_dict()["t_max"] == 49 and s.weight(49) == 1.0 and s.weight(0) == 0.0


@pytest.mark.parametrize(
    ("t", "index"),
    [(0.5, 0), (1.5, 2), (2.5, 2), (998.5, 998), (999.5, 999), (-7, 0), (1e9, 999), (123.4, 123), (123.6, 124)],
)
def test_timestep_index_rounds_half_to_even_and_clamps(t, index):
    assert timestep_index(t, 1000) == index
    assert timestep_index(torch.tensor([t], dtype=torch.float64), 1000) == index


def test_weight_reads_table():
    s = BypassSchedule.from_table(torch.linspace(0, 1, 1000))
    table = s.table()
    for t in [0, 0.5, 1.5, 2.5, 500.49, 998.5, 999.5, 5000, -1]:
        assert s.weight(t) == table[timestep_index(t, 1000)].item()


def test_from_steps_keys_by_sampler_timestep():
    s = BypassSchedule.from_steps([999, 978.6, 957.2], [0.5, 0.25, 0.125])
    assert s.weight(999) == 0.5 and s.weight(978.6) == 0.25 and s.weight(957) == 0.125
    assert s.weight(979) == 0.25  # 978.6 rounds to 979
    assert s.weight(500) == 0.0 and s.table().count_nonzero() == 3


@pytest.mark.parametrize(
    "schedule",
    [
        BypassSchedule.constant(0.1),
        BypassSchedule.linear(0.3, t_min=500),
        BypassSchedule.cosine(1 / 3, t_min=10, t_max=900, num_train_timesteps=1000),
        BypassSchedule.from_table(torch.rand(1000)),
        BypassSchedule.from_steps([999.0, 500.5], [0.2, 0.1]),
        BypassSchedule.linear(0.7, num_train_timesteps=100),
    ],
)
def test_dict_round_trip_is_exact_and_json_safe(schedule):
    text = json.dumps(schedule.to_dict())
    again = BypassSchedule.from_dict(json.loads(text))
    assert again == schedule
    assert torch.equal(again.table(), schedule.table())
    assert repr(again) == repr(schedule)
    assert BypassSchedule.parse(text) == schedule


def test_repr_is_readable():
    assert repr(default_schedule()) == (
        "BypassSchedule.linear(strength=0.3, t_min=500, t_max=999, num_train_timesteps=1000)"
    )
    assert "1000 values" in repr(BypassSchedule.from_table([0.0] * 1000))


def test_table_is_a_copy_on_the_device_asked():
    s = BypassSchedule.constant(0.5)
    t = s.table("cpu")
    t.zero_()
    assert s.weight(10) == 0.5


def test_parse_specs(tmp_path):
    assert BypassSchedule.parse("linear:0.3:500") == BypassSchedule.linear(0.3, t_min=500)
    assert BypassSchedule.parse("cosine:0.2:100:900") == BypassSchedule.cosine(0.2, 100, 900)
    assert BypassSchedule.parse("default") == default_schedule()
    assert BypassSchedule.parse("off").max_strength == 0.0
    path = tmp_path / "s.json"
    path.write_text(json.dumps(BypassSchedule.constant(0.2).to_dict()))
    assert BypassSchedule.parse(str(path)) == BypassSchedule.constant(0.2)
    with pytest.raises(ValueError, match="schedule spec"):
        BypassSchedule.parse("zigzag:0.3")


def test_a_spec_without_its_own_T_takes_the_one_given_in_every_form(tmp_path):
    """A hand-written JSON spec follows the pipeline's num_train_timesteps as the string form does (it
    was built for 1000 and refused on a T = 2000 scheduler); a record that names its T keeps it."""
    record = {"shape": "linear", "strength": 0.3, "t_min": 500}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(record))
    expected = BypassSchedule.linear(0.3, t_min=500, num_train_timesteps=2000)
    for spec in ("linear:0.3:500", record, json.dumps(record), str(path)):
        assert BypassSchedule.parse(spec, num_train_timesteps=2000) == expected, spec
    own = BypassSchedule.linear(0.3, t_min=500).to_dict()
    assert BypassSchedule.parse(own, num_train_timesteps=2000).num_train_timesteps == 1000


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: BypassSchedule.linear(1.5), ValueError, "strength"),
        (lambda: BypassSchedule.linear(-0.1), ValueError, "strength"),
        (lambda: BypassSchedule.linear(float("nan")), ValueError, "strength"),
        (lambda: BypassSchedule.constant(float("inf")), ValueError, "strength"),
        (lambda: BypassSchedule.linear("0.3"), TypeError, "strength"),
        (lambda: BypassSchedule.linear(0.3, t_min=600, t_max=500), ValueError, "t_min"),
        (lambda: BypassSchedule.linear(0.3, t_min=500, t_max=500), ValueError, "t_min"),
        (lambda: BypassSchedule.cosine(0.3, t_min=-1), ValueError, "t_min"),
        (lambda: BypassSchedule.cosine(0.3, t_max=1000), ValueError, "t_max"),
        (lambda: BypassSchedule.constant(0.3, t_min=1.5), ValueError, "t_min"),
        (lambda: BypassSchedule.from_table([0.1] * 999), ValueError, "values"),
        (lambda: BypassSchedule.from_table([0.1] * 999 + [float("nan")]), ValueError, r"values\[999\]"),
        (lambda: BypassSchedule.from_table([0.1] * 999 + [1.1]), ValueError, r"values\[999\]"),
        (lambda: BypassSchedule.from_steps([999, 500], [0.1]), ValueError, "same length"),
        (lambda: BypassSchedule.from_steps([1000], [0.1]), ValueError, "timesteps"),
        (lambda: BypassSchedule.from_steps([999], [2.0]), ValueError, "strengths"),
        (lambda: BypassSchedule.from_steps([10.4, 9.6], [0.1, 0.2]), ValueError, "rounds to index"),
        (lambda: BypassSchedule.linear(0.3, num_train_timesteps=1), ValueError, "num_train_timesteps"),
        (lambda: BypassSchedule.from_dict({"shape": "zigzag"}), ValueError, "shape"),
        # a JSON spec missing a key names the key (was KeyError); a misspelt key is refused
        (lambda: BypassSchedule.from_dict({"strength": 0.1}), ValueError, "missing key 'shape'"),
        (lambda: BypassSchedule.from_dict({"shape": "linear"}), ValueError, "missing key 'strength'"),
        (lambda: BypassSchedule.from_dict({"shape": "table"}), ValueError, "missing key 'values'"),
        (lambda: BypassSchedule.from_dict({"shape": "steps", "timesteps": [9]}), ValueError, "missing key 'strengths'"),
        (lambda: BypassSchedule.parse('{"shape": "cosine"}'), ValueError, "missing key 'strength'"),
        (lambda: BypassSchedule.parse('{"shape": "linear", "strength": 0.1, "t_mn": 5}'), ValueError, "'t_mn'"),
        (lambda: BypassSchedule.from_dict([("shape", "linear")]), TypeError, "mapping"),
        (lambda: BypassSchedule.from_dict({"shape": ["linear"]}), ValueError, "shape"),
        # integers too large for a float name the parameter (was OverflowError)
        (lambda: BypassSchedule.linear(10**400), ValueError, "strength"),
        (lambda: BypassSchedule.linear(0.3, t_min=10**400), ValueError, "t_min"),
        (lambda: BypassSchedule.linear(0.3, t_max=-(10**400)), ValueError, "t_max"),
        (lambda: BypassSchedule.from_steps([10**400], [0.1]), ValueError, r"timesteps\[0\]"),
        (lambda: BypassSchedule.from_steps([9], [10**400]), ValueError, r"strengths\[0\]"),
        (lambda: BypassSchedule.from_table([10**400] * 1000), ValueError, r"values\[0\]"),
        (lambda: BypassSchedule.constant(0.1, num_train_timesteps=10**400), ValueError, "num_train_timesteps"),
        (lambda: BypassSchedule.constant(0.1, num_train_timesteps=2**24 + 1), ValueError, "num_train_timesteps"),
        (lambda: BypassSchedule.parse('{"shape": "linear", "strength": 1' + "0" * 400 + "}"), ValueError, "strength"),
        (lambda: BypassSchedule.parse('{"shape": "linear", "strength": 1' + "0" * 5000 + "}"), ValueError, "JSON"),
        (lambda: BypassSchedule.parse("linear:0.3:1" + "0" * 400), ValueError, "t_min"),
        (lambda: BypassSchedule.parse('{"shape": "linear", "strength": 0.1'), ValueError, "invalid JSON"),
        (lambda: BypassSchedule.parse("no/such/schedule.json"), ValueError, "cannot read"),
        (lambda: BypassSchedule.parse(3), TypeError, "schedule spec"),
        (lambda: BypassSchedule.constant(0.1).weight("5"), TypeError, "timestep"),
        (lambda: BypassSchedule.constant(0.1).weight(None), TypeError, "timestep"),
        (lambda: BypassSchedule.constant(0.1).weight(torch.tensor(True)), TypeError, "timestep"),
        (lambda: BypassSchedule.constant(0.1).weight(torch.zeros(2)), ValueError, "timestep"),
        (lambda: timestep_index(5, 1), ValueError, "num_train_timesteps"),
        (lambda: BypassSchedule.constant(0.1).table(3), TypeError, "device"),
        (lambda: BypassSchedule.constant(0.1).table("bogus"), ValueError, "device"),
    ],
)
def test_bad_arguments_name_the_parameter(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


VALUE_SCHEDULES = [
    BypassSchedule.constant(0.1),
    BypassSchedule.cosine(0.4, t_min=10, t_max=900),
    BypassSchedule.from_table([0.5] * 1000),
    BypassSchedule.from_steps([999.0, 500.5], [0.2, 0.1]),
]


@pytest.mark.parametrize("schedule", VALUE_SCHEDULES, ids=lambda s: s.shape)
def test_to_dict_hands_out_fresh_containers(schedule):
    before, h, table = schedule.to_dict(), hash(schedule), schedule.table()
    d = schedule.to_dict()
    for value in d.values():
        if isinstance(value, list):
            value[0] = 0.75 if not isinstance(value[0], list) else [0.75]
            value.append(0.5)
    d["shape"], d["num_train_timesteps"] = "constant", 7
    assert schedule.to_dict() == before and hash(schedule) == h and torch.equal(schedule.table(), table)
    assert schedule.to_dict() is not schedule.to_dict()


def test_inputs_are_copied():
    timesteps, strengths = [999.0, 500.5], [0.2, 0.1]
    steps = BypassSchedule.from_steps(timesteps, strengths)
    values = torch.full((1000,), 0.5)
    table = BypassSchedule.from_table(values)
    expected_steps, expected_table, h = steps.to_dict(), table.table(), hash(steps)
    timesteps[0], strengths[0] = 3.0, 0.9
    timesteps.append(1.0)
    values.fill_(0.0)
    assert steps.to_dict() == expected_steps and hash(steps) == h and steps.weight(999) == pytest.approx(0.2)
    assert torch.equal(table.table(), expected_table)


def test_a_schedule_cannot_be_changed_after_construction():
    s = BypassSchedule.from_steps([999.0, 500.5], [0.2, 0.1])
    before = s.to_dict()
    for name in ("_params", "_table", "_shape", "_T", "anything"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(s, name, None)
        with pytest.raises(AttributeError, match="immutable"):
            delattr(s, name)
    assert s.to_dict() == before


@pytest.mark.parametrize("schedule", VALUE_SCHEDULES, ids=lambda s: s.shape)
def test_pickle_and_copy_give_equal_values(schedule):
    import copy
    import pickle

    for again in (pickle.loads(pickle.dumps(schedule)), copy.deepcopy(schedule), copy.copy(schedule)):
        assert again == schedule and hash(again) == hash(schedule)
        assert torch.equal(again.table(), schedule.table())


# ------------------------------------------------------------------ for_scheduler


def _ramp(shape, strength, start, end, p):
    """The documented formulas, written out independently of the package."""
    if not start <= p < end:
        return 0.0
    if shape == "constant":
        return strength
    if shape == "linear":
        return strength * (end - p) / (end - start)
    return strength * (1 + math.cos(math.pi * (p - start) / (end - start))) / 2


def _schedulers():
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
    )

    return {
        "ddim": lambda: DDIMScheduler(num_train_timesteps=1000),
        "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000),
        "euler-karras": lambda: EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True),
        "dpm++-karras": lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True),
        "heun": lambda: HeunDiscreteScheduler(num_train_timesteps=1000),
        "kdpm2": lambda: KDPM2DiscreteScheduler(num_train_timesteps=1000),
    }


def _nearest(values: dict, T=1000):
    """The per-step table rule written out plainly: each index takes the value of the nearest given
    index (a tie: the lower one), up to half a gap beyond the outermost given indices; 0 further out."""
    keys = sorted(values)
    if len(keys) == 1:
        return [values[keys[0]] if j == keys[0] else 0.0 for j in range(T)]
    lo = keys[0] - (keys[1] - keys[0]) // 2
    hi = keys[-1] + (keys[-1] - keys[-2]) // 2
    out = []
    for j in range(T):
        if not lo <= j <= hi:
            out.append(0.0)
            continue
        best = min(keys, key=lambda k: (abs(k - j), k))
        out.append(values[best])
    return out


def _table_of(timesteps, strengths, T=1000):
    """{index: λ} for visited timesteps, the last call on an index winning."""
    values = {}
    for t, lam in zip(timesteps, strengths, strict=True):
        values[timestep_index(min(max(float(t), 0.0), T - 1.0), T)] = float(torch.tensor(lam, dtype=torch.float32))
    return values


def _visited(scheduler, n):
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(n)
    return fresh.timesteps.to(torch.float32)


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.2, 0.7), (0.0, 0.35)])
def test_for_scheduler_formulas_on_ddim(shape, start, end):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    s = BypassSchedule.for_scheduler(scheduler, 10, 0.6, start=start, end=end, shape=shape)
    timesteps = _visited(scheduler, 10)
    assert timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    for i, t in enumerate(timesteps):
        assert s.weight(t) == pytest.approx(_ramp(shape, 0.6, start, end, i / 10), abs=1e-7), i
    lams = [_ramp(shape, 0.6, start, end, i / 10) for i in range(10)]
    assert s.table().tolist() == _nearest(_table_of(timesteps, lams))  # between visited timesteps: the nearest
    assert s.max_strength == pytest.approx(0.6) if start in (0.0, 0.2) else True
    if shape == "linear":  # fading from strength at start
        assert s.weight(timesteps[round(start * 10)]) == pytest.approx(0.6)


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-karras", "dpm++-karras", "heun", "kdpm2"])
def test_for_scheduler_leaves_the_scheduler_as_it_was(name):
    scheduler = _schedulers()[name]()
    initial = (scheduler.num_inference_steps, scheduler.timesteps.clone())  # None unless __init__ sets them
    untouched = BypassSchedule.for_scheduler(scheduler, 12, 0.5, end=0.5)
    assert scheduler.num_inference_steps == initial[0] and torch.equal(scheduler.timesteps, initial[1])

    scheduler.set_timesteps(7)
    t0 = scheduler.timesteps[0]
    sample = torch.zeros(1, 4, 4, 4)
    scheduler.step(torch.zeros_like(sample), t0, scheduler.scale_model_input(sample, t0) * 0 + sample)
    state = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v)
        for k, v in vars(scheduler).items()
        if k in ("timesteps", "sigmas", "_step_index", "_begin_index", "num_inference_steps", "alphas_cumprod")
    }
    assert "timesteps" in state and "num_inference_steps" in state
    config = dict(scheduler.config)
    s = BypassSchedule.for_scheduler(scheduler, 12, 0.5, end=0.5)
    for k, v in state.items():
        now = getattr(scheduler, k)
        assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k
    assert dict(scheduler.config) == config
    assert s == untouched  # read from the scheduler's config and step count, not its current state
    assert s.to_dict()["timesteps"] == _visited(scheduler, 12).tolist()


@pytest.mark.parametrize("name", ["euler", "euler-karras"])
def test_for_scheduler_fractional_timesteps(name):
    scheduler = _schedulers()[name]()
    n = 7
    s = BypassSchedule.for_scheduler(scheduler, n, 0.8, start=0.0, end=0.9, shape="cosine")
    timesteps = _visited(scheduler, n)
    assert any(not float(t).is_integer() for t in timesteps)  # e.g. 832.5 (a tie) or 936.92
    table = s.table()
    for i, t in enumerate(timesteps):
        index = timestep_index(t, 1000)  # what every backend reads: round half to even in float32
        assert table[index].item() == pytest.approx(_ramp("cosine", 0.8, 0.0, 0.9, i / n), abs=1e-7)
        assert s.weight(t) == table[index].item()
    lams = [_ramp("cosine", 0.8, 0.0, 0.9, i / n) for i in range(n)]
    assert table.tolist() == _nearest(_table_of(timesteps, lams))


def test_for_scheduler_euler_ties_round_half_to_even():
    from diffusers import EulerDiscreteScheduler

    s = BypassSchedule.for_scheduler(EulerDiscreteScheduler(), 7, 0.5, shape="linear")
    timesteps = s.to_dict()["timesteps"]
    assert 832.5 in timesteps and 166.5 in timesteps
    assert timestep_index(832.5, 1000) == 832 and timestep_index(166.5, 1000) == 166  # half to even
    assert s.weight(832.5) == s.weight(832) == pytest.approx(0.5 * 6 / 7)  # step 1 of 7 sits at index 832
    assert s.weight(166.5) == s.weight(166) == pytest.approx(0.5 * 2 / 7)  # step 5 at index 166


def test_for_scheduler_karras_repeated_timestep_takes_the_least_noisy_steps_lambda():
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    s = BypassSchedule.for_scheduler(scheduler, 100, 0.5)
    timesteps = _visited(scheduler, 100).tolist()
    repeated = [i for i in range(1, 100) if timesteps[i] == timesteps[i - 1]]
    assert repeated == [98] and timesteps[97] == timesteps[98] == 1.0  # steps 97 and 98 both at t = 1
    assert s.weight(1) == pytest.approx(0.5 * (1 - 98 / 100))  # the later, less noisy step's λ
    assert s.weight(1) != pytest.approx(0.5 * (1 - 97 / 100))


def test_for_scheduler_second_order_shared_timestep_is_the_later_steps_start():
    from diffusers import HeunDiscreteScheduler

    # Heun, 5 steps: calls at 999 | 749.25 749.25 | 499.5 499.5 | 249.75 249.75 | 0 0; the corrector of
    # step i runs at the timestep where step i+1 starts, so that entry takes step i+1's λ
    s = BypassSchedule.for_scheduler(HeunDiscreteScheduler(), 5, 0.5, start=0.2, end=0.6, shape="constant")
    assert s.to_dict()["timesteps"] == [999.0, 749.25, 749.25, 499.5, 499.5, 249.75, 249.75, 0.0, 0.0]
    assert [s.weight(t) for t in (999, 749.25, 499.5, 249.75, 0)] == [0.0, 0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("name", ["ddim", "euler", "euler-karras", "dpm++-karras", "heun", "kdpm2"])
@pytest.mark.parametrize("n", [9, 25])
def test_for_scheduler_each_step_starts_at_its_own_lambda(name, n):
    """The rule as a property: the timestep at which step i starts gets exactly λ(i/N), unless a
    later step starts at the same table index; every call reads a λ of its own step or the next."""
    scheduler = _schedulers()[name]()
    s = BypassSchedule.for_scheduler(scheduler, n, 0.7, start=0.1, end=0.8)
    timesteps = _visited(scheduler, n)
    calls = len(timesteps)
    first_call = {}
    for k in range(calls):
        first_call.setdefault(k * n // calls, k)
    assert sorted(first_call) == list(range(n))
    start_index = {i: timestep_index(timesteps[k], 1000) for i, k in first_call.items()}
    for i, k in first_call.items():
        if all(start_index[j] != start_index[i] for j in range(i + 1, n)):
            assert s.weight(timesteps[k]) == pytest.approx(_ramp("linear", 0.7, 0.1, 0.8, i / n), abs=1e-7)
    for k in range(calls):
        i = k * n // calls
        options = [_ramp("linear", 0.7, 0.1, 0.8, j / n) for j in range(i, n)]
        assert any(s.weight(timesteps[k]) == pytest.approx(v, abs=1e-7) for v in options)


def test_for_scheduler_timesteps_past_the_table_read_its_end():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = BypassSchedule.for_scheduler(FlowMatchEulerDiscreteScheduler(), 4, 0.5, shape="constant")
    assert s.to_dict()["timesteps"][0] == 1000.0  # = T: the kernels clamp it to index T - 1
    assert s.weight(1000.0) == s.weight(999) == 0.5
    assert s.to_dict()["timesteps"] == [1000.0, 667.0, 334.0, 1.0]
    assert s.table().tolist() == _nearest({999: 0.5, 667: 0.5, 334: 0.5, 1: 0.5})


def test_for_scheduler_names_the_argument_when_the_scheduler_itself_fails():
    from diffusers import UnCLIPScheduler

    with pytest.raises(ValueError, match=r"num_inference_steps: UnCLIPScheduler.set_timesteps\(1\) failed"):
        BypassSchedule.for_scheduler(UnCLIPScheduler(), 1, 0.3)  # diffusers' own ZeroDivisionError


def test_for_scheduler_serialises_and_parses():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    karras = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    made = [
        BypassSchedule.for_scheduler(DDIMScheduler(), 20, 0.3, end=0.4),
        BypassSchedule.for_scheduler(EulerDiscreteScheduler(use_karras_sigmas=True), 13, 1 / 3, shape="cosine"),
        BypassSchedule.for_scheduler(karras, 100, 0.2, start=0.1, end=0.9, shape="constant"),
    ]
    for schedule in made:
        text = json.dumps(schedule.to_dict())
        again = BypassSchedule.from_dict(json.loads(text))
        assert again == schedule and hash(again) == hash(schedule) and repr(again) == repr(schedule)
        assert torch.equal(again.table(), schedule.table())
        assert BypassSchedule.parse(text) == schedule
    # the short CLI form and a hand-written record resolve the timesteps themselves
    assert BypassSchedule.parse("for_scheduler:DDIMScheduler:20:0.3:0:0.4") == made[0]
    record = {
        "shape": "for_scheduler",
        "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
        "num_inference_steps": 100,
        "strength": 0.2,
        "start": 0.1,
        "end": 0.9,
        "ramp": "constant",
    }
    assert BypassSchedule.parse(json.dumps(record)) == made[2]
    assert BypassSchedule.parse("for_scheduler:DDIMScheduler:4:0.5").to_dict() == {
        "shape": "for_scheduler",
        "num_train_timesteps": 1000,
        "scheduler": "DDIMScheduler",
        "num_inference_steps": 4,
        "strength": 0.5,
        "start": 0.0,
        "end": 1.0,
        "ramp": "linear",
        "timesteps": [750.0, 500.0, 250.0, 0.0],
    }
    # the stored timesteps are authoritative: a record with other timesteps is another schedule
    moved = {**made[0].to_dict(), "timesteps": [t - 10 for t in made[0].to_dict()["timesteps"]]}
    assert BypassSchedule.from_dict(moved).weight(940) == made[0].weight(950) > 0
    assert not torch.equal(BypassSchedule.from_dict(moved).table(), made[0].table())


def test_for_scheduler_is_a_value_too():
    from diffusers import DDIMScheduler

    s = BypassSchedule.for_scheduler(DDIMScheduler(), 10, 0.5)
    before, h = s.to_dict(), hash(s)
    s.to_dict()["timesteps"].append(3.0)
    s.to_dict()["timesteps"][0] = 1.0
    assert s.to_dict() == before and hash(s) == h


def _bad_for_scheduler(**overrides):
    from diffusers import DDIMScheduler

    kwargs = dict(scheduler=DDIMScheduler(), num_inference_steps=10, strength=0.3)
    kwargs.update(overrides)
    return BypassSchedule.for_scheduler(kwargs.pop("scheduler"), kwargs.pop("num_inference_steps"), **kwargs)


def _bad_record(**overrides):
    record = {"shape": "for_scheduler", "scheduler": "DDIMScheduler", "num_inference_steps": 10, "strength": 0.3}
    record.update(overrides)
    return BypassSchedule.from_dict({k: v for k, v in record.items() if v is not ...})


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: _bad_for_scheduler(scheduler=None), TypeError, "scheduler"),
        (lambda: _bad_for_scheduler(scheduler=type(_schedulers()["ddim"]())), TypeError, "scheduler"),
        (lambda: _bad_for_scheduler(scheduler=object()), TypeError, "scheduler"),
        (lambda: _bad_for_scheduler(num_inference_steps=0), ValueError, "num_inference_steps"),
        (lambda: _bad_for_scheduler(num_inference_steps=-3), ValueError, "num_inference_steps"),
        (lambda: _bad_for_scheduler(num_inference_steps=2.0), TypeError, "num_inference_steps"),
        (lambda: _bad_for_scheduler(num_inference_steps=True), TypeError, "num_inference_steps"),
        (lambda: _bad_for_scheduler(num_inference_steps=1001), ValueError, "num_inference_steps"),
        (lambda: _bad_for_scheduler(strength=1.5), ValueError, "strength"),
        (lambda: _bad_for_scheduler(strength="0.3"), TypeError, "strength"),
        (lambda: _bad_for_scheduler(start=-0.1), ValueError, "start"),
        (lambda: _bad_for_scheduler(end=1.5), ValueError, "end"),
        (lambda: _bad_for_scheduler(end=float("nan")), ValueError, "end"),
        (lambda: _bad_for_scheduler(start="0"), TypeError, "start"),
        (lambda: _bad_for_scheduler(start=0.5, end=0.5), ValueError, "start must be below end"),
        (lambda: _bad_for_scheduler(end=10**400), ValueError, "end"),
        (lambda: _bad_for_scheduler(shape="zigzag"), ValueError, "shape"),
        (lambda: _bad_for_scheduler(shape="table"), ValueError, "shape"),
        (lambda: _bad_for_scheduler(shape=None), TypeError, "shape"),
        (lambda: _bad_record(scheduler=...), ValueError, "missing key 'scheduler'"),
        (lambda: _bad_record(num_inference_steps=...), ValueError, "missing key 'num_inference_steps'"),
        (lambda: _bad_record(scheduler="StableDiffusionPipeline"), ValueError, "scheduler"),
        (lambda: _bad_record(scheduler="os.system"), ValueError, "scheduler"),
        (lambda: _bad_record(scheduler={"use_karras_sigmas": True}), ValueError, "_class_name"),
        (lambda: _bad_record(scheduler=3), TypeError, "scheduler"),
        (lambda: _bad_record(scheduler=3, timesteps=[1.0]), TypeError, "scheduler"),
        (lambda: _bad_record(ramp="zigzag"), ValueError, "ramp"),
        (
            lambda: _bad_record(
                num_train_timesteps=500, scheduler={"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
            ),
            ValueError,
            "num_train_timesteps",
        ),
        (lambda: _bad_record(timesteps=[]), ValueError, "timesteps"),
        (lambda: _bad_record(timesteps=[float("inf")]), ValueError, r"timesteps\[0\]"),
        (lambda: _bad_record(timesteps="900"), TypeError, "timesteps"),
        (lambda: BypassSchedule.parse("for_scheduler:DDIMScheduler:10"), ValueError, "for_scheduler:SCHEDULER"),
        (lambda: BypassSchedule.parse("for_scheduler:DDIMScheduler:ten:0.3"), ValueError, "STEPS"),
        (lambda: BypassSchedule.parse("for_scheduler:DDIMScheduler:10:high"), ValueError, "STRENGTH"),
        (lambda: BypassSchedule.parse("for_scheduler:Nope:10:0.3"), ValueError, "scheduler"),
    ],
)
def test_for_scheduler_bad_arguments_name_the_parameter(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_for_scheduler_image_to_image_gets_the_lambda_of_the_timesteps_it_visits(request):
    """A real img2img run (Euler: fractional timesteps) at strength 0.6 starts part way down the
    schedule: it visits the tail of the 5 timesteps and each UNet call gets the λ of its step in
    the full schedule."""
    import numpy as np
    from conftest import hand_hook
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    import bypass_kernels

    pytest.importorskip("transformers")
    sd = request.getfixturevalue("pipe")  # test_pipeline's tiny text-to-image pipeline
    n = 5
    scheduler = EulerDiscreteScheduler.from_config(sd.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline(**{**sd.components, "scheduler": scheduler})
    img2img.set_progress_bar_config(disable=True)
    schedule = BypassSchedule.for_scheduler(scheduler, n, 0.8, end=0.7)
    full = _visited(scheduler, n).tolist()
    expected = {t: _ramp("linear", 0.8, 0.0, 0.7, i / n) for i, t in enumerate(full)}
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))

    def run():
        out = img2img(
            "a red square",
            image=image,
            strength=0.6,
            num_inference_steps=n,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return out.images

    seen = []
    record = sd.unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1])))
    try:
        plain = run()
    finally:
        record.remove()
    assert seen == full[2:] and any(not t.is_integer() for t in seen)  # strength 0.6 of 5 steps: the last 3
    lambdas = [expected[t] for t in seen]  # progress 0.4, 0.6 (inside [0, 0.7)) and 0.8 (outside)
    assert lambdas[0] > lambdas[1] > 0 and lambdas[2] == 0
    assert [schedule.weight(t) for t in seen] == pytest.approx(lambdas, abs=1e-7)

    handles = hand_hook(sd.unet, lambda t: expected[t])
    try:
        reference = run()
    finally:
        for h in handles:
            h.remove()
    with bypass_kernels.patched(img2img, schedule):
        got = run()
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3
