"""Build of the native extension ``bypass_kernels._C``.

Everything else about the package lives in pyproject.toml. The extension is optional: import never
needs it, ``bypass_kernels.info()`` says why it is missing, and the ``auto`` backend falls back.

Environment switches:
  BYPASS_KERNELS_SKIP_NATIVE=1   build no native code at all
  BYPASS_KERNELS_SKIP_CUDA=1     build the CPU kernel only, even where nvcc and a CUDA torch exist
  BYPASS_KERNELS_REQUIRE_NATIVE=1  fail the install if the extension does not build
  TORCH_CUDA_ARCH_LIST           CUDA architectures (default here: "8.0;9.0+PTX")
The CUDA kernel needs nvcc and a CUDA build of torch at build time, not a visible GPU.

The CPU kernel is built for the baseline ISA (no -march/-mavx2 flags), so a wheel runs on any x86-64 or
other CPU; its AVX2 + F16C path sits in functions with their own target attribute and is chosen at run
time where the CPU has both (BYPASS_KERNELS_CPU_ISA=generic at run time forces the portable path).
"""

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
    with_cuda = (
        not _flag("BYPASS_KERNELS_SKIP_CUDA") and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    kwargs = {"extra_compile_args": {"cxx": cxx}, "extra_link_args": ["-fopenmp"], "py_limited_api": False}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += ["csrc/cuda/blend_cuda.cu", "csrc/cuda/register_cuda.cpp"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags()
        ext_cls = cpp_extension.CUDAExtension
        print(f"bypass_kernels: building CPU + CUDA kernels (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
    else:
        ext_cls = cpp_extension.CppExtension
        print("bypass_kernels: building the CPU kernel (no CUDA torch or no nvcc, or BYPASS_KERNELS_SKIP_CUDA)")
    ext = ext_cls("bypass_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], **kwargs)
    return [ext], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


def _tolerant_build_ext(base):
    """A failed native build warns and leaves a working package (torch ops, Triton); info() says why."""

    class TolerantBuildExt(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if _flag("BYPASS_KERNELS_REQUIRE_NATIVE"):
                    raise
                print(f"bypass_kernels: WARNING: the native extension failed to build ({exc}); installing without it")

    return TolerantBuildExt


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
