"""Ancestral sampling (Ho et al. 2020) with the model's (learned-range) variance."""
from __future__ import annotations

from typing import TYPE_CHECKING

from brainpaint.diffusion.samplers.base import Sampler, StepNoise, register

if TYPE_CHECKING:
    import torch


@register
class DDPMSampler(Sampler):
    name = "ddpm"

    def step(self, pred: dict, x: torch.Tensor, t: torch.Tensor, i: int, noise: StepNoise) -> torch.Tensor:
        x = pred["mean"]
        if i > 0:
            x = x + (0.5 * pred["log_variance"]).exp() * noise(x.shape)
        return x
