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
grid (scipy's bounded L-BFGS-B with the exact gradient of the correlation, first on a 6-mm grid
against a blurred atlas; well under a CPU second a case, where the Powell search it replaced
took 10 to 60), and `build_atlas` averages the training brains each registered onto the box
mean, a sharper atlas. The atlas is then resampled only where it is read: around the mask and
at the known voxels that fit its intensity line. Either way the network learns how far to trust
the residual. The atlas's axes are
RAS (`brats_io.to_ras` turns each training brain by its affine), the frame the network works
in (`CaseData.in_ras`), so it meets every case the right way round however the case is stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage, optimize
from threadpoolctl import threadpool_limits

from brainpaint.conditioning.harmonic import harmonic_fill, mask_support
from brainpaint.stages import Stages

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
    # Whether the registration that found it met its tolerances (always true for the box fit),
    # and its optimiser iterations over all levels.
    converged: bool = True
    iterations: int = 0

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


def _rotations(angles) -> list[np.ndarray]:
    """The turns about the x, y and z axes by `angles` (applied in that order)."""
    turns = []
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        turns.append(turn)
    return turns


def _affine(params: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, t) of shift params[0:3], log scales params[3:6] and rotations params[6:9] (about the
    x, y and z axes) about `centre`."""
    t0, t1, t2 = _rotations(params[6:9])
    A = t2 @ t1 @ t0 @ np.diag(np.exp(params[3:6]))
    return A, centre - A @ centre + params[0:3]


def _affine_derivatives(params: np.ndarray) -> list[np.ndarray]:
    """dA/dparams[3:9] (3x3 each): the log scales, then the rotations (`_affine`)."""
    turns = _rotations(params[6:9])
    scale = np.diag(np.exp(params[3:6]))
    rot = turns[2] @ turns[1] @ turns[0]
    out = [rot @ scale @ np.diag(np.eye(3)[k]) for k in range(3)]
    for axis in range(3):
        c, s = np.cos(params[6 + axis]), np.sin(params[6 + axis])
        i, j = [a for a in range(3) if a != axis]
        turn = np.zeros((3, 3))
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = -s, -c, c, -s
        parts = list(turns)
        parts[axis] = turn
        out.append(parts[2] @ parts[1] @ parts[0] @ scale)
    return out


def _sample(atlas: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(atlas, coords.T, order=1, mode="nearest")


def _sample_with_gradient(atlas: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear values of `atlas` at `coords` [N, 3] (edge values beyond it, as `_sample`) and
    their exact gradient [N, 3] (zero along an axis where the point lies beyond the edge)."""
    top = np.array(atlas.shape) - 1
    clamped = np.clip(coords, 0, top)
    low = np.minimum(np.floor(clamped).astype(np.intp), top - 1)
    f = clamped - low
    strides = np.array([atlas.shape[1] * atlas.shape[2], atlas.shape[2], 1])
    base = low @ strides
    flat = atlas.ravel()
    v = {c: flat[base + int(np.dot(c, strides))].astype(np.float64) for c in np.ndindex(2, 2, 2)}
    w = [(1.0 - f[:, k], f[:, k]) for k in range(3)]
    value = sum(v[c] * w[0][c[0]] * w[1][c[1]] * w[2][c[2]] for c in v)
    grad = np.empty_like(coords)
    for k in range(3):
        others = [a for a in range(3) if a != k]
        total = 0.0
        for c in v:
            if c[k] == 0:
                hi = list(c)
                hi[k] = 1
                total = total + (v[tuple(hi)] - v[c]) * w[others[0]][c[others[0]]] * w[others[1]][c[others[1]]]
        grad[:, k] = total * ((coords[:, k] >= 0) & (coords[:, k] <= top[k]))
    return value, grad


# Registration: scipy's L-BFGS-B with the exact gradient of the correlation, coarse to fine.
# Levels (grid step between the compared points in case voxels, Gaussian blur of the atlas in
# atlas voxels): the blurred coarse level widens the basin, the fine one is the 3-mm fit.
REGISTER_LEVELS = ((6, 2.0), (REGISTER_STEP, 0.0))
# Units of the search: a unit moves the brain's surface by a few voxels in every parameter.
REGISTER_UNITS = np.array([4.0] * 3 + [0.05] * 3 + [0.05] * 3)
# Stop when an iteration improves the correlation by less than REGISTER_FTOL (relative) or the
# projected gradient (per unit above) falls below REGISTER_GTOL; at most REGISTER_MAXITER
# iterations per level. Anything else (the limit, a failed line search) is non-convergence,
# reported in `Placement.converged`.
REGISTER_FTOL = 1e-7
REGISTER_GTOL = 1e-5
REGISTER_MAXITER = 100


def _correlation_cost(atlas: np.ndarray, box, points: np.ndarray, y: np.ndarray, centre: np.ndarray):
    """cost(x) -> (1 - correlation of the atlas placed by parameters `x * REGISTER_UNITS` with
    the centred case values `y` at `points`, its gradient in x)."""
    scale = Placement(box)._scale()[0]
    offset = points - centre
    yy = float(y @ y)

    def cost(x: np.ndarray) -> tuple[float, np.ndarray]:
        params = x * REGISTER_UNITS
        A, t = _affine(params, centre)
        a, grad = _sample_with_gradient(atlas, Placement(box, A, t).to_atlas(points))
        a -= a.mean()
        aa = float(a @ a)
        if aa <= 0 or yy <= 0:
            return 2.0, np.zeros_like(x)
        r = float(a @ y) / np.sqrt(aa * yy)
        weight = y / np.sqrt(aa * yy) - r * a / aa  # d r / d a (centring included)
        h = grad * scale * weight[:, None]  # d r / d (case-frame position of each point)
        moments = h.T @ offset
        d = np.concatenate([h.sum(axis=0), [float(np.sum(D * moments)) for D in _affine_derivatives(params)]])
        return 1.0 - r, -d * REGISTER_UNITS

    return cost


def _known_voxels(brain: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """The known brain voxels inside `box` (`brain` without `mask` grown by 2 voxels), as a
    boolean array over `box`; the dilation runs on the box grown by 2 voxels only."""
    grown = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    near = ndimage.binary_dilation(np.asarray(mask[grown], bool), iterations=2)
    inner = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown))
    return np.asarray(brain[box], bool) & ~near[inner]


def register(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray,
             notes: Optional[list[str]] = None) -> Optional[Placement]:
    """The affine placement of the atlas that best correlates with the case's known brain
    voxels (`brain` without the `mask` grown by 2 voxels; `b` on any linear scale), searched
    from the box placement coarse to fine (`REGISTER_LEVELS`); the box placement where the
    search does not improve on it; None for an empty brain. `Placement.converged` says whether
    the search met its tolerances (`REGISTER_FTOL`, `REGISTER_GTOL`) at every level; `notes` is
    told of every fallback and of a search that did not converge."""
    box = brain_box(brain)
    if box is None:
        return None
    known = _known_voxels(brain, mask, box)
    origin = np.array([s.start for s in box])
    centre = np.array([(s.start + s.stop - 1) / 2.0 for s in box])
    x = np.zeros(9)
    bounds = [(lo / u, hi / u) for (lo, hi), u in zip(REGISTER_BOUNDS, REGISTER_UNITS)]
    converged, iterations, cost = True, 0, None
    for step, blur in REGISTER_LEVELS:
        # the points of the case grid's every `step`-th voxel along each axis
        on_grid = tuple(slice((-o) % step, None, step) for o in origin)
        points = np.argwhere(known[on_grid]) * step + [sl.start for sl in on_grid] + origin
        if len(points) < 100:
            if step == REGISTER_STEP:
                _note(notes, f"atlas registration: {len(points)} known brain voxels on its {step}-voxel grid, "
                             "under 100: the atlas is placed by the brain's bounding box")
                return Placement(box)
            continue
        y = np.asarray(b)[tuple(points.T)].astype(np.float64)
        y -= y.mean()
        level_atlas = np.asarray(atlas, np.float32)
        level_atlas = ndimage.gaussian_filter(level_atlas, blur) if blur else level_atlas
        cost = _correlation_cost(level_atlas, box, points.astype(np.float64), y, centre)
        with threadpool_limits(1, user_api="blas"):  # [N, 3] products: BLAS threads only contend
            found = optimize.minimize(cost, x, jac=True, method="L-BFGS-B", bounds=bounds,
                                      options={"ftol": REGISTER_FTOL, "gtol": REGISTER_GTOL, "maxiter": REGISTER_MAXITER})
        converged = converged and bool(found.success)
        iterations += int(found.nit)
        x = found.x
    if not converged:
        _note(notes, f"atlas registration did not converge within its tolerances ({iterations} iterations): "
                     "its best placement is used")
    if not cost(x)[0] < cost(np.zeros(9))[0]:
        _note(notes, "atlas registration found no placement better than the brain's bounding box: the box is used")
        return Placement(box, converged=converged, iterations=iterations)
    return Placement(box, *_affine(x * REGISTER_UNITS, centre), converged=converged, iterations=iterations)


def _note(notes: Optional[list[str]], line: str) -> None:
    if notes is not None:
        notes.append(line)


def place(atlas: np.ndarray, placement: Placement, shape: tuple[int, ...], region=None) -> np.ndarray:
    """The atlas resampled onto a case grid of `shape` by `placement`: the box fit's
    `from_canonical` (zero outside the box) for an identity affine, else every voxel of the
    grid sampled (edge values beyond the atlas). With `region` (a box on the grid) only that
    part, the same values."""
    if np.array_equal(placement.A, np.eye(3)) and not placement.t.any():
        full = from_canonical(atlas, placement.box, shape)
        return full if region is None else full[region]
    region = tuple(slice(0, n) for n in shape) if region is None else region
    size = tuple(s.stop - s.start for s in region)
    # `to_atlas` of the region's voxels: an affine map of a regular grid, so a sum of one line
    # per axis (broadcast) instead of a product with every voxel's coordinates.
    scale, offset = placement._scale()
    coords = np.broadcast_to((placement.t * scale + offset)[:, None, None, None], (3, *size)).copy()
    for axis, sl in enumerate(region):
        line = np.arange(sl.start, sl.stop, dtype=np.float64).reshape([-1 if a == axis else 1 for a in range(3)])
        coords += (placement.A[:, axis] * scale)[:, None, None, None] * line
    return ndimage.map_coordinates(atlas, coords.reshape(3, -1), order=1, mode="nearest").reshape(size).astype(np.float32)


def place_at(atlas: np.ndarray, placement: Placement, points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`place(atlas, placement, shape)` at the voxels `points` [N, 3] only (float32 [N])."""
    if np.array_equal(placement.A, np.eye(3)) and not placement.t.any():
        return from_canonical(atlas, placement.box, shape)[tuple(np.asarray(points).T)]
    return _sample(atlas, placement.to_atlas(np.asarray(points, np.float32))).astype(np.float32)


def placement_of(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray, fit: str = "box",
                 notes: Optional[list[str]] = None) -> Optional[Placement]:
    """Where the atlas lies on a case by the `fit` of `data.atlas_fit` (None for an empty brain);
    `notes` as in `register`."""
    if fit not in ATLAS_FITS:
        raise ValueError(f"atlas fit must be one of {ATLAS_FITS}, got {fit!r}")
    if fit == "affine":
        return register(atlas, b, mask, brain, notes)
    box = brain_box(brain)
    return None if box is None else Placement(box)


def case_atlas(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray, fit: str = "box",
               notes: Optional[list[str]] = None) -> Optional[np.ndarray]:
    """The atlas on the case grid by the `fit` of `data.atlas_fit` (None for an empty brain);
    `notes` as in `register`."""
    placement = placement_of(atlas, b, mask, brain, fit, notes)
    return None if placement is None else place(atlas, placement, np.shape(mask))


def atlas_residual(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray, fit: str = "box",
                   notes: Optional[list[str]] = None, stages: Optional[Stages] = None) -> np.ndarray:
    """What the atlas holds inside `mask` beyond its own harmonic fill, on the case's scale.

    `b` is the case's normalised volume (known voxels are what counts), `brain` its brain
    (non-zero voided voxels or the mask), `fit` how the atlas is placed (`case_atlas`). Zero
    outside the mask. Returns float32 [X, Y, Z]. The atlas is resampled only where it is read:
    around the mask and at the known voxels that fit its intensity line. `notes` is told of every
    fallback; `stages` times the registration, the placing (conditioning) and the harmonic fill.
    """
    stages = Stages.of(stages)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    with stages.time("registration" if fit == "affine" else "conditioning"):
        placement = placement_of(atlas, b, mask, brain, fit, notes)
    if placement is None:
        _note(notes, "atlas not placed (no brain voxels): no atlas residual is used")
        return out
    with stages.time("conditioning"):
        known = np.asarray(brain, bool) & ~mask
        fit_points = np.argwhere(known)[::FIT_STRIDE]  # C order, as boolean indexing walks them
        a, y = place_at(atlas, placement, fit_points, mask.shape), np.asarray(b, np.float32)[tuple(fit_points.T)]
        near = mask_support(mask)
        scaled = place(atlas, placement, mask.shape, near)
        if a.size >= 2 and np.ptp(a) > 0:
            slope, offset = np.polyfit(a.astype(np.float64), y.astype(np.float64), 1)
            scaled = (scaled * np.float32(slope) + np.float32(offset)).astype(np.float32)
    with stages.time("harmonic"):
        inside, solver = mask[near], []
        out[near][inside] = scaled[inside] - harmonic_fill(scaled, inside, notes=solver)[inside]
    for line in solver:
        _note(notes, f"atlas residual: {line}")
    return out
