"""Where things live: the backend table, the package's public names, test-only configs kept in tests/."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import bypass_kernels
from bypass_kernels import backends, ops, presets

ROOT = Path(__file__).resolve().parents[1]


def test_backends_are_one_table_of_records():
    assert backends.NAMES == ("auto", "triton", "cuda", "cpu", "torch")  # the CLI's --backend choices, in order
    assert tuple(backends.BACKENDS) == backends.NAMES[1:]
    for name, record in backends.BACKENDS.items():
        assert record.name == name and record.device_types and callable(record.kernel)
        assert record.why_unavailable(None) == bypass_kernels.info()["backends"][name]["reason"]
    assert backends.NATIVE == ("cpu", "cuda") and ops._NATIVE is backends.NATIVE
    assert backends.BACKENDS["torch"].why_unavailable("mps") is None  # plain torch ops run anywhere
    with pytest.raises(ValueError, match="backend: expected one of"):
        backends._why_unavailable("fast", None)


def test_ops_has_no_branch_on_backend_names():
    source = (ROOT / "bypass_kernels" / "ops.py").read_text()
    assert not re.search(r"""name == ["'](torch|triton|cpu|cuda)["']""", source)


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_each_record_kernel_is_what_runs(monkeypatch, name):
    if backends._why_unavailable(name, "cpu") is not None:
        pytest.skip(f"{name} unavailable here")
    calls = []
    record = backends.BACKENDS[name]

    def spy(*args):
        calls.append(name)
        return record.kernel(*args)

    monkeypatch.setitem(backends.BACKENDS, name, dataclasses.replace(record, kernel=spy))
    m, h, table = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.rand(1000)
    expected = bypass_kernels.blend_reference(m, h, table, torch.tensor([900.0, 10.0]))
    out = bypass_kernels.blend_(m.clone(), h, table, torch.tensor([900.0, 10.0]), backend=name)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The eager native call goes straight to the C++ op (the fast path), not through the record.
    assert calls == ([] if name == "cpu" else ["torch"])


def test_code_names_only_result_files_that_exist():
    for path in [*(ROOT / "bypass_kernels").rglob("*.py"), *(ROOT / "export").rglob("*.py")]:
        for ref in re.findall(r"benchmarks/results/[\w.-]+\.(?:csv|md|png)", path.read_text(encoding="utf-8")):
            assert (ROOT / ref).is_file(), f"{path.relative_to(ROOT)} names {ref}, which does not exist"


def test_export_exposes_only_what_users_call():
    export = pytest.importorskip("bypass_kernels.export")
    assert sorted(export.__all__) == [
        "OnnxRuntimeTransformer",
        "OnnxRuntimeUNet",
        "TensorRTUNet",
        "build_engine",
        "default_profile",
        "to_onnx",
    ]
    for name in ("reference_output", "max_relative_error", "run_onnx", "export_inputs", "onnxruntime_session"):
        assert not hasattr(export, name), name
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for name in re.findall(r"from bypass_kernels\.export import ([\w, ]+)", text):
            for used in name.split(", "):
                assert used in export.__all__, (page.name, used)


def test_tiny_test_models_live_in_tests():
    for name in ("TINY_MODELS", "build_tiny_model", "tiny_model_inputs", "FRAME_DIM", "_TINY_SVD"):
        assert not hasattr(presets, name), name
    assert set(presets.__all__) == {
        "PRESETS",
        "Preset",
        "build_unet",
        "example_inputs",
        "load_unet",
        # the tiny transformers are public (for trying spans offline), built from presets the tests use too
        "TRANSFORMER_PRESETS",
        "build_transformer",
        "transformer_inputs",
    }
    from tiny_models import TINY_MODELS

    assert TINY_MODELS["sd"][1] is presets.PRESETS["tiny-sd"].config
