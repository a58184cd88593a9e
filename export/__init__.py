"""Deployment export (imported as ``bypass_kernels.export``; the code lives in the top-level export/ folder).

- :func:`to_onnx`: an ONNX graph with the bypass schedule baked in as a timestep-indexed table.
- :func:`build_engine` and :class:`TensorRTUNet`: a TensorRT engine from that graph, and a runner
  usable in place of ``pipe.unet``. TensorRT is imported only when these are used.
"""

from bypass_kernels.export.onnx_export import (
    MIN_OPSET,
    SCHEDULE_NAME,
    ExportResult,
    UNetForExport,
    export_inputs,
    max_relative_error,
    onnxruntime_session,
    reference_output,
    run_onnx,
    to_onnx,
)
from bypass_kernels.export.tensorrt import TensorRTUNet, build_engine, default_profile

__all__ = [
    "MIN_OPSET",
    "SCHEDULE_NAME",
    "ExportResult",
    "TensorRTUNet",
    "UNetForExport",
    "build_engine",
    "default_profile",
    "export_inputs",
    "max_relative_error",
    "onnxruntime_session",
    "reference_output",
    "run_onnx",
    "to_onnx",
]
