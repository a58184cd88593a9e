"""Deployment export (imported as ``bypass_kernels.export``; the code lives in the top-level export/ folder).

- :func:`to_onnx`: an ONNX graph with the bypass schedule baked in as a timestep-indexed table,
  written kill-safe (staged, checked with ONNX Runtime, then renamed into place).
- :class:`OnnxRuntimeUNet`: that graph run by ONNX Runtime, usable as ``pipe.unet``.
- :func:`build_engine` and :class:`TensorRTUNet`: a TensorRT (10.x or 11.x) engine from that graph
  and a runner usable as ``pipe.unet``; :func:`default_profile` derives its shape ranges from the
  graph. TensorRT is imported only when these are used.

Everything else (the graph's names and metadata, the ONNX Runtime check and its helpers) is in the
modules: ``onnx_export``, ``runtime``, ``profiles``, ``tensorrt``.
"""

from bypass_kernels.export.onnx_export import to_onnx
from bypass_kernels.export.profiles import default_profile
from bypass_kernels.export.runtime import OnnxRuntimeUNet
from bypass_kernels.export.tensorrt import TensorRTUNet, build_engine

__all__ = ["OnnxRuntimeUNet", "TensorRTUNet", "build_engine", "default_profile", "to_onnx"]
