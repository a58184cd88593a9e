"""A pytest plugin that patches every diffusers UNet with a mid-block, and every transformer of a
family the package knows, as it is built, so diffusers' own model and pipeline tests run on patched
models ("the peer suite"). Those tests are not shipped with diffusers' wheel or sdist; run them from
a checkout of diffusers' repository at a version near the installed one (``run_peer_suite.sh``
beside this file runs each suite unpatched, patched and patched at λ = 0):

    PYTHONPATH=tests/peer python -m pytest -p bypass_peer <diffusers checkout>/tests/models/unets

(they also need ``parameterized``, ``requests_mock``, ``peft``, ``sentencepiece``). Each model is
patched at the end of its ``__init__`` with ``BypassSchedule.constant(BYPASS_PEER_LAMBDA)`` (default
0.3: the blend is active at every timestep, so a test sees a patched model whatever timestep it
uses); a transformer at its family's default span. Compare the outcome with the same command
without ``-p bypass_peer``: every test should end the same. The summary ends with the number of
models patched, pytest-xdist workers included.
"""

from __future__ import annotations

import functools
import os

import diffusers
import pytest

import bypass_kernels
from bypass_kernels import targets

SCHEDULE = bypass_kernels.BypassSchedule.constant(float(os.environ.get("BYPASS_PEER_LAMBDA", "0.3")))
# The UNet classes the package patches: those whose timestep module it knows, and I2VGenXL (whose
# timestep is read from its own argument); the transformer families it knows.
CLASSES = (*sorted(targets.UNET_CARRIERS), "I2VGenXLUNet", *sorted(targets.TRANSFORMERS))
PATCHED = {name: 0 for name in CLASSES}


def _patch_on_init(cls: type) -> None:
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # A subclass's own __init__ finishes after this one: it is patched there, once built.
        if type(self) is cls and (getattr(self, "mid_block", None) is not None or cls.__name__ in targets.TRANSFORMERS):
            bypass_kernels.patch(self, SCHEDULE)
            PATCHED[cls.__name__] += 1

    cls.__init__ = __init__


for _name in CLASSES:
    _patch_on_init(getattr(diffusers, _name))


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: hand the counts to the controller
        session.config.workeroutput["bypass_peer"] = dict(PATCHED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    for name, n in getattr(node, "workeroutput", {}).get("bypass_peer", {}).items():
        PATCHED[name] += n


def pytest_terminal_summary(terminalreporter):
    counts = ", ".join(f"{name} {n}" for name, n in PATCHED.items() if n)
    terminalreporter.write_line(f"bypass_peer: models patched: {counts or 'none'}")
