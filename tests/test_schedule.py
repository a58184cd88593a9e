import json
import math

import pytest
import torch

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
        (lambda: BypassSchedule.constant(0.1).weight(float("nan")), ValueError, "timestep"),
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
