"""The CPU kernel's two code paths (csrc/cpu/blend_cpu.cpp): the build adds no ISA flags, the AVX2 + F16C
path is chosen at run time where the CPU has both, BYPASS_KERNELS_CPU_ISA=generic forces the portable path,
and the two paths give bit-identical results."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bypass_kernels
from bypass_kernels import _native

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _native.loaded, reason="native extension not built")
X86 = platform.machine() in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")


@pytest.fixture
def isa():
    """Switch the path for one test; back to the process's choice afterwards."""
    from bypass_kernels import _C

    before = _C.cpu_isa()
    yield _C.set_cpu_isa
    _C.set_cpu_isa("generic" if before == "generic" else "auto")
    assert _C.cpu_isa() == before


def test_the_kernel_uses_the_path_this_cpu_supports():
    from bypass_kernels import _C

    has = X86 and {"avx2", "f16c"} <= _cpu_flags()
    assert _C.cpu_supports_avx2() == has
    forced = os.environ.get("BYPASS_KERNELS_CPU_ISA") == "generic"
    assert _C.cpu_isa() == ("avx2" if has and not forced else "generic")
    assert bypass_kernels.info()["native_extension"]["cpu_isa"] == _C.cpu_isa()


def test_the_environment_variable_forces_the_portable_path():
    code = "import bypass_kernels as bk; print(bk.info()['native_extension']['cpu_isa'])"
    for value, expected in (("generic", "generic"), ("no-such-isa", None)):
        env = {**os.environ, "BYPASS_KERNELS_CPU_ISA": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if expected is None:  # an unknown value never breaks the import: it is auto
            from bypass_kernels import _C

            expected = "avx2" if _C.cpu_supports_avx2() else "generic"
        assert out.stdout.strip() == expected, value


def test_switching_checks_its_argument(isa):
    from bypass_kernels import _C

    with pytest.raises(ValueError, match="expected auto, generic or avx2"):
        isa("sse9")
    assert isa("generic") == "generic" == _C.cpu_isa()
    if not _C.cpu_supports_avx2():
        with pytest.raises(ValueError, match="no AVX2"):
            isa("avx2")


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    return torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.max, -info.max, info.tiny, info.tiny / 4, 1e-3],
        dtype=torch.float32,
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_both_paths_are_bit_identical(isa, dtype):
    from bypass_kernels import _C

    if not _C.cpu_supports_avx2():
        pytest.skip("this CPU has no AVX2 + F16C: only the generic path runs here")
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(1000, generator=gen)
    table[7] = 1.0
    table[8] = 0.0
    cases = []
    for shape in [(2, 37, 5, 3), (3, 1280, 8, 8), (1, 8), (4, 1), (2, 4099)]:  # tails and whole vectors
        m = (torch.randn(shape, generator=gen) * 100).to(dtype)
        h = (torch.randn(shape, generator=gen) * 100).to(dtype)
        flat_m, flat_h = m.view(-1), h.view(-1)
        special = _special_values(dtype)
        k = min(flat_m.numel(), special.numel())
        flat_m[:k] = special[:k]
        flat_h[:k] = special.flip(0)[:k]
        for t in (
            torch.tensor(500.0),
            torch.tensor([7.0] * shape[0]),
            torch.tensor([8.0, 999.6, 3.5, 0.2][: shape[0]]),
        ):
            cases.append((m, h, t))
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    results = {}
    for path in ("generic", "avx2"):
        assert isa(path) == path
        results[path] = []
        for m, h, t in cases:
            out = m.clone()
            bypass_kernels.blend_(out, h, table, t, backend="cpu")
            results[path].append(out)
    for (m, h, t), a, b in zip(cases, results["generic"], results["avx2"], strict=True):
        assert torch.equal(a.view(bits), b.view(bits)), (tuple(m.shape), t.tolist())
        reference = bypass_kernels.blend_reference(m, h, table, t)
        torch.testing.assert_close(a, reference, rtol=0, atol=0, equal_nan=True)


def test_the_build_adds_no_isa_flags():
    source = (ROOT / "setup.py").read_text()
    flags = re.findall(r"""["'](-m(?:avx|f16c|fma|arch)[^"']*)["']""", source)  # in string literals: compile flags
    assert not flags, flags


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
def test_only_the_avx2_functions_hold_avx_code():
    """No VEX-encoded (AVX, AVX2, F16C: mnemonics v...) or 256-bit instruction outside the functions of the
    AVX2 path: the rest of the extension runs on any x86-64 CPU. (The build with -mavx2 had them in 46.)"""
    from bypass_kernels import _C

    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True, timeout=300
    ).stdout
    instruction = re.compile(r"^\s*[0-9a-f]+:\s+(\S+)")
    offenders, function = set(), ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
            continue
        match = instruction.match(line)
        avx = match is not None and (match.group(1).startswith("v") or "%ymm" in line or "%zmm" in line)
        if avx and not any(name in function for name in ("blend_span_avx2", "load8", "store8")):
            offenders.add(function)
    assert not offenders, sorted(offenders)[:10]
