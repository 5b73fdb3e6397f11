"""Pluggable samplers: one small class per sampler, each with one `step`, registered by name.

A new sampler is a new module here: subclass `Sampler`, implement `step`, decorate the class
with `@register` and import the module below; `infer.sampler` then accepts its name.
"""
from brainpaint.diffusion.samplers.base import SAMPLERS, Sampler, StepNoise, register
from brainpaint.diffusion.samplers.ddim import DDIMSampler
from brainpaint.diffusion.samplers.ddpm import DDPMSampler
from brainpaint.diffusion.samplers.dpm2m import DPMSolver2MSampler

__all__ = ["SAMPLERS", "Sampler", "StepNoise", "register", "DDIMSampler", "DDPMSampler", "DPMSolver2MSampler"]
