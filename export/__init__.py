"""Deployment export (imported as ``bypass_kernels.export``; the code lives in the top-level export/ folder).

- :func:`to_onnx`: an ONNX graph with the bypass schedule baked in as a timestep-indexed table,
  written kill-safe (staged, checked with ONNX Runtime, then renamed into place).
- :class:`OnnxRuntimeUNet`: that graph run by ONNX Runtime, usable as ``pipe.unet``.
- :func:`build_engine` and :class:`TensorRTUNet`: a TensorRT (10.x or 11.x) engine from that graph
  and a runner usable as ``pipe.unet``; :func:`default_profile` derives its shape ranges from the
  graph. TensorRT is imported only when these are used.
"""

from bypass_kernels.export.onnx_export import (
    CHECK_TIMESTEPS,
    MIN_OPSET,
    SCHEDULE_NAME,
    VIDEO_UNETS,
    ExportResult,
    UNetForExport,
    export_inputs,
    graph_metadata,
    max_relative_error,
    onnxruntime_session,
    reference_output,
    run_onnx,
    to_onnx,
)
from bypass_kernels.export.profiles import default_profile
from bypass_kernels.export.runtime import OnnxRuntimeUNet, PipelineUNet
from bypass_kernels.export.tensorrt import TensorRTUNet, build_engine

__all__ = [
    "CHECK_TIMESTEPS",
    "MIN_OPSET",
    "SCHEDULE_NAME",
    "VIDEO_UNETS",
    "ExportResult",
    "OnnxRuntimeUNet",
    "PipelineUNet",
    "TensorRTUNet",
    "UNetForExport",
    "build_engine",
    "default_profile",
    "export_inputs",
    "graph_metadata",
    "max_relative_error",
    "onnxruntime_session",
    "reference_output",
    "run_onnx",
    "to_onnx",
]
