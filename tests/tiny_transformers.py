"""Tiny diffusers transformers for the tests: the package's presets (bypass_kernels.transformer_presets)
under their family names ("flux" for "tiny-flux"), and a no-grad call."""

from __future__ import annotations

import torch

from bypass_kernels.transformer_presets import TRANSFORMER_PRESETS, build_transformer, transformer_inputs

CONFIGS = {name.removeprefix("tiny-"): preset for name, preset in TRANSFORMER_PRESETS.items()}
NAMES = tuple(CONFIGS)


def build(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    return build_transformer(f"tiny-{name}", seed=seed, **overrides)


def inputs(name: str, timestep, *, batch: int = 2, seed: int = 1) -> dict:
    """Keyword arguments for one forward; ``timestep`` in the units the pipeline passes (Flux and
    QwenImage: t/1000)."""
    return transformer_inputs(f"tiny-{name}", timestep, batch=batch, seed=seed)


def run(model, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]
