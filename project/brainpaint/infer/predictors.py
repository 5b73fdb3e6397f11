"""Predictors: `(case data, seed) -> Prediction`, the harmonic fill and the diffusion model.

`make_predictor(cfg)` builds the one `infer.method` asks for; `infer.batch.run_infer` calls it
once per case. The diffusion predictor itself is `infer.inpainter.DiffusionInpainter`, the
harmonic one `infer.prediction.harmonic_predictor`.
"""
from __future__ import annotations

import os

from brainpaint.config.settings import Config
from brainpaint.infer.prediction import Predictor, harmonic_predictor


def make_predictor(cfg: Config) -> Predictor:
    """The predictor of `infer.method`."""
    if cfg.infer.method == "harmonic":
        return harmonic_predictor
    # torch's OpenMP threads sleep at once when they wait instead of spinning (unless the
    # environment says otherwise; it counts only if torch is not loaded yet): beside the thread
    # that prepares the next case, or any other job, spinning threads take the cores from the
    # ones with work, and the network ran 2 to 3 times slower (docs/RESULTS.md, CPU speed).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Imported only for the diffusion method: torch and the network code take seconds to load
    # and the harmonic fill needs neither.
    from brainpaint.infer.inpainter import DiffusionInpainter  # noqa: PLC0415

    return DiffusionInpainter(cfg)
