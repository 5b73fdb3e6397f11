"""Inference: predictors, the diffusion inpainter, smoothing, the batch runner, reports, progress."""
