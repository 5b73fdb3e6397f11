"""Samplers against saved reference trajectories: refactoring the sampling loop must not change
what it draws.

`tests/data/sampler_reference.pt` holds the outputs of `GaussianDiffusion.sample` for the cases
below, made with the if/elif sampling loop that preceded the pluggable samplers
(`python tests/test_sampler_reference.py` rewrites it from the current code). The network is a
fixed elementwise function of its input, so the outputs do not depend on convolution kernels
or thread counts. They are bit-identical on the machine that wrote the reference, but not on
every CPU: the transcendental functions under the noise draws and the schedule (SIMD log,
sin, cos, exp) may round the last bit differently, and the reverse steps amplify such a
difference (one ulp in every noise draw moves outputs by up to 6e-6; an AMD EPYC differs from
the reference by up to 2e-7). Outputs must therefore agree to ATOL = 1e-5, while a schedule
off by 1e-3 (relative) or a changed noise order moves every case by far more (checked below,
so the tolerance cannot hide a real change).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from brainpaint.config.settings import DiffusionConfig
from brainpaint.diffusion.process import GaussianDiffusion

REFERENCE = Path(__file__).resolve().parent / "data" / "sampler_reference.pt"
ATOL = 1e-5  # outputs lie in [-1, 1]; about 100 float32 ulps at 1


class _Elementwise(nn.Module):
    """eps (and v) as fixed elementwise polynomials of x_t and the conditioning."""

    def __init__(self, learn_sigma: bool = True):
        super().__init__()
        self.learn_sigma = learn_sigma

    def forward(self, x, t):
        b, m, xt = x[:, 0:1], x[:, 1:2], x[:, -1:]
        scale = (t.float() / 1000.0).view(-1, 1, 1, 1)
        eps = 0.8 * xt + 0.3 * b - 0.2 * m * xt + 0.1 * b * xt * scale
        if not self.learn_sigma:
            return eps
        v = (0.5 * xt + 0.2 * b - 0.3 * scale).clamp(-1.0, 1.0)
        return torch.cat([eps, v], dim=1)


def _inputs():
    gen = torch.Generator().manual_seed(1234)
    cond = torch.randn(2, 2, 8, 8, generator=gen)
    cond[:, 1] = (cond[:, 1] > 0).float()
    return cond


def _shared_noise(shape, generator):
    return torch.randn((1, *shape[1:]), generator=generator).expand(shape).clone()


# name -> keyword arguments of GaussianDiffusion.sample (plus "learn_sigma" for the process)
CASES = {
    "ddim_eta0": dict(sampler="ddim", steps=7),
    "ddim_eta05": dict(sampler="ddim", steps=7, eta=0.5),
    "ddim_eta1_temp05_clip2": dict(sampler="ddim", steps=5, eta=1.0, temperature=0.5, clip_denoised=2.0),
    "ddim_temp0": dict(sampler="ddim", steps=9, temperature=0.0),
    "ddpm": dict(sampler="ddpm", steps=6),
    "ddpm_temp07_noclip": dict(sampler="ddpm", steps=6, temperature=0.7, clip_denoised=False),
    "ddpm_1000": dict(sampler="ddpm", steps=1000),
    "ddpm_fixed_variance": dict(sampler="ddpm", steps=6, learn_sigma=False),
    "ddpm_shared_noise": dict(sampler="ddpm", steps=5, temperature=0.8, noise_fn=_shared_noise),
    "dpm2m": dict(sampler="dpm2m", steps=8),
    "dpm2m_20": dict(sampler="dpm2m", steps=20, clip_denoised=False),
    "dpm2m_temp0_clip2": dict(sampler="dpm2m", steps=3, temperature=0.0, clip_denoised=2.0),
}


def run_case(name: str, beta_end: float = 0.02, **overrides) -> torch.Tensor:
    """The case's output; `beta_end` and `overrides` (sample keyword arguments) perturb it."""
    kwargs = dict(CASES[name], **overrides)
    learn_sigma = kwargs.pop("learn_sigma", True)
    cond = _inputs()
    diffusion = GaussianDiffusion(DiffusionConfig(learn_sigma=learn_sigma, beta_end=beta_end))
    return diffusion.sample(
        _Elementwise(learn_sigma), cond, generator=torch.Generator().manual_seed(7), **kwargs
    )


def _max_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item()


def test_every_sampler_reproduces_its_reference():
    reference = torch.load(REFERENCE, weights_only=True)
    assert sorted(reference) == sorted(CASES)
    for name in CASES:
        out = run_case(name)
        assert out.dtype == torch.float32 and out.shape == (2, 1, 8, 8)
        difference = _max_difference(out, reference[name])
        assert difference <= ATOL, f"{name}: max difference {difference}"


def test_the_tolerance_still_catches_a_changed_schedule_or_noise_order():
    reference = torch.load(REFERENCE, weights_only=True)
    for name in CASES:
        assert _max_difference(run_case(name, beta_end=0.02 * 1.001), reference[name]) > 10 * ATOL, name

    def flipped(shape, generator):  # the same draws, in the other order along the batch
        return torch.randn(shape, generator=generator).flip(0)

    for name in ("ddpm", "ddim_eta05", "dpm2m"):
        assert _max_difference(run_case(name, noise_fn=flipped), reference[name]) > 10 * ATOL, name


if __name__ == "__main__":
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: run_case(name) for name in CASES}, REFERENCE)
    print(f"wrote {REFERENCE}", file=sys.stderr)
