"""Sampling stacks of conditioned slices with the `infer` settings: one routine for inference
(`infer.inpainter.DiffusionInpainter`) and the training preview (`train.preview.Validator`), so
the validation scores a run logs are those of the fills users get.

`sample_slices` denoises conditioned slices [N, C, H, W] into x0 [N, H, W] (diffusion space):
`infer.batch_slices` at a time, each slice with its own noise (`noise.SliceNoise`), the
mirrored-slice average with `infer.flip_average`, bf16
autocast of the network on CUDA with `infer.bf16`. `run_settings` gives the settings that run
for a network's prediction type (eps-prediction weights need more than one step).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import nn

from brainpaint.conditioning.target import clip_bound
from brainpaint.config.settings import InferConfig
from brainpaint.diffusion.noise import SliceNoise

# Sampler steps of eps-prediction weights when the parameters leave `infer.steps` at its default
# (1, the conditional mean of x0/v weights): one step from x_T = 0 cannot reach it through eps.
EPS_STEPS = 16


def run_settings(inf: InferConfig, prediction: str, steps_chosen: bool) -> InferConfig:
    """`inf`, with EPS_STEPS steps for eps-prediction weights unless the steps were chosen."""
    if prediction != "eps" or steps_chosen or inf.steps >= EPS_STEPS:
        return inf
    return dataclasses.replace(inf, steps=EPS_STEPS)


def sample_slices(diffusion, model: nn.Module, cond: np.ndarray, inf: InferConfig, prior: str, device: torch.device,
                  seed: int, member: int = 0, keys: Optional[list] = None, channels_last: bool = False,
                  autocast: Optional[torch.dtype] = None) -> np.ndarray:
    """Denoise a stack of conditioned slices [N, C, H, W] -> x0 [N, H, W] (diffusion space),
    sampled as `inf` says, with the target encoding of `prior` (`data.prior`).

    `keys` name the slices (tuples of ints, default (index,)): slice i draws its noise from the
    seed (seed, member, keys[i]), whatever batch it lands in. `channels_last` feeds the network
    channels-last tensors (faster on the CPU with a channels-last model); `autocast` is the
    network's dtype (default: bf16 on CUDA with `infer.bf16`, else float32).
    """
    n = cond.shape[0]
    keys = keys if keys is not None else [(i,) for i in range(n)]
    batch = inf.batch_slices or n
    noise = SliceNoise(seed, member, device)
    if autocast is None and device.type == "cuda" and inf.bf16:
        autocast = torch.bfloat16  # the network only: the diffusion arithmetic stays float32
    out = np.empty((n,) + cond.shape[2:], dtype=np.float32)
    for start in range(0, n, batch):
        chunk = torch.from_numpy(np.ascontiguousarray(cond[start : start + batch])).to(device)
        if channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        draw = lambda c, noise_fn: diffusion.sample(  # noqa: E731
            model, c, sampler=inf.sampler, steps=inf.steps, eta=inf.eta, noise_fn=noise_fn,
            clip_denoised=clip_bound(prior), autocast=autocast, temperature=inf.temperature,
        )
        chunk_keys = keys[start : start + batch]
        x0 = draw(chunk, noise.for_slices(chunk_keys))
        if inf.flip_average:
            # The mirrored slices (first in-plane axis) with the mirrored noise, mirrored back:
            # a network that were exactly mirror-symmetric would give the same draw twice.
            turn = lambda t: t.flip(-2)  # noqa: E731
            mirrored = noise.for_slices(chunk_keys)
            x0m = draw(turn(chunk), lambda shape, g=None: turn(mirrored(shape, g)))
            x0 = 0.5 * (x0 + turn(x0m))
        out[start : start + len(chunk)] = x0.float().reshape(len(chunk), *cond.shape[2:]).cpu().numpy()
    return out
