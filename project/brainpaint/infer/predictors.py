"""Predictors: `(case data, seed) -> Prediction`, the harmonic fill and the diffusion model.

`make_predictor(cfg)` builds the one `infer.method` asks for; `infer.batch.run_infer` calls it
once per case. The diffusion predictor itself is `infer.inpainter.DiffusionInpainter`, the
harmonic one `infer.prediction.harmonic_predictor`.
"""
from __future__ import annotations

from brainpaint.config.settings import Config
from brainpaint.infer.prediction import Predictor, harmonic_predictor


def make_predictor(cfg: Config) -> Predictor:
    """The predictor of `infer.method`."""
    if cfg.infer.method == "harmonic":
        return harmonic_predictor
    # Imported only for the diffusion method: torch and the network code take seconds to load
    # and the harmonic fill needs neither.
    from brainpaint.infer.inpainter import DiffusionInpainter  # noqa: PLC0415

    return DiffusionInpainter(cfg)
