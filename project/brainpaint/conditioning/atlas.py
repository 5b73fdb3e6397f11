"""A population atlas: where tissue usually lies, as an extra input beside the harmonic fill.

The harmonic fill knows only the mask's border, so inside a large mask it cannot tell grey
matter or CSF from white matter; the network has to guess them from the slice around. Brains
on the BraTS grid all face the same way, so the mean of many brains, each scaled onto one
canonical box by its own brain bounding box, shows where the insula, the ventricles and the
deep grey matter usually lie. `build_atlas` computes that mean (intensities on the metric's
[0, 1] scale, `intensity.IntensityMap`) on an `ATLAS_SHAPE` grid.

For one (voided volume, mask), `atlas_residual` scales the atlas onto the case's own brain
box, matches its intensities to the known brain voxels by a least-squares line, and returns
what the atlas holds inside the mask beyond its own harmonic fill: the structure a harmonic
fill of the case misses, as the population would draw it. With `model.atlas` the network
sees that residual as one more input channel (`dataset.slice_conditioning`), and the atlas
itself travels in the weights file as the network's `atlas` buffer.

Alignment (`data.atlas_fit`). "box": the box scaling is the whole alignment, so the atlas is
blurred by the spread of brain shapes and misplaced by every head's tilt. "affine": after the
box scaling, `register` fits a 9-parameter affine map (shift, scale and rotation about the
brain's centre) that best correlates the atlas with the case's known brain voxels on a 3-mm
grid (scipy's bounded Powell search), and `build_atlas` averages the training brains each
registered onto the box mean, a sharper atlas. Either way the network learns how far to trust
the residual. The atlas's axes are
RAS (`brats_io.to_ras` turns each training brain by its affine), the frame the network works
in (`CaseData.in_ras`), so it meets every case the right way round however the case is stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage, optimize

from brainpaint.conditioning.harmonic import harmonic_fill

ATLAS_SHAPE = (120, 144, 120)  # about 1.2 mm over an adult brain's bounding box
FIT_STRIDE = 7  # every 7th known brain voxel fits the intensity line
ATLAS_FITS = ("box", "affine")
REGISTER_STEP = 3  # voxels between the points `register` compares (3 mm on the BraTS grid)
# Bounds of `register`'s parameters: shift (voxels), log scale, rotation (radians) per axis.
REGISTER_BOUNDS = [(-20.0, 20.0)] * 3 + [(-0.2, 0.2)] * 3 + [(-0.35, 0.35)] * 3


def brain_box(brain: np.ndarray) -> Optional[tuple[slice, slice, slice]]:
    """The bounding box of the non-zero voxels of `brain` [X, Y, Z]; None when it is empty."""
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        return None
    box = []
    for axis in range(3):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _resize(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of `array` onto `shape` (corners aligned by scipy's zoom)."""
    zoom = [n / s for n, s in zip(shape, array.shape)]
    out = ndimage.zoom(np.asarray(array, np.float32), zoom, order=1, grid_mode=False)
    return out[tuple(slice(0, n) for n in shape)]


def to_canonical(volume: np.ndarray, box) -> np.ndarray:
    """The contents of `box` resampled onto `ATLAS_SHAPE`."""
    return _resize(np.asarray(volume, np.float32)[box], ATLAS_SHAPE)


def from_canonical(atlas: np.ndarray, box, shape: tuple[int, ...]) -> np.ndarray:
    """The atlas resampled onto `box` of a zero volume of `shape`."""
    out = np.zeros(shape, np.float32)
    out[box] = _resize(atlas, tuple(s.stop - s.start for s in box))
    return out


# --------------------------------------------------------------------------- registration
@dataclass(frozen=True)
class Placement:
    """Where the atlas lies on a case grid: the box scaling of the brain's bounding `box`, after
    `affine` (A, t: case voxel x -> A x + t, both in case voxels; identity for the box fit)."""

    box: tuple
    A: np.ndarray = field(default_factory=lambda: np.eye(3))
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def _scale(self) -> tuple[np.ndarray, np.ndarray]:
        s = np.array([(n - 1) / max(b.stop - b.start - 1, 1) for n, b in zip(ATLAS_SHAPE, self.box)])
        return s, -s * np.array([b.start for b in self.box], np.float64)

    def to_atlas(self, points: np.ndarray) -> np.ndarray:
        """Atlas-grid coordinates of case voxel coordinates `points` [N, 3]."""
        s, u = self._scale()
        return (points @ self.A.T + self.t) * s + u

    def to_case(self, points: np.ndarray) -> np.ndarray:
        """Case voxel coordinates of atlas-grid coordinates `points` [N, 3] (`to_atlas` undone)."""
        s, u = self._scale()
        return ((points - u) / s - self.t) @ np.linalg.inv(self.A).T


def _affine(params: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, t) of shift params[0:3], log scales params[3:6] and rotations params[6:9] (about the
    x, y and z axes) about `centre`."""
    rot = np.eye(3)
    for axis, angle in enumerate(params[6:9]):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rot = turn @ rot
    A = rot @ np.diag(np.exp(params[3:6]))
    return A, centre - A @ centre + params[0:3]


def _sample(atlas: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(atlas, coords.T, order=1, mode="nearest")


def register(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray,
             notes: Optional[list[str]] = None) -> Optional[Placement]:
    """The affine placement of the atlas that best correlates with the case's known brain
    voxels (`brain` without the `mask` grown by 2 voxels; `b` on any linear scale), searched
    from the box placement; the box placement where the search does not improve on it; None
    for an empty brain. `notes` is told of every fallback and of a search that did not converge."""
    box = brain_box(brain)
    if box is None:
        return None
    known = np.asarray(brain, bool) & ~ndimage.binary_dilation(np.asarray(mask, bool), iterations=2)
    grid = np.zeros(known.shape, bool)
    grid[::REGISTER_STEP, ::REGISTER_STEP, ::REGISTER_STEP] = True
    points = np.argwhere(known & grid).astype(np.float64)
    if len(points) < 100:
        _note(notes, f"atlas registration: {len(points)} known brain voxels on its {REGISTER_STEP}-voxel grid, "
                     "under 100: the atlas is placed by the brain's bounding box")
        return Placement(box)
    y = np.asarray(b, np.float64)[tuple(points.T.astype(int))]
    y -= y.mean()
    centre = np.array([(s.start + s.stop - 1) / 2.0 for s in box])

    def cost(params: np.ndarray) -> float:  # 1 - correlation of atlas and case at the points
        A, t = _affine(params, centre)
        a = _sample(atlas, Placement(box, A, t).to_atlas(points)).astype(np.float64)
        a -= a.mean()
        r = float(a @ y) / (float(np.sqrt((a @ a) * (y @ y))) + 1e-12)
        return 1.0 - r if np.isfinite(r) else 2.0

    start = np.zeros(9)
    found = optimize.minimize(cost, start, method="Powell", bounds=REGISTER_BOUNDS,
                              options={"xtol": 1e-3, "ftol": 1e-5, "maxfev": 3000})
    if not found.success:
        _note(notes, f"atlas registration did not converge ({found.message.rstrip('.')}): its best placement is used")
    if not found.fun < cost(start):
        _note(notes, "atlas registration found no placement better than the brain's bounding box: the box is used")
        return Placement(box)
    return Placement(box, *_affine(found.x, centre))


def _note(notes: Optional[list[str]], line: str) -> None:
    if notes is not None:
        notes.append(line)


def place(atlas: np.ndarray, placement: Placement, shape: tuple[int, ...]) -> np.ndarray:
    """The atlas resampled onto a case grid of `shape` by `placement`: the box fit's
    `from_canonical` (zero outside the box) for an identity affine, else every voxel of the
    grid sampled (edge values beyond the atlas)."""
    if np.array_equal(placement.A, np.eye(3)) and not placement.t.any():
        return from_canonical(atlas, placement.box, shape)
    points = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    return _sample(atlas, placement.to_atlas(points)).reshape(shape).astype(np.float32)


def case_atlas(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray, fit: str = "box",
               notes: Optional[list[str]] = None) -> Optional[np.ndarray]:
    """The atlas on the case grid by the `fit` of `data.atlas_fit` (None for an empty brain);
    `notes` as in `register`."""
    if fit not in ATLAS_FITS:
        raise ValueError(f"atlas fit must be one of {ATLAS_FITS}, got {fit!r}")
    placement = register(atlas, b, mask, brain, notes) if fit == "affine" else (
        None if brain_box(brain) is None else Placement(brain_box(brain)))
    return None if placement is None else place(atlas, placement, np.shape(mask))


def atlas_residual(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray, fit: str = "box",
                   notes: Optional[list[str]] = None) -> np.ndarray:
    """What the atlas holds inside `mask` beyond its own harmonic fill, on the case's scale.

    `b` is the case's normalised volume (known voxels are what counts), `brain` its brain
    (non-zero voided voxels or the mask), `fit` how the atlas is placed (`case_atlas`). Zero
    outside the mask. Returns float32 [X, Y, Z]. `notes` is told of every fallback.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    scaled = case_atlas(atlas, b, mask, brain, fit, notes)
    if scaled is None:
        _note(notes, "atlas not placed (no brain voxels): no atlas residual is used")
        return out
    known = np.asarray(brain, bool) & ~mask
    a, y = scaled[known][::FIT_STRIDE], np.asarray(b, np.float32)[known][::FIT_STRIDE]
    if a.size >= 2 and np.ptp(a) > 0:
        slope, offset = np.polyfit(a.astype(np.float64), y.astype(np.float64), 1)
        scaled = (scaled * np.float32(slope) + np.float32(offset)).astype(np.float32)
    solver: list[str] = []
    out[mask] = scaled[mask] - harmonic_fill(scaled, mask, notes=solver)[mask]
    for line in solver:
        _note(notes, f"atlas residual: {line}")
    return out
