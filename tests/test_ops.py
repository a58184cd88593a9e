"""The blend op: every backend against the plain-torch reference."""

import pytest
import torch
from conftest import DTYPES, HAS_CUDA, TOL, available_backends, gpu, sample_inputs

import bypass_kernels
from bypass_kernels import blend, blend_, blend_reference
from bypass_kernels.ops import timestep_weights

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
CASES = {
    device: {name: args for name, *args in sample_inputs(device)} for device in DEVICES
}  # built once; tests clone what they mutate


def backend_params():
    for device in DEVICES:
        for backend in available_backends(device):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            yield pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)


def _check_against_reference(backend, m, h, table, t):
    expected = blend_reference(m, h, table, t)
    out = m.clone()
    ptr = out.data_ptr()
    result = blend_(out, h, table, t, backend=backend)
    assert result is out and out.data_ptr() == ptr  # in place, same tensor
    torch.testing.assert_close(out, expected, **TOL[m.dtype])


def test_reference_matches_method_definition():
    """The reference itself, against the documented formula (docs/method.md) written out in Python floats."""
    table = torch.linspace(0, 1, 1000)
    m = torch.randn(3, 2, 2, 2)
    h = torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.5, 2.5, 1e5])
    out = blend_reference(m, h, table, t)
    for b, idx in enumerate([0, 2, 999]):
        lam = float(table[idx])
        torch.testing.assert_close(out[b], m[b] + lam * (h[b] - m[b]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize("case", list(CASES["cpu"]))
def test_backend_matches_reference(device, backend, case):
    m, h, table, t = CASES[device][case]
    _check_against_reference(backend, m, h, table, t)


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_and_other_strides(device, backend, dtype):
    gen = torch.Generator().manual_seed(1)
    table = torch.rand(1000, generator=gen).to(device)
    t = torch.tensor([10.0, 900.0, 999.0], device=device)
    base_m = torch.randn(3, 16, 5, 6, generator=gen).to(device, dtype)
    base_h = torch.randn(3, 16, 5, 6, generator=gen).to(device, dtype)
    layouts = {
        "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
        "transposed_hw": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": lambda x: torch.cat([x, x], dim=3)[..., ::2],
        "batch_inner": lambda x: x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),
    }
    for name, make in layouts.items():
        m, h = make(base_m.clone()), make(base_h.clone())
        expected = blend_reference(m, h, table, t)
        ptr, strides = m.data_ptr(), m.stride()
        blend_(m, h, table, t, backend=backend)
        assert m.data_ptr() == ptr and m.stride() == strides, name
        torch.testing.assert_close(m, expected, **TOL[dtype], msg=name)
    # Mixed layouts: mid_in channels_last, mid_out contiguous.
    m, h = base_m.clone(), base_h.clone().contiguous(memory_format=torch.channels_last)
    expected = blend_reference(m, h, table, t)
    blend_(m, h, table, t, backend=backend)
    torch.testing.assert_close(m, expected, **TOL[dtype])


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lambda_zero_and_one_are_exact(device, backend, dtype):
    table = torch.zeros(1000, device=device)
    table[900:] = 1.0
    m = torch.randn(2, 33, 3, 5).to(device, dtype)
    h = torch.randn(2, 33, 3, 5).to(device, dtype)
    out = m.clone()
    blend_(out, h, table, torch.tensor([100.0, 950.0], device=device), backend=backend)
    assert torch.equal(out[0], m[0])  # λ = 0: the mid-block output, bit for bit
    assert torch.equal(out[1], h[1])  # λ = 1: the mid-block skipped, bit for bit


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_equal_the_reference_bit_for_bit(device, backend, dtype):
    """Every kernel rounds each product and the sum (no FMA contraction) and stores with round to
    nearest even, like the reference, so the results agree in every bit, subnormals included."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates to bfloat16 (a GPU rounds to nearest)")
    gen = torch.Generator().manual_seed(3)
    table = torch.rand(1000, generator=gen).to(device)
    m = (torch.randn(4, 40, 6, 7, generator=gen) * torch.logspace(-40, 3, 7)).to(device, dtype)
    h = torch.randn(4, 40, 6, 7, generator=gen).to(device, dtype)
    t = torch.tensor([999.0, 12.5, 480.3, 13.5], device=device)
    rows = torch.rand(4, 1000, generator=gen).to(device)  # a schedule per sample
    for tab in (table, rows):
        out = blend_(m.clone(), h, tab, t, backend=backend)
        assert torch.equal(out, blend_reference(m, h, tab, t))


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize(
    "t_dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
)
def test_timestep_dtypes(device, backend, t_dtype):
    table = torch.rand(1000, device=device)
    m = torch.randn(2, 8, 4, 4, device=device)
    h = torch.randn(2, 8, 4, 4, device=device)
    t = torch.tensor([250, 3], device=device).to(t_dtype)
    _check_against_reference(backend, m, h, table, t)


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
def test_python_number_timesteps(device, backend):
    table = torch.linspace(0, 1, 1000, device=device)
    m = torch.randn(2, 4, 3, 3, device=device)
    h = torch.randn(2, 4, 3, 3, device=device)
    for t in [0, 1, 500.5, 501.5, 999, 10**6, -2.5]:
        expected = blend_reference(m, h, table, torch.tensor(float(t)))
        out = blend_(m.clone(), h, table, t, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_out_of_place_blend_leaves_input_and_is_differentiable():
    table = bypass_kernels.BypassSchedule.constant(0.25).table()
    m = torch.randn(2, 4, 3, 3, requires_grad=True)
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    before = m.detach().clone()
    out = blend(m, h, table, 10)
    assert torch.equal(m.detach(), before)
    out.sum().backward()
    torch.testing.assert_close(m.grad, torch.full_like(m, 0.75))
    torch.testing.assert_close(h.grad, torch.full_like(h, 0.25))
    with torch.no_grad():
        torch.testing.assert_close(
            blend(m, h, table, 10, backend="cpu" if "cpu" in available_backends("cpu") else "torch"), out
        )


def test_timestep_weights_shape():
    table = torch.arange(10, dtype=torch.float32) / 10
    w = timestep_weights(table, torch.tensor([1.5, 100.0]), 4)
    assert w.shape == (2, 1, 1, 1) and w.flatten().tolist() == [pytest.approx(0.2), pytest.approx(0.9)]


def test_a_table_row_per_sample_matches_the_method_definition():
    """λ_b = table[b, index(t_b)]: the reference against Python floats, and each sample equal to a blend
    of that sample alone with its row as a 1-D table."""
    gen = torch.Generator().manual_seed(3)
    table = torch.rand(4, 1000, generator=gen)
    m, h = torch.randn(4, 3, 2, 2, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)
    t = torch.tensor([0.5, 2.5, 1e5, float("nan")])
    out = blend_reference(m, h, table, t)
    for b, idx in enumerate([0, 2, 999, 0]):
        lam = float(table[b, idx])
        torch.testing.assert_close(out[b], m[b] + lam * (h[b] - m[b]), atol=1e-6, rtol=1e-6)
        assert torch.equal(out[b : b + 1], blend_reference(m[b : b + 1], h[b : b + 1], table[b], t[b]))
    shared = blend_reference(m, h, table[0].expand(4, -1), t)  # equal rows: the 1-D table, bit for bit
    assert torch.equal(shared, blend_reference(m, h, table[0], t))
    assert torch.equal(blend_reference(m, h, table[:1], t), blend_reference(m, h, table[0], t))  # one row


@pytest.mark.parametrize(("device", "backend"), list(backend_params()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_table_row_per_sample_on_every_layout_and_timestep(device, backend, dtype):
    gen = torch.Generator().manual_seed(4)
    table = torch.rand(3, 1000, generator=gen).to(device)
    base_m = torch.randn(3, 16, 5, 6, generator=gen).to(device, dtype)
    base_h = torch.randn(3, 16, 5, 6, generator=gen).to(device, dtype)
    layouts = {
        "contiguous": lambda x: x,
        "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
        "batch_inner": lambda x: x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2),
    }
    timesteps = (torch.tensor(500.0), torch.tensor([10.0, float("nan"), 1e9]), 999)
    for (name, make), t in ((item, t) for item in layouts.items() for t in timesteps):
        for rows in (table, table.t().contiguous().t()):  # and a table whose rows are not contiguous
            m, h = make(base_m.clone()), make(base_h.clone())
            expected = blend_reference(m, h, rows, torch.as_tensor(t, device=device))
            blend_(m, h, rows, t, backend=backend)
            torch.testing.assert_close(m, expected, **TOL[dtype], msg=name)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(h=torch.randn(2, 4, 3, 4)), ValueError, "same shape"),
        (dict(h=torch.randn(2, 4, 3, 3, dtype=torch.float16)), TypeError, "dtype"),
        (dict(table=torch.rand(1000, dtype=torch.float64)), TypeError, "table"),
        (dict(table=torch.rand(10, 100)), ValueError, "rows 1 or the batch"),
        (dict(table=torch.rand(2, 0)), ValueError, "T >= 1"),
        (dict(table=torch.rand(2, 1, 100)), TypeError, "table"),
        (dict(t=torch.tensor([1.0, 2.0, 3.0])), ValueError, "one per sample"),
        (dict(t="999"), TypeError, "timestep"),
        (dict(backend="fast"), ValueError, "backend"),
        (dict(m=[1.0, 2.0]), TypeError, "tensors"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(m=torch.randn(2, 4, 3, 3), h=torch.randn(2, 4, 3, 3), table=torch.rand(1000), t=torch.tensor(5.0))
    args.update(kwargs)
    before = args["m"].clone() if isinstance(args["m"], torch.Tensor) else list(args["m"])
    with pytest.raises(exc, match=match):
        blend_(args["m"], args["h"], args["table"], args["t"], backend=kwargs.get("backend", "auto"))
    assert torch.equal(args["m"], before) if isinstance(before, torch.Tensor) else args["m"] == before


def test_unavailable_backend_says_why():
    with pytest.raises(bypass_kernels.BackendUnavailableError, match="unavailable: "):
        blend_(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), torch.rand(1000), 3, backend="cuda")


def test_info_lists_every_backend_with_a_reason():
    report = bypass_kernels.info()
    assert set(report["backends"]) == {"triton", "cuda", "cpu", "torch"}
    for row in report["backends"].values():
        assert row["available"] or row["reason"]
    assert report["auto"]["cpu"] in ("cpu", "torch")


# --------------------------------------------------------------------- registered ops
def _opcheck_cases(device):
    for name, m, h, table, t in sample_inputs(device, shapes=[(3, 7, 4, 5), (1, 3, 5, 7)]):
        if "fraction" in name or "scalar_int" in name or "per_sample" in name:  # rows_* too
            yield name, m.clone(), h, table, t.to(torch.float32) if t.dtype == torch.float64 else t


@pytest.mark.skipif(not bypass_kernels.backends._native.loaded, reason="native extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_native_op(device):
    if device == "cuda" and not bypass_kernels.backends._native.has_kernel("CUDA"):
        pytest.skip("extension built without CUDA")
    for _, m, h, table, t in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.bypass_kernels.blend_.default, (m, h, table, t))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    if "triton" not in available_backends(device):
        pytest.skip("triton unavailable on " + device)
    op = bypass_kernels.backends.triton_op()
    for _, m, h, table, t in _opcheck_cases(device):
        torch.library.opcheck(op, (m, h, table, t))


@gpu
def test_cuda_backends_do_not_sync():
    table = torch.rand(1000, device="cuda")
    m = torch.randn(2, 1280, 8, 8, device="cuda", dtype=torch.float16)
    h = torch.randn_like(m)
    t = torch.tensor([999, 500], device="cuda")
    for backend in available_backends("cuda"):
        blend_(m, h, table, t, backend=backend)  # warm up (compiles the Triton kernel)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            blend_(m, h, table, t, backend=backend)
            blend_(m, h, table, 999, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_missing_native_extension_never_breaks_import():
    import os
    import subprocess
    import sys

    code = (
        "import torch, bypass_kernels as bk\n"
        "r = bk.info()\n"
        "cpu = r['backends']['cpu']\n"
        "assert not cpu['available'] and 'BYPASS_KERNELS_DISABLE_NATIVE' in cpu['reason']\n"
        "assert r['auto']['cpu'] == 'torch'\n"
        "m, h = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)\n"
        "out = bk.blend_(m.clone(), h, torch.ones(1000), 5)\n"
        "assert torch.equal(out, h)\n"
        "try:\n"
        "    bk.blend_(m, h, torch.ones(1000), 5, backend='cpu')\n"
        "except bk.BackendUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {**os.environ, "BYPASS_KERNELS_DISABLE_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: backend 'cpu' is unavailable: disabled by BYPASS_KERNELS_DISABLE_NATIVE" in out.stdout
