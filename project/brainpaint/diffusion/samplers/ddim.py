"""DDIM (Song et al. 2021): deterministic for eta = 0, ancestral-like noise for eta > 0."""
from __future__ import annotations

from typing import TYPE_CHECKING

from brainpaint.diffusion.samplers.base import Sampler, StepNoise, register

if TYPE_CHECKING:
    import torch


@register
class DDIMSampler(Sampler):
    name = "ddim"

    def step(self, pred: dict, x: torch.Tensor, t: torch.Tensor, i: int, noise: StepNoise) -> torch.Tensor:
        """x_{t-1} from the predicted x_0 and eps (Song et al. 2021, eq. 12)."""
        process = self.process
        # Coefficients in float64: 1 - abar is tiny near t = 0.
        abar = process.extract(process.alphas_cumprod, t, x, dtype="float64")
        abar_prev = process.extract(process.alphas_cumprod_prev, t, x, dtype="float64")
        sigma = self.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        dir_coef = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
        f32 = lambda c: c.to(x.dtype)  # noqa: E731
        out = pred["pred_x0"] * f32(abar_prev.sqrt()) + f32(dir_coef) * pred["eps"]
        if self.eta > 0 and i > 0:
            out = out + f32(sigma) * noise(x.shape)
        return out
