"""The Gaussian post-filter of the diffusion fill (sigma 1.075 in the paper)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_in_mask(volume: np.ndarray, mask: np.ndarray, sigma: float, border: int) -> np.ndarray:
    """Gaussian-filter `volume` and keep the filtered values only inside the mask dilated by `border`.

    Sampled slices are independent 2D draws; a light 3D filter (sigma 1.075 in the paper)
    removes slice-to-slice flicker and pulls the fill towards the conditional mean. Outside the
    region the volume is untouched. Only the bounding box of the region (plus the kernel radius)
    is filtered, which gives the same values as filtering the whole volume at a fraction of
    the cost.
    """
    if sigma <= 0:
        return volume
    region = ndimage.binary_dilation(mask, iterations=border) if border > 0 else mask
    if not region.any():
        return volume
    radius = int(4.0 * sigma + 0.5)  # scipy's kernel radius for truncate=4
    idx = np.argwhere(region)
    lo = np.maximum(idx.min(0) - radius, 0)
    hi = np.minimum(idx.max(0) + radius + 1, volume.shape)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    filtered = ndimage.gaussian_filter(volume[sub].astype(np.float32), sigma=sigma, truncate=4.0)
    out = volume.copy()
    view = out[sub]
    view[region[sub]] = filtered[region[sub]]
    return out
