"""``bypass-kernels comfyui install PATH``: a custom_nodes entry that loads this package's node."""

from __future__ import annotations

import os

FOLDER = "bypass_kernels_node"
SHIM = '''"""Mid-Block Bypass (written by `bypass-kernels comfyui install`; the node is in bypass_kernels)."""

from bypass_kernels.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(comfyui_path: str, *, overwrite: bool = False) -> str:
    """Write ``<comfyui_path>/custom_nodes/bypass_kernels_node/__init__.py``; returns its folder."""
    root = os.path.abspath(comfyui_path)
    custom = os.path.join(root, "custom_nodes")
    if not os.path.isfile(os.path.join(root, "nodes.py")) or not os.path.isdir(os.path.join(root, "comfy")):
        raise ValueError(f"PATH: {root!r} is not a ComfyUI checkout (no nodes.py and comfy/ there)")
    os.makedirs(custom, exist_ok=True)
    folder = os.path.join(custom, FOLDER)
    target = os.path.join(folder, "__init__.py")
    if os.path.exists(target) and not overwrite:
        with open(target, encoding="utf-8") as f:
            if f.read() == SHIM:
                return folder  # already installed
        raise FileExistsError(f"{target!r} exists and is not this package's; pass --overwrite to replace it")
    os.makedirs(folder, exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(SHIM)
    os.replace(tmp, target)
    return folder
