"""The blend op at its edges: aliasing, NaN timesteps, timestep shapes, size-1 strides, and a fuzz
test over shapes, strides, dtypes, timesteps and tables for every backend against the reference."""

import pytest
import torch
from conftest import DTYPES, TOL, available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bypass_kernels import blend_, blend_reference
from bypass_kernels.torch_blend import flat_layout_ok as _flat_layout_ok

BACKENDS = available_backends("cpu")
TABLE = torch.rand(1000, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mid_in_is_mid_out_is_the_identity(backend, dtype):
    x = torch.randn(2, 5, 3, 3).to(dtype)
    before = x.clone()
    assert blend_(x, x, TABLE, torch.tensor([999.0, 3.0]), backend=backend) is x
    assert torch.equal(x, before)
    view = x[:]  # another view of the very same memory and strides
    blend_(x, view, TABLE, 500, backend=backend)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_overlap_is_refused_like_torch_in_place_ops(backend):
    base = torch.randn(3, 4, 4, 4)
    before = base.clone()
    with pytest.raises(ValueError, match="overlap"):
        blend_(base[1:], base[:2], TABLE, 500, backend=backend)
    assert torch.equal(base, before)
    with pytest.raises(RuntimeError):  # what torch itself does with the same views
        base[1:].lerp_(base[:2], 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_timesteps_read_index_zero(backend):
    m, h = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([float("nan"), 700.0, float("inf")])
    expected = blend_reference(m, h, TABLE, torch.tensor([0.0, 700.0, 999.0]))
    out = m.clone()
    blend_(out, h, TABLE, t, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(blend_reference(m, h, TABLE, t), expected, atol=0, rtol=0)


def test_nan_timesteps_compiled_read_index_zero():
    m, h = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([float("nan"), 250.0])
    compiled = torch.compile(lambda a, b, c: blend_(a.clone(), b, TABLE, c), fullgraph=True)
    expected = blend_reference(m, h, TABLE, torch.tensor([0.0, 250.0]))
    torch.testing.assert_close(compiled(m, h, t), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [torch.zeros(2, 2), torch.zeros(4, 1), torch.zeros(1, 1, 4)])
def test_timestep_with_more_than_one_dimension_is_refused(backend, t):
    with pytest.raises(ValueError, match="0-d or 1-D"):
        blend_(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), TABLE, t, backend=backend)


def test_strides_that_differ_only_in_size_one_dimensions_take_the_flat_path():
    m = torch.randn(1, 512, 32, 32)
    h = torch.randn(512, 1, 32, 32).permute(1, 0, 2, 3)  # same memory order, another stride for the batch
    assert m.stride() != h.stride()
    assert _flat_layout_ok(m, h, per_sample=False)
    for backend in BACKENDS:
        out = m.clone()
        blend_(out, h, TABLE, 700, backend=backend)
        torch.testing.assert_close(out, blend_reference(m, h, TABLE, torch.tensor(700)), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------- fuzz
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        big = torch.zeros(x.shape[0], x.shape[1] * 2, *x.shape[2:], dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    return x


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 9),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    layout_out=st.sampled_from(LAYOUTS),
    layout_in=st.sampled_from(LAYOUTS),
    per_sample=st.booleans(),
    timesteps=st.lists(
        st.one_of(
            st.floats(-50, 1100, allow_nan=False, width=32),
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 998.5]),
        ),
        min_size=4,
        max_size=4,
    ),
    t_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.int64]),
    T=st.integers(2, 1000),
    seed=st.integers(0, 2**16),
)
def test_fuzz_every_backend_against_the_reference(
    batch, channels, height, width, dtype, layout_out, layout_in, per_sample, timesteps, t_dtype, T, seed
):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    m = _layout(torch.randn(shape, generator=gen).to(dtype), layout_out)
    h = _layout(torch.randn(shape, generator=gen).to(dtype), layout_in)
    table = torch.rand(T, generator=gen)
    values = torch.tensor(timesteps[:batch] if per_sample else timesteps[:1], dtype=torch.float64)
    if not t_dtype.is_floating_point:
        values = torch.nan_to_num(values, nan=0.0, posinf=2000.0, neginf=-5.0).round()
    t = values.to(t_dtype)
    expected = blend_reference(m, h, table, t)
    for backend in BACKENDS:
        out = m.clone() if layout_out != "sliced" else _layout(m.clone().contiguous(), "sliced")
        blend_(out, h, table, t, backend=backend)
        torch.testing.assert_close(out, expected, **TOL[dtype], msg=lambda msg, b=backend: f"{b}: {msg}")


def test_auto_prefers_the_cuda_kernel_then_triton_on_cuda(monkeypatch):
    # The order only (no GPU here): the H200 plain-launch rows made the C++ kernel the eager choice.
    from bypass_kernels import backends

    monkeypatch.setattr(backends, "_triton_interpret", lambda: False)
    monkeypatch.setattr(backends, "_why_unavailable", lambda name, device_type: None)
    assert backends._first_available("cuda") == "cuda"
    monkeypatch.setattr(backends, "_why_unavailable", lambda name, device_type: "no" if name == "cuda" else None)
    assert backends._first_available("cuda") == "triton"


def test_schedule_weight_follows_the_nan_rule():
    from bypass_kernels import BypassSchedule

    schedule = BypassSchedule.from_table(TABLE.tolist())
    assert schedule.weight(float("nan")) == schedule.weight(0) == TABLE[0].item()
    assert schedule.weight(torch.tensor(float("nan"))) == TABLE[0].item()
