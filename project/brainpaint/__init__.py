"""brainpaint: denoising-diffusion inpainting of healthy brain tissue (BraTS 2023)."""

__version__ = "0.1.0"
