"""Deployment export (imported as ``bypass_kernels.export``; the code lives in the top-level export/ folder).

- ``to_onnx``: an ONNX graph with the bypass schedule baked in as a timestep-indexed table,
  written kill-safe (staged, checked with ONNX Runtime, then renamed into place), from a UNet
  (``onnx_export``) or an SD3, Flux or PixArt transformer (``transformers``), or their pipelines.
- ``OnnxRuntimeUNet`` / ``OnnxRuntimeTransformer``: that graph run by ONNX Runtime,
  usable as ``pipe.unet`` / ``pipe.transformer``.
- ``build_engine`` and ``TensorRTUNet``: a TensorRT (10.x or 11.x) engine from that graph
  and a runner usable as ``pipe.unet``; ``default_profile`` derives its shape ranges from the
  graph. TensorRT is imported only when these are used.

Everything else (the graph's names and metadata, the ONNX Runtime check and its helpers) is in the
modules: ``onnx_export``, ``transformers``, ``runtime``, ``profiles``, ``tensorrt``.
"""

from bypass_kernels.export import onnx_export, transformers
from bypass_kernels.export.profiles import default_profile
from bypass_kernels.export.runtime import OnnxRuntimeUNet
from bypass_kernels.export.tensorrt import TensorRTUNet, build_engine
from bypass_kernels.export.transformers import OnnxRuntimeTransformer


def to_onnx(model, path: str, schedule=None, **options):
    """Export ``model`` (a UNet, a transformer, or a pipeline) to ONNX at ``path`` with the bypass in
    the graph: ``bypass_kernels.export.onnx_export.to_onnx`` for UNets,
    ``bypass_kernels.export.transformers.to_onnx`` for transformers (see each for the options)."""
    from bypass_kernels import targets

    owner, _ = targets.find_owner(model, "to_onnx")
    export = onnx_export if hasattr(owner, "mid_block") else transformers
    return export.to_onnx(model, path, schedule, **options)


__all__ = [
    "OnnxRuntimeTransformer",
    "OnnxRuntimeUNet",
    "TensorRTUNet",
    "build_engine",
    "default_profile",
    "to_onnx",
]
