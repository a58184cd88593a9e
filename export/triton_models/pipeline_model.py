"""Triton python-backend model: a whole denoising loop for one image per request, calling the denoiser
model once per step (business logic scripting), as diffusers' StableDiffusionPipeline does.

Written into a model repository by bypass_kernels (``write_model_repository``). Needs numpy, torch and
diffusers in the python backend's environment (the scheduler is the pipeline's, from
scheduler_config.json), and bypass_kernels for schedules sent as specs (``bypass_spec``).

Inputs (one image each; all but ``encoder_hidden_states`` optional): ``encoder_hidden_states`` and
``negative_encoder_hidden_states`` [text, dim] (the negative one is needed where guidance_scale > 1),
``latents`` [C, h, w] or ``seed`` (torch.randn on the CPU, as diffusers draws with a CPU generator),
``num_inference_steps``, ``guidance_scale``, ``height``/``width`` in pixels, and the schedule as a table
``bypass_schedule`` [T] or a spec ``bypass_spec`` ("linear:0.3:500"). Output: ``latents`` [C, h, w],
the pipeline's output_type="latent" (decode with the VAE after dividing by its scaling factor).
Several instances denoise at once; the denoiser's dynamic batcher joins their steps into one batch,
a schedule per row.
"""

import inspect
import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import diffusers

        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "pipeline.json"), encoding="utf-8") as f:
            self.settings = json.load(f)
        with open(os.path.join(folder, "scheduler_config.json"), encoding="utf-8") as f:
            self.scheduler_config = json.load(f)
        self.scheduler_class = getattr(diffusers, self.scheduler_config["_class_name"])
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.denoiser = params.get("denoiser", self.settings["denoiser"])
        self.default_table = np.asarray(self.settings["bypass_schedule"], dtype=np.float32)
        self.dtype = np.dtype(self.settings["dtype"])  # the denoiser graph's (its timestep: float32)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                latents = self.generate(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("latents", latents)]))
            except Exception as exc:  # the client gets the reason; the model stays up
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def generate(self, request) -> np.ndarray:
        settings = self.settings
        cond = _required(request, "encoder_hidden_states").astype(np.float32)[None]
        uncond = _optional(request, "negative_encoder_hidden_states")
        steps = int(_scalar(request, "num_inference_steps", settings["num_inference_steps"]))
        guidance = float(_scalar(request, "guidance_scale", settings["guidance_scale"]))
        guided = guidance > 1.0  # diffusers' rule
        if guided and uncond is None:
            raise ValueError("guidance_scale > 1 needs negative_encoder_hidden_states (the empty prompt's embedding)")
        if steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {steps}")
        table = self.table(request)

        scheduler = self.scheduler_class.from_config(self.scheduler_config)  # a request's own state
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(int(_scalar(request, "seed", 0)))  # noise, then the steps'
        latents = self.initial_latents(request, generator)
        extra = {}
        step_params = inspect.signature(scheduler.step).parameters
        if "eta" in step_params:
            extra["eta"] = 0.0
        if "generator" in step_params:
            extra["generator"] = generator
        latents = latents * scheduler.init_noise_sigma
        text = np.concatenate([uncond.astype(np.float32)[None], cond]) if guided else cond
        text = np.ascontiguousarray(text, dtype=self.dtype)  # the same every step: converted once
        rows = np.ascontiguousarray(np.broadcast_to(table, (text.shape[0], table.size)))  # a row per sample
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = torch.from_numpy(self.denoise(model_input.numpy(), float(t), text, rows))
            if guided:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_text - noise_uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return np.ascontiguousarray(latents[0].numpy().astype(np.float32))

    def table(self, request) -> np.ndarray:
        table = _optional(request, "bypass_schedule")
        spec = _optional(request, "bypass_spec")
        if table is not None and spec is not None:
            raise ValueError("send bypass_schedule or bypass_spec, not both")
        if spec is not None:
            from bypass_kernels import BypassSchedule

            text = spec.reshape(-1)[0]
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            table = BypassSchedule.parse(text, num_train_timesteps=len(self.default_table), files=False).table().numpy()
        if table is None:
            return self.default_table
        table = np.asarray(table, dtype=np.float32).reshape(-1)
        if table.shape != self.default_table.shape:
            raise ValueError(f"bypass_schedule: expected {len(self.default_table)} values, got {table.size}")
        return table

    def initial_latents(self, request, generator) -> torch.Tensor:
        latents = _optional(request, "latents")
        if latents is not None:
            return torch.from_numpy(np.array(latents, dtype=np.float32))[None]
        factor = self.settings["vae_scale_factor"]
        default = self.settings["sample_size"] * factor
        height = int(_scalar(request, "height", default))
        width = int(_scalar(request, "width", default))
        if height % factor or width % factor or height < factor or width < factor:
            raise ValueError(f"height and width: multiples of {factor} pixels, got {height}x{width}")
        shape = (1, self.settings["latent_channels"], height // factor, width // factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def denoise(self, sample: np.ndarray, t: float, text: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """One denoiser call; ``text`` and ``rows`` (the schedule, a row per sample) in the graph's form."""
        inputs = [
            pb_utils.Tensor("sample", np.ascontiguousarray(sample, dtype=self.dtype)),
            pb_utils.Tensor("timestep", np.full((sample.shape[0], 1), t, dtype=np.float32)),
            pb_utils.Tensor("encoder_hidden_states", text),
            pb_utils.Tensor("bypass_schedule", rows),
        ]
        request = pb_utils.InferenceRequest(model_name=self.denoiser, inputs=inputs, requested_output_names=["latent"])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.denoiser}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "latent").as_numpy().astype(np.float32)


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _required(request, name):
    array = _optional(request, name)
    if array is None:
        raise ValueError(f"{name} is required")
    return array


def _scalar(request, name, default):
    array = _optional(request, name)
    return default if array is None else array.reshape(-1)[0]
