"""A Ray Serve deployment of a patched diffusers pipeline: requests carry their own schedule, and
``@serve.batch`` joins concurrent requests into one pipeline call with a schedule per image.

    from ray import serve
    from bypass_kernels.serving.ray_serve import build_app

    serve.run(build_app("path/to/pipeline", num_replicas=2, ray_actor_options={"num_gpus": 1}))
    # POST {"prompt": "...", "schedule": "linear:0.3:500", "seed": 1} to http://HOST:8000/

From the command line: ``serve run bypass_kernels.serving.ray_serve:app_builder pipeline=path/to/pipeline
num_replicas=2``. Needs ``pip install "bypass_kernels[serve]"`` (Ray Serve).
"""

from __future__ import annotations

import asyncio
import os
import socket

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from bypass_kernels.serving.requests import GenerationRequest, generate_batch


def load_pipeline(pipeline, *, device: str | None = None, torch_dtype=None):
    """A diffusers pipeline from a folder or hub name (``DiffusionPipeline.from_pretrained``), from a
    function that returns one, or as given; moved to ``device`` (default: CUDA where there is one)."""
    import torch
    from diffusers import DiffusionPipeline

    if isinstance(pipeline, (str, os.PathLike)):
        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        pipeline = DiffusionPipeline.from_pretrained(pipeline, torch_dtype=dtype)
    elif callable(pipeline) and not hasattr(pipeline, "components"):
        pipeline = pipeline()
    if not hasattr(pipeline, "components"):
        raise TypeError(
            f"pipeline: expected a diffusers pipeline, a folder or a function, got {type(pipeline).__name__}"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class PipelineServer:
    """One replica: the pipeline, patched with ``schedule`` (the schedule of requests that send none)."""

    def __init__(
        self,
        pipeline,
        *,
        schedule=None,
        device: str | None = None,
        torch_dtype=None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
    ):
        import bypass_kernels

        self.pipe = load_pipeline(pipeline, device=device, torch_dtype=torch_dtype)
        bypass_kernels.patch(self.pipe, schedule)
        self.schedule = bypass_kernels.get_schedule(self.pipe)
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        try:
            item = GenerationRequest.from_json(body, num_train_timesteps=self.num_train_timesteps)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        result = await self.generate(item)
        return JSONResponse(result, status_code=400 if "error" in result else 200)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, items: list[GenerationRequest]) -> list[dict]:
        # the pipeline call blocks: a worker thread keeps the replica answering (one batch at a time)
        results = await asyncio.to_thread(generate_batch, self.pipe, items, self.schedule)
        return [dict(result, replica=self.replica) for result in results]


def build_app(
    pipeline,
    *,
    num_replicas: int = 1,
    ray_actor_options: dict | None = None,
    max_ongoing_requests: int | None = None,
    **server_options,
):
    """The application to ``serve.run``: ``num_replicas`` replicas of ``PipelineServer`` (each loads and
    patches ``pipeline``; ``server_options``: schedule, device, torch_dtype, max_batch_size,
    batch_wait_timeout_s). ``ray_actor_options``, e.g. ``{"num_gpus": 1}``: a GPU per replica."""
    max_batch = server_options.get("max_batch_size", 8)
    deployment = serve.deployment(
        PipelineServer,
        name="bypass_pipeline",
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options or {},
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch,  # room for the next batch to gather
    )
    return deployment.bind(pipeline, **server_options)


def app_builder(args: dict):
    """For ``serve run bypass_kernels.serving.ray_serve:app_builder pipeline=FOLDER [num_replicas=N]
    [num_gpus=G] [schedule=SPEC] [max_batch_size=N] [batch_wait_timeout_s=S] [device=D] [torch_dtype=float16]``."""
    args = dict(args)
    if "pipeline" not in args:
        raise ValueError("pipeline=FOLDER (a diffusers pipeline folder or hub name) is required")
    options = {"ray_actor_options": {"num_gpus": float(args.pop("num_gpus"))} if "num_gpus" in args else None}
    for name, kind in (("num_replicas", int), ("max_batch_size", int), ("batch_wait_timeout_s", float)):
        if name in args:
            options[name] = kind(args.pop(name))
    return build_app(args.pop("pipeline"), **options, **args)
