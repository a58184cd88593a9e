"""Install: the shipped models are declared package data; the Makefile installs numpy with torch and says
what each long step does."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _clean_source(tmp_path) -> Path:
    """The files a source distribution is made from, with no build products (a fresh clone's)."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "build", "*.egg-info")
    for name in ("bypass_kernels", "export", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    return source


def _build(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a clean copy of the sources, building no native code; it must succeed."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=_clean_source(tmp_path),
        env={**os.environ, "BYPASS_KERNELS_SKIP_NATIVE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_wheel_holds_the_shipped_models_without_setuptools_warnings(tmp_path):
    pytest.importorskip("setuptools")
    out = _build(tmp_path, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), ".")
    assert "absent from the `packages` configuration" not in out.stdout + out.stderr
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("shapes16", "digits8"):
        for path in (ROOT / "bypass_kernels" / "data" / model).iterdir():
            assert f"bypass_kernels/data/{model}/{path.name}" in names
    assert "bypass_kernels/export/__init__.py" in names
    for model_file in ("onnx_model.py", "pipeline_model.py"):  # what a Triton model repository gets
        assert f"bypass_kernels/export/triton_models/{model_file}" in names


def test_source_distribution_holds_every_kernel_source_whatever_the_machine_builds(tmp_path):
    """An sdist made where no kernel builds still carries the C++ and CUDA sources and headers, so a
    machine with nvcc that installs it builds them (setuptools adds only the configured extension's)."""
    pytest.importorskip("setuptools")
    import tarfile

    _build(tmp_path, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"))
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sorted(sources - names)


def _install_recipe() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("$(STAMP): $(SOURCES)\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in recipe.splitlines()]


def test_numpy_is_installed_with_torch_before_the_extension_builds():
    lines = _install_recipe()
    (torch_step,) = (i for i, line in enumerate(lines) if "$(TORCH_SPEC)" in line and "pip install" in line)
    (build_step,) = (i for i, line in enumerate(lines) if "pip install" in line and "-e " in line)
    assert re.search(r"\bnumpy\b", lines[torch_step]) and torch_step < build_step


def test_make_says_what_each_long_step_does():
    lines = _install_recipe()
    for i, line in enumerate(lines):
        if "pip install" in line:
            assert " -q" not in line, line  # pip's own progress shows
            assert lines[i - 1].startswith("@echo"), line  # and a line before it says what comes
    (build_note,) = (line for line in lines if line.startswith("@echo") and "extension" in line)
    assert "few minutes" in build_note


def test_a_cuda_kernel_that_cannot_build_leaves_the_cpu_kernel_and_says_why(tmp_path):
    """A CUDA toolkit whose build fails (here: nvcc with a CPU build of torch, whose CUDA headers and
    libraries are absent) used to drop the whole extension, CPU kernel included, with pip saying
    "Successfully built". The extension is built again without CUDA, the build ends with what failed
    and the way out, and info() gives the reason."""
    from torch.utils import cpp_extension

    if cpp_extension._find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    if torch_cuda_build():
        pytest.skip("a CUDA build of torch: the CUDA kernel would build")
    source = _clean_source(tmp_path)
    env = {**os.environ, "BYPASS_KERNELS_FORCE_CUDA": "1", "MAX_JOBS": "2"}
    env.pop("BYPASS_KERNELS_REQUIRE_NATIVE", None)
    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "w"),
            ".",
        ],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    printed = wheel.stdout + wheel.stderr  # pip -v shows the build's output
    assert "bypass_kernels: built the CPU kernel" in printed
    assert "the CUDA kernel failed to build" in printed and "BYPASS_KERNELS_SKIP_CUDA=1" in printed
    (path,) = (tmp_path / "w").glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        assert any(re.fullmatch(r"bypass_kernels/_C\..*\.so", n) for n in archive.namelist())
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(path)],
        check=True,
        timeout=300,
    )
    probe = "import json, bypass_kernels; print(json.dumps(bypass_kernels.info()['backends']))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    backends = json.loads(out.stdout.strip().splitlines()[-1])
    assert backends["cpu"]["available"] and "the CUDA kernel failed to build" in backends["cuda"]["reason"]


def torch_cuda_build() -> bool:
    import torch

    return torch.version.cuda is not None
