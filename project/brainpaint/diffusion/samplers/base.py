"""The step interface every sampler implements, and the registry that names them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

if TYPE_CHECKING:  # samplers compute with tensor methods only: importing them loads no torch
    import torch

# Draws noise of a shape for one reverse step, already scaled by the sampling temperature.
StepNoise = Callable[[tuple], "torch.Tensor"]

SAMPLERS: dict[str, type["Sampler"]] = {}


def register(cls: type["Sampler"]) -> type["Sampler"]:
    """Class decorator: make a sampler available under its `name` (`infer.sampler`)."""
    SAMPLERS[cls.name] = cls
    return cls


class Sampler:
    """Reverse steps on one (respaced) diffusion process, one `step` per timestep.

    `GaussianDiffusion.sample` calls `step` for i = N-1, ..., 0 with the network's prediction at
    x_i: `pred` holds `pred_x0`, `eps`, the posterior `mean` and the model's `log_variance`
    (see `GaussianDiffusion.p_mean_variance_from_output`). A sampler instance serves one
    trajectory, so multistep samplers may keep state between calls.
    """

    name: ClassVar[str] = ""

    def __init__(self, process, eta: float = 0.0):
        self.process = process  # a GaussianDiffusion: schedule arrays indexed by i
        self.eta = eta

    def step(self, pred: dict, x: torch.Tensor, t: torch.Tensor, i: int, noise: StepNoise) -> torch.Tensor:
        """x at step i-1 (x_0 when i == 0) from x at step i."""
        raise NotImplementedError
