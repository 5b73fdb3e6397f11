"""Ancestral sampling (Ho et al. 2020) with the model's (learned-range) variance."""
from __future__ import annotations

import torch

from .base import Sampler, StepNoise, register


@register
class DDPMSampler(Sampler):
    name = "ddpm"

    def step(self, pred: dict, x: torch.Tensor, t: torch.Tensor, i: int, noise: StepNoise) -> torch.Tensor:
        x = pred["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * pred["log_variance"]) * noise(x.shape)
        return x
