"""The peer-suite plugin (tests/peer/bypass_peer.py) patches every UNet and transformer a test builds, and
counts them."""

import importlib
import os
import sys

import diffusers
import tiny_transformers

import bypass_kernels
from bypass_kernels.presets import build_unet

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer")


def test_the_plugin_patches_every_unet_a_test_builds(monkeypatch):
    monkeypatch.setenv("BYPASS_PEER_LAMBDA", "0.25")
    monkeypatch.syspath_prepend(PEER)
    inits = {name: getattr(diffusers, name).__init__ for name in ("UNet2DModel", "UNet2DConditionModel")}
    try:
        peer = importlib.import_module("bypass_peer")  # wraps the UNet classes' __init__ on import
        unet = build_unet("tiny-unet2d")  # a diffusers UNet2DModel, built as any test would
        assert type(unet) is diffusers.UNet2DModel and bypass_kernels.is_patched(unet)
        assert bypass_kernels.get_schedule(unet).weight(999.0) == 0.25
        assert peer.PATCHED["UNet2DModel"] == 1 and peer.PATCHED["UNet2DConditionModel"] == 0
        transformer = tiny_transformers.build("sana")  # and every transformer of a known family
        assert bypass_kernels.is_patched(transformer) and peer.PATCHED["SanaTransformer2DModel"] == 1
        lines = []
        peer.pytest_terminal_summary(type("Reporter", (), {"write_line": lambda self, s: lines.append(s)})())
        assert lines == ["bypass_peer: models patched: UNet2DModel 1, SanaTransformer2DModel 1"]
    finally:
        for name in sys.modules["bypass_peer"].CLASSES if "bypass_peer" in sys.modules else ():
            cls = getattr(diffusers, name)
            cls.__init__ = getattr(cls.__init__, "__wrapped__", cls.__init__)
        sys.modules.pop("bypass_peer", None)
    assert all(getattr(diffusers, name).__init__ is init for name, init in inits.items())
