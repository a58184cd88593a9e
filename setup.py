"""Build of the native extension ``bypass_kernels._C``.

Everything else about the package lives in pyproject.toml. The extension is optional: import never
needs it, ``bypass_kernels.info()`` says why it is missing, and the ``auto`` backend falls back.

Environment switches:
  BYPASS_KERNELS_SKIP_NATIVE=1   build no native code at all
  BYPASS_KERNELS_SKIP_CUDA=1     build the CPU kernel only, even where nvcc and a CUDA torch exist
  BYPASS_KERNELS_REQUIRE_NATIVE=1  fail the install if the extension does not build
  BYPASS_KERNELS_FORCE_CUDA=1    try the CUDA kernel wherever nvcc is found, even with a CPU build of torch
                                 (where it cannot link: a test of the fallback below)
  TORCH_CUDA_ARCH_LIST           CUDA architectures (default here: "8.0;9.0+PTX")
The CUDA kernel needs nvcc and a CUDA build of torch at build time, not a visible GPU. Where the CUDA
kernel fails to build (a toolkit that cannot link, say), the extension is built again with the CPU
kernel alone; what was built and what failed is written to bypass_kernels/_build_report.json beside
the extension, printed at the end of the build, and shown by `bypass-kernels info`.

The CPU kernel is built for the baseline ISA (no -march/-mavx2 flags), so a wheel runs on any x86-64 or
other CPU; its AVX2 + F16C path sits in functions with their own target attribute and is chosen at run
time where the CPU has both (BYPASS_KERNELS_CPU_ISA=generic at run time forces the portable path).
"""

import json
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def nvcc_flags():
    """nvcc's flags, one file shared with the PTX check in tests/test_codegen.py. No --use_fast_math (it
    implies -ftz=true, flushing subnormals, and buys nothing for a memory-bound blend)."""
    with open(os.path.join(ROOT, "csrc", "nvcc_flags.txt"), encoding="utf-8") as f:
        return f.read().split()


def native_extensions():
    if _flag("BYPASS_KERNELS_SKIP_NATIVE"):
        print("bypass_kernels: BYPASS_KERNELS_SKIP_NATIVE is set; building no native extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("bypass_kernels: torch is not importable at build time; building no native extension")
        return [], {}

    sources = ["csrc/ops.cpp", "csrc/cpu/blend_cpu.cpp"]
    # -fopenmp: at::parallel_for is inlined from ATen's headers as OpenMP code; without it, it runs serially.
    # -ffp-contract=off: no FMA contraction, so results match the float32 reference bit for bit.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]
    cuda_torch = torch.version.cuda is not None
    if _flag("BYPASS_KERNELS_FORCE_CUDA") and not cuda_torch:  # a CPU torch finds no toolkit of its own
        cpp_extension.CUDA_HOME = cpp_extension.CUDA_HOME or cpp_extension._find_cuda_home()
        cuda_torch = True
    with_cuda = not _flag("BYPASS_KERNELS_SKIP_CUDA") and cuda_torch and cpp_extension.CUDA_HOME is not None

    def extension(cuda: bool):
        kwargs = {"extra_compile_args": {"cxx": list(cxx)}, "extra_link_args": ["-fopenmp"], "py_limited_api": False}
        if not cuda:
            return cpp_extension.CppExtension("bypass_kernels._C", sources, include_dirs=[CSRC], **kwargs)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags()
        return cpp_extension.CUDAExtension("bypass_kernels._C", sources + CUDA_SOURCES, include_dirs=[CSRC], **kwargs)

    if with_cuda:
        print(f"bypass_kernels: building CPU + CUDA kernels (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        print("bypass_kernels: building the CPU kernel (no CUDA torch or no nvcc, or BYPASS_KERNELS_SKIP_CUDA)")
    return [extension(with_cuda)], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension, extension)}


CSRC = os.path.join(ROOT, "csrc")
CUDA_SOURCES = ["csrc/cuda/blend_cuda.cu", "csrc/cuda/register_cuda.cpp"]
REPORT_NAME = "_build_report.json"  # beside the extension: what was built, what failed and why


def _tolerant_build_ext(base, extension):
    """A failed CUDA kernel leaves the CPU kernel (the extension is built again without CUDA); a failed CPU
    kernel leaves a working package (torch ops, Triton). Either way the build ends with a report in plain
    words, also written beside the extension for bypass_kernels.info()."""

    class TolerantBuildExt(base):
        def build_extension(self, ext):
            cuda = any(source in ext.sources for source in CUDA_SOURCES)
            report = {"kernels": [], "failed": {}}
            try:
                super().build_extension(ext)
                report["kernels"] = ["cpu", "cuda"] if cuda else ["cpu"]
            except Exception as exc:
                if _flag("BYPASS_KERNELS_REQUIRE_NATIVE") and not cuda:
                    raise
                report["failed"]["cuda" if cuda else "cpu"] = f"{type(exc).__name__}: {exc}"
                if cuda:
                    cpu = extension(cuda=False)
                    for key, value in vars(ext).items():  # what setuptools set on the extension it prepared
                        if key.startswith("_") and not hasattr(cpu, key):
                            setattr(cpu, key, value)
                    try:
                        super().build_extension(cpu)
                        report["kernels"] = ["cpu"]
                    except Exception as cpu_exc:
                        if _flag("BYPASS_KERNELS_REQUIRE_NATIVE"):
                            raise
                        report["failed"]["cpu"] = f"{type(cpu_exc).__name__}: {cpu_exc}"
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), REPORT_NAME)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            print(report_text(report))

    return TolerantBuildExt


def report_text(report: dict) -> str:
    """The end of the build, in plain words, with the way out of each failure."""
    lines = [f"bypass_kernels: built the {' and '.join(k.upper() for k in report['kernels'])} kernel(s)"]
    if not report["kernels"]:
        lines = ["bypass_kernels: WARNING: built no native kernel; the package runs on torch ops (and Triton)"]
    failed = report["failed"]
    if "cuda" in failed:
        lines.append(
            f"bypass_kernels: WARNING: the CUDA kernel failed to build ({failed['cuda']}); the compiler's or the "
            "linker's own message is above (pip install -v shows it). The CPU kernel was built without it. To skip "
            "the CUDA kernel set BYPASS_KERNELS_SKIP_CUDA=1; to build it, a CUDA build of torch and a CUDA toolkit "
            "whose libraries link (CUDA_HOME)"
        )
    if "cpu" in failed:
        lines.append(
            f"bypass_kernels: WARNING: the CPU kernel failed to build ({failed['cpu']}); it needs a C++17 compiler "
            "with OpenMP (g++). BYPASS_KERNELS_REQUIRE_NATIVE=1 makes this an error"
        )
    return "\n".join(lines)


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
