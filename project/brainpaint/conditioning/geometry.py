"""Boxes between the image grid (240x240 in BraTS) and the network's slices; crop and paste.

A box is a tuple of slices over the leading axes of an array, `(slice_x, slice_y)` for the
in-plane boxes of the network. `crop` and `paste` are the one pair of functions that move data
between a grid and a box; a box may reach past the grid on any side (a small grid, a crop
near the edge, a blob placed at the brain's border): `crop` reads zeros there, like the
background they stand for, and `paste` writes back only the part that lies on the grid.

`full_slice_box` chooses the size x size window (224 for the BraTS grid) for whole-slice
networks. Only background may be cut: if the brain (plus mask) does not fit in the window, the
case is rejected with a CaseError instead of silently losing tissue. The window is centred on
the grid when that keeps everything (the usual 8:232 crop of BraTS), otherwise shifted just
enough to contain the brain.

`mask_box` chooses a square-ish crop around the mask for crop-based networks; `window_boxes`
covers the mask with windows of exactly the training crop size instead, and `window_weight`
blends them where they overlap.

`midline_shift` and `mirror_x` reflect a volume left-right about its own midline, so the
network can look at the other hemisphere.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import fft as sp_fft

from brainpaint.errors import CaseError

Box = tuple[slice, ...]

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


def box_size(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def cube(offset, size: int) -> Box:
    """The box of `size` voxels along every axis starting at `offset` (may be negative)."""
    return tuple(slice(int(o), int(o) + size) for o in offset)


def patch_shape(box: Box, size: int = 0, multiple: int = 1) -> tuple[int, int]:
    """Network patch shape for a box: each side at least `size`, rounded up to `multiple`."""
    return tuple(int(math.ceil(max(n, size) / multiple)) * multiple for n in box_size(box))  # type: ignore[return-value]


def _on_grid(box: Box, shape) -> tuple[Box, Box] | None:
    """(slices of the grid, matching slices of the box) of the part of `box` that lies on a grid
    of `shape`; None when they do not overlap."""
    grid, local = [], []
    for sl, n in zip(box, shape):
        lo, hi = max(sl.start, 0), min(sl.stop, n)
        if hi <= lo:
            return None
        grid.append(slice(lo, hi))
        local.append(slice(lo - sl.start, hi - sl.start))
    return tuple(grid), tuple(local)


def crop(array: np.ndarray, box: Box, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The `box` of `array` as a new array (trailing axes kept), zero where the box leaves the grid.

    `shape` grows the box at its high end to that size (the network patch of `patch_shape`).
    """
    array = np.asarray(array)
    if shape is not None:
        if any(n < s for n, s in zip(shape, box_size(box))):
            raise ValueError(f"patch {box_size(box)} is larger than the requested shape {tuple(shape)}")
        box = tuple(slice(s.start, s.start + n) for s, n in zip(box, shape))
    out = np.zeros(box_size(box) + array.shape[len(box):], dtype=array.dtype)
    part = _on_grid(box, array.shape)
    if part is not None:
        out[part[1]] = array[part[0]]
    return out


def paste(patch: np.ndarray, box: Box, out: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Write `patch` (box-sized, or padded past it) into `out` at `box`, in place, and return `out`.

    Only the part of the box on the grid is written; with `where` (grid-sized, bool) only the
    voxels where it is true.
    """
    part = _on_grid(box, out.shape)
    if part is None:
        return out
    grid, local = part
    values = np.asarray(patch)[local]
    if where is None:
        out[grid] = values
    else:
        region = out[grid]
        inside = np.asarray(where)[grid]
        region[inside] = values[inside]
    return out


def window_boxes(mask3d: np.ndarray, size: int, margin: int = 16, overlap: int | None = None) -> list[Box]:
    """`size` x `size` in-plane windows that together cover the mask (union over z) plus `margin`.

    One window centred on the mask when mask and margin fit in it; otherwise a grid of windows
    spread evenly over that extent, neighbours overlapping by at least `overlap` voxels
    (size // 4 by default). Windows may reach past the grid (`crop` reads zeros there), so each
    has exactly the size the network was trained on. An empty mask gives no window.
    """
    extent = _inplane_extent(mask3d)
    if extent is None:
        return []
    overlap = size // 4 if overlap is None else overlap
    starts = []
    for start, stop in extent:
        lo, hi = start - margin, stop + margin
        if hi - lo <= size:
            starts.append([int(math.floor((start + stop) / 2.0 - size / 2.0))])
            continue
        n = int(math.ceil((hi - lo - size) / max(1, size - overlap))) + 1
        starts.append([int(v) for v in np.linspace(lo, hi - size, n).round()])
    return [(slice(x, x + size), slice(y, y + size)) for x in starts[0] for y in starts[1]]


def _within(points: np.ndarray, box: Box, margin: int) -> np.ndarray:
    """Which in-plane `points` [N, 2] lie inside `box` less `margin` voxels on every side."""
    return np.all([(points[:, k] >= box[k].start + margin) & (points[:, k] < box[k].stop - margin) for k in range(2)], axis=0)


def slices_per_window(mask3d: np.ndarray, boxes: list[Box], margin: int) -> list[list[int]]:
    """For each in-plane window (`window_boxes`), the slices z that need it.

    On each slice, the fewest windows (chosen greedily, most uncovered voxels first) whose
    cores, the window less `margin` voxels on every side, hold all of the slice's mask voxels:
    every voxel is then filled at least `margin` voxels from some window's edge, as on the
    whole grid of windows, but a slice whose mask lies in one window's core is filled once.
    A voxel in no core (margins wider than the windows' overlap allows) is filled by every
    window that holds it. One window: every slice where it holds mask voxels.
    """
    mask3d = np.asarray(mask3d, dtype=bool)
    if len(boxes) == 1:
        return [[int(z) for z in np.flatnonzero(crop(mask3d, boxes[0]).any(axis=(0, 1)))]]
    out: list[list[int]] = [[] for _ in boxes]
    for z in np.flatnonzero(mask3d.any(axis=(0, 1))):
        points = np.argwhere(mask3d[:, :, z])
        cores = [_within(points, box, margin) for box in boxes]
        todo, chosen = np.ones(len(points), bool), set()
        while todo.any():
            gains = [-1 if i in chosen else int((core & todo).sum()) for i, core in enumerate(cores)]
            best = int(np.argmax(gains))
            if gains[best] <= 0:
                break
            chosen.add(best)
            todo &= ~cores[best]
        chosen |= {i for i, box in enumerate(boxes) if todo.any() and (_within(points, box, 0) & todo).any()}
        for i in sorted(chosen):
            out[i].append(int(z))
    return out


def window_weight(size: int) -> np.ndarray:
    """Blending weight of one window [size, size]: 1 over the middle half, falling linearly to
    1 / (size / 4) at the edges, so every voxel a window covers has some weight."""
    ramp = (np.minimum(np.arange(size), np.arange(size)[::-1]) + 1.0) / max(1.0, size / 4.0)
    ramp = np.minimum(1.0, ramp)
    return np.outer(ramp, ramp).astype(np.float32)


# --------------------------------------------------------------------------- left-right mirror
MAX_MIDLINE_SHIFT = 24


def mirror_x(volume: np.ndarray, shift: int) -> np.ndarray:
    """Reflect left-right (first axis) about the plane x = (X - 1 - shift) / 2.

    Voxel x of the result holds voxel X - 1 - x - shift of the input; voxels whose source lies
    off the grid are zero (background). Works on slices [X, Y] and volumes [X, Y, Z].
    """
    volume = np.asarray(volume)
    flipped = volume[::-1]
    out = np.zeros_like(volume)
    n = volume.shape[0]
    if abs(shift) >= n:  # a grid narrower than the shift: every source lies off it
        return out
    if shift >= 0:
        out[: n - shift] = flipped[shift:]
    else:
        out[-shift:] = flipped[: n + shift]
    return out


def midline_shift(volume: np.ndarray, known: np.ndarray, max_shift: int = MAX_MIDLINE_SHIFT,
                  notes: Optional[list[str]] = None) -> int:
    """The reflection `shift` (see `mirror_x`) under which a volume best matches itself.

    The correlation of the volume with its mirror image is taken over voxels known on both
    sides (`known`: brain outside the region to fill), on a grid subsampled by 2 in y and z,
    for every integer shift in [-max_shift, max_shift] (the midline plane to half a voxel).
    Fewer than 1000 common voxels, or a flat volume, give 0: the grid's centre (said in `notes`).

    Every shift at once: with K the known voxels and v the volume, the sums the correlation
    needs at shift s are convolutions along x taken at X - 1 - s (count K*K, sum Kv*K, sum of
    squares Kv²*K, cross term Kv*Kv; the mirrored side's sums equal the direct side's), so
    three FFTs along x (over the known voxels' box) replace a pass over the volume per shift.
    """
    known = np.asarray(known, dtype=bool)[:, ::2, ::2]
    n = known.shape[0]
    if not known.any():
        return 0
    # Only the known voxels' box counts; along x its start x0 moves every convolution by 2 x0.
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(known))
    k = known[box].astype(np.float64)
    vol = np.asarray(volume, dtype=np.float64)[:, ::2, ::2][box]
    vol = vol - vol[k > 0].mean()  # centred: the sums below then cancel less
    size = sp_fft.next_fast_len(2 * k.shape[0] - 1, real=True)
    kf, vf, sf = (sp_fft.rfft(a, size, axis=0) for a in (k, k * vol, k * vol * vol))
    total = lambda a, b: sp_fft.irfft((a * b).sum(axis=(1, 2)), size)  # noqa: E731
    count, first, square, cross = total(kf, kf), total(vf, kf), total(sf, kf), total(vf, vf)
    best, best_shift = -np.inf, 0
    for shift in range(-max_shift, max_shift + 1):
        at = n - 1 - shift - 2 * box[0].start
        if not 0 <= at < size or round(count[at]) < 1000:
            continue
        spread = square[at] - first[at] ** 2 / count[at]
        # FFT sums carry rounding: a spread within it of zero is a flat volume, no contrast to match
        if spread > 1e-9 * square[at] and (cross[at] - first[at] ** 2 / count[at]) / spread > best:
            best, best_shift = (cross[at] - first[at] ** 2 / count[at]) / spread, shift
    if best == -np.inf and notes is not None:
        notes.append("midline not found (under 1000 brain voxels known on both sides at every shift, or no "
                     "contrast there): the mirror channels reflect about the grid's centre")
    return best_shift
