"""In-plane boxes between the image grid (240x240 in BraTS) and the network's slices.

A box is a pair `(slice_x, slice_y)` over the first two volume axes, always inside the grid, so
`volume[box]` is valid. When the grid is smaller than the wanted patch, the box covers the whole
axis and `crop` zero-pads the patch at its high end to `patch_shape(...)`; `paste` undoes it.

`full_slice_box` chooses the size x size window (224 for the BraTS grid) for whole-slice
networks. Only background may be cut: if the brain (plus mask) does not fit in the window, the
case is rejected with a CaseError instead of silently losing tissue. The window is centred on
the grid when that keeps everything (the usual 8:232 crop of BraTS), otherwise shifted just
enough to contain the brain.

`mask_box` chooses a square-ish crop around the mask for crop-based networks.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CaseError

Box = tuple[slice, slice]


def _inplane_extent(array: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """[start, stop) of the non-zero voxels along x and y (union over z); None when empty."""
    a = np.asarray(array) != 0
    if a.ndim == 3:
        a = a.any(axis=2)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D or 3D array, got shape {np.shape(array)}")
    if not a.any():
        return None
    xs = np.flatnonzero(a.any(axis=1))
    ys = np.flatnonzero(a.any(axis=0))
    return (int(xs[0]), int(xs[-1]) + 1), (int(ys[0]), int(ys[-1]) + 1)


def _place(start: int, stop: int, side: int, n: int) -> slice:
    """A window of `side` voxels within [0, n) containing [start, stop), centred on it when
    possible; the whole axis when n <= side."""
    if n <= side:
        return slice(0, n)
    centre = (start + stop) / 2.0
    lo = int(math.floor(centre - side / 2.0))
    lo = min(max(lo, 0), n - side)
    return slice(lo, lo + side)


def full_slice_box(volume_or_mask_union: np.ndarray, size: int = 224, case_id: str = "?") -> Box:
    """The size x size in-plane window that keeps every non-zero voxel.

    Pass the union of the brain and the mask (e.g. `(voided != 0) | mask`); a 3D array is reduced
    over z. Raises CaseError when the non-zero voxels span more than `size` along x or y.
    """
    shape = np.shape(volume_or_mask_union)[:2]
    extent = _inplane_extent(volume_or_mask_union)
    box = []
    for axis, n in enumerate(shape):
        if n <= size:
            box.append(slice(0, n))
            continue
        centred = slice((n - size) // 2, (n - size) // 2 + size)
        if extent is None:
            box.append(centred)
            continue
        start, stop = extent[axis]
        if stop - start > size:
            raise CaseError(
                case_id,
                f"brain touches the crop border: it spans {stop - start} voxels along {'xy'[axis]} "
                f"({start}..{stop - 1}) but the network slice is {size}; it would be cut",
            )
        # the window start closest to the centred one that still contains [start, stop)
        lo = min(max(centred.start, stop - size), start)
        lo = min(max(lo, 0), n - size)
        box.append(slice(lo, lo + size))
    return box[0], box[1]


def mask_box(
    mask3d: np.ndarray,
    min_size: int = 64,
    multiple: int = 16,
    margin: int = 8,
    shape: tuple[int, ...] | None = None,
) -> Box:
    """A square in-plane box around the mask (union over z), grown by `margin` on each side,
    its side rounded up to a multiple of `multiple` and at least `min_size`, centred on the mask
    and shifted to stay inside the grid. On an axis shorter than the side, the box is the whole
    axis (use `patch_shape` + `crop` to pad). An empty mask gives a centred box."""
    shape = tuple(shape if shape is not None else np.shape(mask3d))[:2]
    extent = _inplane_extent(mask3d)
    if extent is None:
        extent = tuple((n // 2, n // 2) for n in shape)
    longest = max(stop - start for start, stop in extent) + 2 * margin
    side = max(min_size, int(math.ceil(longest / multiple)) * multiple)
    sx = _place(*extent[0], side, shape[0])
    sy = _place(*extent[1], side, shape[1])
    return sx, sy


def box_size(box: Box) -> tuple[int, int]:
    return box[0].stop - box[0].start, box[1].stop - box[1].start


def patch_shape(box: Box, size: int = 0, multiple: int = 1) -> tuple[int, int]:
    """Network patch shape for a box: each side at least `size`, rounded up to `multiple`."""
    return tuple(int(math.ceil(max(n, size) / multiple)) * multiple for n in box_size(box))  # type: ignore[return-value]


def crop(array: np.ndarray, box: Box, shape: tuple[int, int] | None = None) -> np.ndarray:
    """`array[box]` (any trailing axes kept), zero-padded at the high end to `shape`."""
    patch = np.asarray(array)[box[0], box[1]]
    if shape is None or tuple(shape) == patch.shape[:2]:
        return patch
    if shape[0] < patch.shape[0] or shape[1] < patch.shape[1]:
        raise ValueError(f"patch {patch.shape[:2]} is larger than the requested shape {tuple(shape)}")
    pad = [(0, shape[0] - patch.shape[0]), (0, shape[1] - patch.shape[1])] + [(0, 0)] * (patch.ndim - 2)
    return np.pad(patch, pad)


def paste(patch: np.ndarray, box: Box, out: np.ndarray) -> np.ndarray:
    """Write a (possibly padded) patch back into `out[box]` in place and return `out`."""
    w, h = box_size(box)
    out[box[0], box[1]] = np.asarray(patch)[:w, :h]
    return out
