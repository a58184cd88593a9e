"""Which blend backends exist here, why a missing one is missing, and what ``auto`` picks.

Backends: ``triton`` (fused Triton kernel), ``cuda`` (CUDA C++ kernel), ``cpu`` (C++ CPU kernel),
``torch`` (plain torch ops) and ``auto``; each is one ``Backend`` record of ``BACKENDS``
(where it runs, why it cannot, its kernel entry). Device availability is checked when asked
(``info()``, a blend, a patch), never at import.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bypass_kernels import _native
from bypass_kernels.torch_blend import blend_reference, blend_torch_eager_, flat_layout_ok, per_sample_weights

_triton_state: dict = {}


def _triton():
    """The Triton kernel module, imported on first use (importing it costs seconds); None if missing."""
    if "module" not in _triton_state:
        try:
            from bypass_kernels import triton_kernels

            _triton_state.update(module=triton_kernels, error=None)
        except Exception as exc:  # ImportError, or a triton too old for the kernel
            error = f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
            _triton_state.update(module=None, error=error)
    return _triton_state["module"]


class BackendUnavailableError(RuntimeError):
    """A backend that exists but cannot run here; the message says why and what to do. ``backend`` and
    ``reason`` hold the two parts (the command line words its own hint from them)."""

    def __init__(self, message: str, *, backend: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.backend, self.reason = backend, reason


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- why each backend may be unavailable (None: it can run on device_type; None device type: somewhere here)


def _torch_unavailable(device_type: str | None) -> str | None:
    return None


def _cpu_unavailable(device_type: str | None) -> str | None:
    if not _native.loaded:
        return _native.load_error
    if device_type not in (None, "cpu"):
        return f"the 'cpu' backend runs on CPU tensors, got {device_type} tensors"
    return None


def _cuda_unavailable(device_type: str | None) -> str | None:
    if not _native.loaded:
        return _native.load_error
    if not _native.has_kernel("CUDA"):
        failure = _native.build_failure("cuda")
        if failure is not None:
            return f"the CUDA kernel failed to build ({failure}); the CPU kernel was built. {_native.BUILD_HINT}"
        return (
            "the native extension was built without its CUDA kernel (build needs a CUDA build of torch and nvcc; "
            "BYPASS_KERNELS_SKIP_CUDA unset)"
        )
    if device_type not in (None, "cuda"):
        return f"the 'cuda' backend runs on CUDA tensors, got {device_type} tensors"
    if device_type is None and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _triton_unavailable(device_type: str | None) -> str | None:
    if _triton() is None:
        return _triton_state["error"]
    if _triton_interpret() != _triton().INTERPRET:
        return "TRITON_INTERPRET changed after bypass_kernels was imported; set it before the import"
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if not _triton_interpret():
            return "Triton runs on CUDA tensors here; on the CPU only with TRITON_INTERPRET=1 (slow, for tests)"
        return None
    if device_type not in (None, "cuda"):
        return f"the 'triton' backend runs on CUDA tensors, got {device_type} tensors"
    if _triton_interpret():
        return "TRITON_INTERPRET=1 is set, which runs Triton on the CPU only"
    return None


# -- each backend's kernel entry: (mid_out, mid_in, table, timestep) -> mid_out, arguments checked, the
# timestep a tensor on mid_out's device, no autograd needed. ops.blend_ calls it, eager or traced; an eager
# native call normally takes _native.eager_blend_ before reaching it.


def _torch_kernel(mid_out, mid_in, table, timestep):
    if torch.compiler.is_compiling():  # what compilers fuse into the mid-block's last pointwise kernel
        return mid_out.copy_(blend_reference(mid_out, mid_in, table, timestep))
    return blend_torch_eager_(mid_out, mid_in, table, timestep)


def _native_kernel(mid_out, mid_in, table, timestep):
    torch.ops.bypass_kernels.blend_(mid_out, mid_in, table, timestep)  # traced: the op's fake impl
    return mid_out


def _triton_kernel(mid_out, mid_in, table, timestep):
    t = timestep if timestep.dtype in triton_timestep_dtypes() else timestep.to(torch.float32)
    flat = flat_layout_ok(mid_out, mid_in, per_sample_weights(table, t))
    if mid_out.dtype in triton_kernel_dtypes() and flat and table.stride(-1) == 1:
        triton_op()(mid_out, mid_in, table, t)
        return mid_out
    # Any other dtype or strides: the right answer, written into the caller's tensor.
    return mid_out.copy_(blend_reference(mid_out, mid_in, table, timestep))


@dataclass(frozen=True)
class Backend:
    """One blend backend: where it runs, why it cannot (``why_unavailable(device_type)``: None when it can;
    device_type None asks about this machine as a whole), its kernel entry, whether its eager calls may take
    the C++ op's unboxed path (``native``), and its rank in ``auto``'s eager order on a device type (lower
    first; None: auto never picks it, except ``torch`` as the last resort)."""

    name: str
    device_types: tuple[str, ...]
    why_unavailable: Callable[[str | None], str | None]
    kernel: Callable[..., torch.Tensor]
    native: bool = False
    auto_rank: int | None = None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("triton", ("cuda",), _triton_unavailable, _triton_kernel, auto_rank=1),  # CPU: interpreter only
        Backend("cuda", ("cuda",), _cuda_unavailable, _native_kernel, native=True, auto_rank=0),
        Backend("cpu", ("cpu",), _cpu_unavailable, _native_kernel, native=True, auto_rank=0),
        Backend("torch", ("cpu", "cuda"), _torch_unavailable, _torch_kernel),  # and any other device
    )
}
NAMES = ("auto", *BACKENDS)
NATIVE = tuple(sorted(name for name, b in BACKENDS.items() if b.native))  # ("cpu", "cuda"), as ops had it


def _why_unavailable(name: str, device_type: str | None) -> str | None:
    """None if ``name`` can run on ``device_type`` (None: on some device here), else the reason."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(NAMES)}, got {name!r}")
    return BACKENDS[name].why_unavailable(device_type)


def check_name(name: str) -> None:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"backend: expected one of {', '.join(repr(n) for n in NAMES)}, got {name!r}")


def require(name: str, device_type: str | None = None) -> None:
    """Raise unless backend ``name`` can run (on ``device_type``, if given)."""
    check_name(name)
    if name != "auto":
        reason = _why_unavailable(name, device_type)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} is unavailable: {reason}. See bypass_kernels.info().", backend=name, reason=reason
            )


_auto_cache: dict[str, str] = {}


def auto_choice(device_type: str) -> str:
    """The eager kernel ``auto`` runs on a device type (plain torch ops while tracing).

    CUDA: the CUDA C++ kernel, else the Triton kernel, else torch ops. Both kernels sit at the same
    floor under CUDA-graph replay, but a plain eager launch of the C++ kernel cost 28-50 µs on the
    H200 host against 88-141 µs for Triton's launcher (benchmarks/results/h200-c640135-microbench.csv), and
    at 64M elements plain it reached 84-92% of copy bandwidth against 48-77%. CPU: the C++ kernel,
    else torch ops (the Triton interpreter is for tests only, never picked). Cached per device
    type: what is installed and visible does not change within a process.
    """
    if device_type not in _auto_cache:
        _auto_cache[device_type] = _first_available(device_type)
    return _auto_cache[device_type]


def _first_available(device_type: str) -> str:
    ranked = [b for b in BACKENDS.values() if b.auto_rank is not None and device_type in b.device_types]
    for backend in sorted(ranked, key=lambda b: b.auto_rank):
        if backend.name == "triton" and _triton_interpret():  # the interpreter is for tests, never picked
            continue
        if _why_unavailable(backend.name, device_type) is None:
            return backend.name
    return "torch"


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for one call on ``device``."""
    if name == "auto":
        return "torch" if torch.compiler.is_compiling() else auto_choice(device.type)
    if torch.compiler.is_compiling():
        check_name(name)  # no device queries inside a traced region
    else:
        require(name, device.type)
    return name


def triton_op():
    return _triton().blend_triton_


def triton_kernel_dtypes() -> tuple[torch.dtype, ...]:
    return _triton().KERNEL_DTYPES


def triton_timestep_dtypes() -> tuple[torch.dtype, ...]:
    return _triton().TIMESTEP_DTYPES


def info() -> dict:
    """Backends here: ``{"backends": {name: {"available": bool, "reason": str|None}}, "auto": {...}, ...}``."""
    rows = {}
    for name in NAMES[1:]:
        reason = _why_unavailable(name, None)
        rows[name] = {"available": reason is None, "reason": reason}
    auto = {"cpu": auto_choice("cpu")}
    if torch.cuda.is_available():
        auto["cuda"] = auto_choice("cuda")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if _triton() is not None:
        import triton

        versions["triton"] = triton.__version__
    return {
        "backends": rows,
        "auto": auto,
        "traced": "torch (plain torch ops the compiler fuses)",
        "native_extension": {"loaded": _native.loaded, "reason": _native.load_error, "cpu_isa": _native.cpu_isa()},
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton_interpret": _triton_interpret(),
        "versions": versions,
    }
