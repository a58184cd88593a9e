"""A ComfyUI custom node for the bypass ("Mid-Block / Span Bypass"), loaded by ComfyUI from custom_nodes/.

Install into a ComfyUI checkout (with this package installed in ComfyUI's Python):
``bypass-kernels comfyui install /path/to/ComfyUI``. ComfyUI is imported only when the node runs.
"""

from bypass_kernels.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
