"""A generation request with its own schedule, and a list of them run as batched pipeline calls."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, fields

import torch

from bypass_kernels.schedule import BypassSchedule

OUTPUTS = ("png", "latent")


@dataclass(frozen=True)
class GenerationRequest:
    """One image: ``prompt``, optional ``negative_prompt``, ``schedule`` (a spec such as "linear:0.3:500",
    a schedule's JSON object, or None for the deployment's own), ``seed`` (the image's noise, drawn as
    ``torch.Generator().manual_seed(seed)`` on the CPU, as for a single diffusers call), and the call's
    settings (None: the pipeline's defaults). ``output``: "png" (base64) or "latent" (float32, base64)."""

    prompt: str
    negative_prompt: str | None = None
    schedule: BypassSchedule | None = None
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    output: str = "png"

    @classmethod
    def from_json(cls, body, *, num_train_timesteps: int = 1000) -> GenerationRequest:
        """Check a request's JSON object; errors (ValueError) name the field and what it takes."""
        if not isinstance(body, dict):
            raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(body) - set(known))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(known)}")
        if not isinstance(body.get("prompt"), str):
            raise ValueError("prompt: a string is required")
        values = dict(body)
        if values.get("negative_prompt") is not None and not isinstance(values["negative_prompt"], str):
            raise ValueError("negative_prompt: expected a string")
        for name in ("seed", "num_inference_steps", "height", "width"):
            value = values.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: expected a whole number of at least 0, got {value!r}")
        if values.get("num_inference_steps") == 0:
            raise ValueError("num_inference_steps: expected at least 1")
        guidance = values.get("guidance_scale")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
            raise ValueError(f"guidance_scale: expected a number, got {guidance!r}")
        if values.get("output", "png") not in OUTPUTS:
            raise ValueError(f"output: expected one of {', '.join(OUTPUTS)}, got {values['output']!r}")
        if values.get("schedule") is not None:
            spec = values["schedule"]
            if not isinstance(spec, (str, dict)):
                raise ValueError("schedule: expected a spec string or a schedule's JSON object")
            try:
                values["schedule"] = BypassSchedule.parse(spec, num_train_timesteps=num_train_timesteps, files=False)
            except (KeyError, OverflowError, ValueError, TypeError) as exc:
                message = str(exc)
                raise ValueError(message if message.startswith("schedule") else f"schedule: {message}") from None
        if guidance is not None:
            values["guidance_scale"] = float(guidance)
        return cls(**values)

    def call_settings(self) -> tuple:
        """What must agree for requests to share one pipeline call."""
        return (self.num_inference_steps, self.guidance_scale, self.height, self.width, self.output)


def generate_batch(pipe, requests: list[GenerationRequest], default_schedule: BypassSchedule) -> list[dict]:
    """Run ``requests`` on a patched pipeline: one call per group of requests with the same settings,
    each image with its own schedule and seed (``per_sample``). Each result is what a single call with
    that request gives (up to float rounding between batch sizes); a group whose call fails gets its
    error instead: ``{"error": "..."}``."""
    from bypass_kernels.patching import per_sample

    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.call_settings(), []).append(index)
    results: list[dict] = [{} for _ in requests]
    for members in groups.values():
        batch = [requests[i] for i in members]
        first = batch[0]
        kwargs = {
            name: getattr(first, name)
            for name in ("num_inference_steps", "guidance_scale", "height", "width")
            if getattr(first, name) is not None
        }
        if any(r.negative_prompt is not None for r in batch):
            kwargs["negative_prompt"] = [r.negative_prompt or "" for r in batch]
        schedules = [r.schedule or default_schedule for r in batch]
        try:
            with per_sample(pipe, schedules):
                out = pipe(
                    prompt=[r.prompt for r in batch],
                    generator=[torch.Generator().manual_seed(r.seed) for r in batch],
                    output_type="latent" if first.output == "latent" else "pil",
                    **kwargs,
                )
        except (ValueError, TypeError, RuntimeError) as exc:
            for i in members:
                results[i] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        for i, image in zip(members, out.images, strict=True):
            results[i] = _encode(image, first.output)
            results[i]["batch_size"] = len(members)
    return results


def _encode(image, output: str) -> dict:
    if output == "latent":
        array = image.detach().to(torch.float32).cpu().contiguous().numpy()
        return {"latents": base64.b64encode(array.tobytes()).decode(), "shape": list(array.shape), "dtype": "float32"}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"image": base64.b64encode(buffer.getvalue()).decode(), "format": "png"}


def decode_latents(result: dict):
    """The float32 array of a "latent" result (numpy)."""
    import numpy as np

    return np.frombuffer(base64.b64decode(result["latents"]), dtype=np.float32).reshape(result["shape"])
