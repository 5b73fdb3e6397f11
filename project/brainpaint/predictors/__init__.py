"""Predictors: `(case data, seed) -> Prediction`, the harmonic fill and the diffusion model.

`make_predictor(cfg)` builds the one `infer.method` asks for; `batch.run_infer` calls it once
per case. `base` holds `Prediction` and the harmonic fill, `diffusion` the diffusion predictor
(`DiffusionInpainter`).
"""
from __future__ import annotations

from ..config import Config
from .base import Prediction, Predictor, harmonic_predictor

__all__ = ["Prediction", "Predictor", "harmonic_predictor", "make_predictor"]


def make_predictor(cfg: Config) -> Predictor:
    """The predictor of `infer.method`."""
    if cfg.infer.method == "harmonic":
        return harmonic_predictor
    # Imported only for the diffusion method: torch and the network code take seconds to load
    # and the harmonic fill needs neither.
    from .diffusion import DiffusionInpainter

    return DiffusionInpainter(cfg)
