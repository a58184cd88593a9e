"""pytest plugin used by benchmarks/gpu_check.sh: ``-m gpu`` selects every test that needs a GPU.

tests/conftest.py's ``gpu`` decorator is a ``skipif(not HAS_CUDA, reason="needs a CUDA GPU")``, not
the ``gpu`` mark, so ``-m "gpu or tensorrt"`` alone deselects the tests written with it (the
CUDA-graph, reduce-overhead and no-host-sync tests among them). This adds the ``gpu`` mark to any
test carrying a skipif whose reason names CUDA, before ``-m`` deselects.
    PYTHONPATH=benchmarks python -m pytest -p pytest_gpu_select -m "gpu or tensorrt" tests/
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") is None and any(
            "CUDA" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")
        ):
            item.add_marker(pytest.mark.gpu)
