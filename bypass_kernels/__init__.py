"""bypass_kernels: the training-free mid-block bypass of "Deeper Diffusion Models Amplify Bias"
(arXiv 2505.17560) as a one-line patch for diffusers UNets, with fused kernels that stay
compile-, CUDA-graph- and export-safe.

    import bypass_kernels
    bypass_kernels.patch(pipe)          # or patch(unet), with a BypassSchedule of your choice
"""

from bypass_kernels.backends import BackendUnavailableError, info
from bypass_kernels.ops import blend, blend_, blend_reference
from bypass_kernels.patching import (
    describe,
    get_schedule,
    is_patched,
    patch,
    patched,
    per_sample,
    set_schedule,
    unpatch,
)
from bypass_kernels.schedule import BypassSchedule, default_schedule

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "BypassSchedule",
    "__version__",
    "blend",
    "blend_",
    "blend_reference",
    "default_schedule",
    "describe",
    "get_schedule",
    "info",
    "is_patched",
    "patch",
    "patched",
    "per_sample",
    "set_schedule",
    "unpatch",
]
