"""Intensity mapping between a case's input scale and the network's [0, 1] scale.

Why these numbers. The official BraTS 2023 inpainting metric (`inpainting.challenge_metrics_2023.
generate_metrics`) normalises both the prediction and the ground truth with the voided image:
`lo = max(p0.5, 0)`, `hi = p99.5`, percentiles over *all* voxels of the voided volume (zero
background and the zeroed mask region included), then clips to [lo, hi] and scales to [0, 1].
SSIM, PSNR and MSE are computed on that scale.

`IntensityMap.fit` computes exactly the same `lo`/`hi` from the voided image the network sees, so
the network's [0, 1] output *is* the metric's scale: training on it optimises the quantity that
is scored, nothing the network produces above `hi` or below `lo` could count anyway, and the
inverse `denormalize` maps a network output y to `lo + y * (hi - lo)`, which the metric maps back
to y exactly (up to the rounding of the on-disk dtype). Percentiles are computed on float32 data,
as the metric does on its float32 tensors.

A degenerate volume (hi <= lo, e.g. almost all background) falls back to hi = max(voided), then
to hi = lo + 1, so the mapping is always invertible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

P_LOW = 0.5
P_HIGH = 99.5


def metric_window(volume: np.ndarray) -> tuple[float, float]:
    """`(max(p0.5, 0), p99.5)` over all voxels of `volume` as float32: the official metric's window."""
    p_lo, p_hi = np.percentile(np.asarray(volume, dtype=np.float32), [P_LOW, P_HIGH])
    return max(float(p_lo), 0.0), float(p_hi)


@dataclass(frozen=True)
class IntensityMap:
    lo: float
    hi: float

    @classmethod
    def fit(cls, voided: np.ndarray) -> "IntensityMap":
        lo, hi = metric_window(voided)
        if hi <= lo:
            hi = float(np.max(voided))
        if hi <= lo:
            hi = lo + 1.0
        return cls(lo, hi)

    @property
    def scale(self) -> float:
        return self.hi - self.lo

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Input scale -> [0, 1] (clipped), float32."""
        y = (np.asarray(x, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.scale)
        return np.clip(y, 0.0, 1.0).astype(np.float32, copy=False)

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """[0, 1] -> input scale, float32 (values outside [0, 1] are mapped linearly)."""
        return (np.asarray(y, dtype=np.float32) * np.float32(self.scale) + np.float32(self.lo)).astype(np.float32, copy=False)
