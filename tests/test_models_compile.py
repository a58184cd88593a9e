"""torch.compile(fullgraph=True) of every patched UNet class: no graph break and no recompile
across per-sample timesteps, video models included (the frame fold must be inferred from shapes, with no
host sync). Dynamo's "eager" backend: this checks the tracing, not Inductor's code (test_compile.py does
that for SD/SDXL). Video models fail on c640135 (no frame fold yet)."""

from __future__ import annotations

import pytest
import torch
from test_models import FRAMES, SCHEDULE, frames_of, run, run_reference
from tiny_models import TINY_MODELS, build_tiny_model, tiny_model_inputs

import bypass_kernels

pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_fullgraph_compile_per_sample_timesteps(name):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = build_tiny_model(name)
    calls = [torch.tensor([901.5, 450.0]), torch.tensor([640.0, 310.0])]
    inputs = [tiny_model_inputs(model, 2, frames=FRAMES, timestep=t) for t in calls]
    expected = [run_reference(model, x, frames_of(model)) for x in inputs]
    bypass_kernels.patch(model, SCHEDULE)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    try:
        got = [run(compiled, x) for x in inputs]
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1  # one graph, no recompile for new timestep values
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
