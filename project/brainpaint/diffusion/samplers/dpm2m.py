"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the DDIM ODE."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from brainpaint.diffusion.samplers.base import Sampler, StepNoise, register

if TYPE_CHECKING:
    import torch


def half_log_snr(abar: float) -> float:
    """log(alpha / sigma) of a noise level abar = alpha^2 = 1 - sigma^2."""
    return 0.5 * math.log(abar / (1.0 - abar))


@register
class DPMSolver2MSampler(Sampler):
    """Deterministic; data (x0) prediction; keeps the previous step's x0 prediction.

    First order (= DDIM with eta 0) on the first step and on the last two: the step into the
    lowest noise level spans a large log-SNR interval, where extrapolating the x0 predictions
    overshoots (the "lower order final" of the DPM-Solver paper), and the final step to t = 0
    (infinite log-SNR) returns the x0 prediction itself.
    """

    name = "dpm2m"

    def __init__(self, process, eta: float = 0.0):
        super().__init__(process, eta)
        self.x0_prev: Optional[torch.Tensor] = None  # the x0 prediction of step i+1

    def step(self, pred: dict, x: torch.Tensor, t: torch.Tensor, i: int, noise: StepNoise) -> torch.Tensor:
        x0 = pred["pred_x0"]
        out = x0 if i == 0 else self._update(x0, x, i)
        self.x0_prev = x0
        return out

    def _update(self, x0: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        acp = self.process.alphas_cumprod
        abar_next = float(self.process.alphas_cumprod_prev[i])
        alpha_next, sigma_next = math.sqrt(abar_next), math.sqrt(1.0 - abar_next)
        sigma_now = math.sqrt(1.0 - float(acp[i]))
        lam_now, lam_next = half_log_snr(float(acp[i])), half_log_snr(abar_next)
        h = lam_next - lam_now
        data = x0
        if self.x0_prev is not None and i > 1:
            r = (lam_now - half_log_snr(float(acp[i + 1]))) / h
            data = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self.x0_prev
        return (sigma_next / sigma_now) * x - alpha_next * math.expm1(-h) * data
