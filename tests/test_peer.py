"""The peer-suite plugin (tests/peer/bypass_peer.py) patches every UNet a test builds, and counts them."""

import importlib
import os
import sys

import diffusers

import bypass_kernels

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer")


def test_the_plugin_patches_every_unet_a_test_builds(monkeypatch):
    monkeypatch.setenv("BYPASS_PEER_LAMBDA", "0.25")
    monkeypatch.syspath_prepend(PEER)
    inits = {name: getattr(diffusers, name).__init__ for name in ("UNet2DModel", "UNet2DConditionModel")}
    try:
        peer = importlib.import_module("bypass_peer")  # wraps the UNet classes' __init__ on import
        unet = diffusers.UNet2DModel(
            sample_size=8,
            block_out_channels=(8,),
            layers_per_block=1,
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            norm_num_groups=8,
        )
        assert type(unet) is diffusers.UNet2DModel and bypass_kernels.is_patched(unet)
        assert bypass_kernels.get_schedule(unet).weight(999.0) == 0.25
        assert peer.PATCHED["UNet2DModel"] == 1 and peer.PATCHED["UNet2DConditionModel"] == 0
        lines = []
        peer.pytest_terminal_summary(type("Reporter", (), {"write_line": lambda self, s: lines.append(s)})())
        assert lines == ["bypass_peer: UNets patched: UNet2DModel 1"]
    finally:
        for name in sys.modules["bypass_peer"].CLASSES if "bypass_peer" in sys.modules else ():
            cls = getattr(diffusers, name)
            cls.__init__ = getattr(cls.__init__, "__wrapped__", cls.__init__)
        sys.modules.pop("bypass_peer", None)
    assert all(getattr(diffusers, name).__init__ is init for name, init in inits.items())
