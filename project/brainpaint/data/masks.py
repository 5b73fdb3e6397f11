"""Procedural tumour-shaped masks placed in healthy brain tissue.

BraTS 2023 "local synthesis" cases come with a *healthy* mask: a tumour-shaped region placed
in tissue that holds no tumour, which the organisers voided and kept as the ground truth to
inpaint. Healthy brains have no tumours to borrow shapes from, so this module draws them:

* **Volume**: log-uniform in `volume_range_cm3` (default 5 to 200 cm³). Tumour volumes span
  orders of magnitude, so a log-uniform draw gives as many small as large masks.
* **Shape**: a randomly rotated ellipsoidal core (axis ratios up to about 1:1.6) whose
  boundary is pushed in and out by smooth low-frequency noise (lobes) plus a finer octave
  (ragged edges). The region is thresholded from that field, holes are filled and only the
  largest connected component is kept, so each mask is one solid irregular blob.
* **Placement** (as the BraTS organisers did): several candidate centres are drawn among brain
  voxels; a candidate is valid when at least `min_brain_overlap` (75 %) of the blob lies in the
  brain and the blob does not touch `avoid` (a lesion, grown by `avoid_margin` voxels). The
  valid candidate with the largest brain overlap wins (`placement="central"`, the default).
  That favours centres away from the brain's edge, so such masks hold more white matter
  than the brain does; `placement="uniform"` takes the first valid candidate instead, a
  uniform draw over the valid positions (cortex, insula and edge included).
* **Clipping**: with `clip_to_brain` (the default) the returned mask is the blob intersected
  with the brain, and its volume (the one drawn) is measured after that intersection. The
  inpainted region then lies in tissue, which is where the metrics are computed; the overlap
  rule still applies to the unclipped blob, so masks at the brain's edge keep a cut face like
  the organisers' ones do.

All work happens in a box around the blob, never on the whole grid, so one mask on a
240x240x155 grid takes well under a second. Voxels are assumed isotropic; `voxel_volume_mm3`
only converts cm³ to voxel counts (tests use tiny grids with a scaled volume range).
Masks for one call are independent of each other (each is meant for its own case) and mask
`k` depends only on `(seed, k)`, not on `n`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brainpaint.conditioning.geometry import crop, cube, paste
from brainpaint.errors import MaskPlacementError

MIN_BRAIN_OVERLAP = 0.75
PLACEMENTS = ("central", "uniform")  # best brain overlap of the candidates, or the first valid one


@dataclass
class GeneratedMask:
    """One generated mask with what is needed to check and record it."""

    mask: np.ndarray  # bool, on the brain's grid: the returned mask
    blob: np.ndarray  # bool, the unclipped shape inside its box (may extend off the grid)
    offset: tuple[int, int, int]  # grid index of blob[0, 0, 0] (can be negative)
    brain_overlap: float  # share of the blob inside the brain
    volume_voxels: int  # voxels in `mask`
    volume_cm3: float
    centre: tuple[int, int, int]  # candidate centre the blob was placed at
    seed: int  # the mask's own seed (reproduces it with `_draw_mask`)


def generate_masks(brain_mask: np.ndarray, n: int, seed: int, **options) -> list[np.ndarray]:
    """Return `n` boolean tumour-shaped masks on the grid of `brain_mask` (see module doc).

    `options` are those of `generate_mask_details` (avoid, volume_range_cm3, candidates, ...).
    """
    return [g.mask for g in generate_mask_details(brain_mask, n, seed, **options)]


def generate_mask_details(
    brain_mask: np.ndarray,
    n: int,
    seed: int,
    avoid: np.ndarray | None = None,
    volume_range_cm3: tuple[float, float] = (5.0, 200.0),
    voxel_volume_mm3: float = 1.0,
    candidates: int = 12,
    clip_to_brain: bool = True,
    min_brain_overlap: float = MIN_BRAIN_OVERLAP,
    avoid_margin: int = 2,
    placement: str = "central",
) -> list[GeneratedMask]:
    """Like `generate_masks`, but returns `GeneratedMask` records (volume, overlap, seed)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement '{placement}' (expected one of {', '.join(PLACEMENTS)})")
    brain = np.asarray(brain_mask).astype(bool, copy=False)
    if brain.ndim != 3:
        raise ValueError(f"brain mask must be 3D, got shape {brain.shape}")
    lo_cm3, hi_cm3 = (float(v) for v in volume_range_cm3)
    if not 0 < lo_cm3 <= hi_cm3:
        raise ValueError(f"volume range must satisfy 0 < low <= high, got {volume_range_cm3}")
    if voxel_volume_mm3 <= 0:
        raise ValueError("voxel volume must be positive")
    lo = max(1, int(np.ceil(lo_cm3 * 1000.0 / voxel_volume_mm3)))
    hi = max(lo, int(np.floor(hi_cm3 * 1000.0 / voxel_volume_mm3)))
    brain_voxels = int(brain.sum())
    if brain_voxels < lo:
        raise MaskPlacementError(
            f"brain has {brain_voxels} voxels, fewer than the smallest mask ({lo} voxels)"
        )
    blocked = None
    if avoid is not None:
        avoid = np.asarray(avoid).astype(bool, copy=False)
        if avoid.shape != brain.shape:
            raise ValueError(f"avoid mask shape {avoid.shape} differs from brain shape {brain.shape}")
        blocked = ndimage.binary_dilation(avoid, iterations=avoid_margin) if avoid_margin > 0 else avoid
        if not blocked.any():
            blocked = None
    allowed_centres = np.flatnonzero(brain if blocked is None else brain & ~blocked)
    if allowed_centres.size == 0:
        raise MaskPlacementError("no brain voxel is free of the lesion to avoid")

    ctx = _Context(brain, blocked, allowed_centres, lo, hi, candidates, clip_to_brain, min_brain_overlap, placement)
    child_seeds = np.random.SeedSequence(seed).generate_state(max(n, 0), dtype=np.uint32)
    out = []
    for mask_seed in child_seeds:
        g = _draw_mask(ctx, int(mask_seed))
        g.volume_cm3 = g.volume_voxels * voxel_volume_mm3 / 1000.0
        out.append(g)
    return out


@dataclass
class _Context:
    brain: np.ndarray
    blocked: np.ndarray | None
    allowed_centres: np.ndarray
    lo: int
    hi: int
    candidates: int
    clip: bool
    min_overlap: float
    placement: str


def _draw_mask(ctx: _Context, mask_seed: int, max_rounds: int = 20) -> GeneratedMask:
    """Draw one mask; each round tries a fresh shape (and, after a few, a smaller volume)."""
    rng = np.random.default_rng(mask_seed)
    target = int(round(np.exp(rng.uniform(np.log(ctx.lo), np.log(ctx.hi + 1e-9)))))
    target = min(max(target, ctx.lo), ctx.hi)
    for round_ in range(max_rounds):
        if round_ and round_ % 5 == 0:  # a big mask may not fit this brain: shrink it
            target = max(ctx.lo, int(target * 0.7))
        field = _blob_field(target, rng)
        best = None
        for _ in range(ctx.candidates):
            flat = ctx.allowed_centres[rng.integers(ctx.allowed_centres.size)]
            centre = np.array(np.unravel_index(flat, ctx.brain.shape))
            trial = _try_position(ctx, field, centre, target)
            if trial is not None and (best is None or trial[0] > best[0]):
                best = trial
                if ctx.placement == "uniform":
                    break
        if best is None:
            continue
        found = _finish(ctx, field, *best[1:])
        if found is not None and ctx.lo <= found.volume_voxels <= ctx.hi:
            found.seed = mask_seed
            return found
    raise MaskPlacementError(
        f"could not place a mask of {ctx.lo}-{ctx.hi} voxels with >= {ctx.min_overlap:.0%} "
        f"brain overlap after {max_rounds} rounds of {ctx.candidates} candidates"
    )


def _blob_field(target_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """A scalar field in a box whose upper level sets are lobulated blobs of about `target` voxels.

    field = 1 - r + noise, with r the distance normalised to a randomly rotated ellipsoid of
    volume `target`. The noise is random values on a coarse lattice (a few per radius)
    interpolated up, which is a cheap smooth noise: one coarse octave makes lobes, a finer,
    weaker one makes ragged edges. The outermost layer is set to -inf so a blob never touches
    its box.
    """
    radius = (3.0 * target_voxels / (4.0 * np.pi)) ** (1.0 / 3.0)
    axes = radius * np.exp(rng.uniform(-0.25, 0.25, size=3))
    axes *= radius / np.prod(axes) ** (1.0 / 3.0)  # keep the ellipsoid's volume
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    half = int(np.ceil(1.6 * axes.max())) + 2
    size = 2 * half + 1
    # r² = xᵀ Q x with Q = R diag(1/a²) Rᵀ, evaluated by broadcasting three 1D coordinate axes.
    quad = (rotation / axes**2) @ rotation.T
    c = np.arange(size, dtype=np.float32) - half
    xyz = (c[:, None, None], c[None, :, None], c[None, None, :])
    r2 = np.zeros((size,) * 3, dtype=np.float32)
    for i in range(3):
        for j in range(i, 3):
            r2 += np.float32(quad[i, j] * (1 if i == j else 2)) * (xyz[i] * xyz[j])
    field = 1.0 - np.sqrt(r2)
    field += 0.45 * _smooth_noise(size, cells=int(rng.integers(3, 6)), rng=rng)
    field += 0.15 * _smooth_noise(size, cells=int(rng.integers(8, 13)), rng=rng)
    field[[0, -1], :, :] = -np.inf
    field[:, [0, -1], :] = -np.inf
    field[:, :, [0, -1]] = -np.inf
    return field


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise (unit standard deviation) on a `size`³ box from a `cells`³ random lattice.

    The lattice is upsampled with cubic splines one axis at a time: the 1D upsampling is a
    fixed (size x cells) matrix, so the 3D result costs three small tensor products instead
    of a 3D spline evaluation at every voxel.
    """
    coarse = rng.standard_normal((cells,) * 3).astype(np.float32)
    basis = np.stack(
        [ndimage.zoom(np.eye(cells, dtype=np.float32)[k], size / cells, order=3, mode="mirror", grid_mode=True)
         for k in range(cells)],
        axis=1,
    )[:size]
    if basis.shape[0] < size:  # zoom rounding: repeat the last row if one is missing
        basis = np.concatenate([basis, np.repeat(basis[-1:], size - basis.shape[0], axis=0)])
    fine = np.einsum("ai,ijk->ajk", basis, coarse)
    fine = np.einsum("bj,ajk->abk", basis, fine)
    fine = np.einsum("ck,abk->abc", basis, fine)
    return fine / (fine.std() + 1e-6)


def _try_position(ctx: _Context, field: np.ndarray, centre: np.ndarray, target: int):
    """Score the field's box centred at `centre`: (overlap, threshold, offset, centre) or None.

    Candidates are scored on the plain thresholded field; hole filling and the connected
    component step run once, on the winner (`_finish`), to keep placement cheap.
    """
    size = field.shape[0]
    offset = centre - size // 2
    brain_box = crop(ctx.brain, cube(offset, size))
    # With clipping, threshold so that `target` voxels of the blob fall inside the brain.
    values = field[brain_box] if ctx.clip else field.ravel()
    if values.size < target:
        return None
    threshold = np.partition(values, values.size - target)[values.size - target]
    if not np.isfinite(threshold):
        return None
    blob = field >= threshold
    overlap = float(np.count_nonzero(blob & brain_box)) / max(np.count_nonzero(blob), 1)
    if overlap < ctx.min_overlap:
        return None
    if ctx.blocked is not None and (blob & crop(ctx.blocked, cube(offset, size))).any():
        return None
    return overlap, threshold, offset, centre


def _finish(ctx: _Context, field: np.ndarray, threshold: float, offset, centre) -> GeneratedMask | None:
    """Turn the winning candidate into a solid one-piece mask and re-check the rules."""
    size = field.shape[0]
    brain_box = crop(ctx.brain, cube(offset, size))
    blob = _largest_component(ndimage.binary_fill_holes(field >= threshold))
    count = int(blob.sum())
    if count == 0:
        return None
    overlap = float(np.count_nonzero(blob & brain_box)) / count
    if overlap < ctx.min_overlap:
        return None
    if ctx.blocked is not None and (blob & crop(ctx.blocked, cube(offset, size))).any():
        return None
    kept = _largest_component(blob & brain_box) if ctx.clip else blob
    mask = paste(kept, cube(offset, size), np.zeros(ctx.brain.shape, dtype=bool))
    volume = int(np.count_nonzero(mask))
    return GeneratedMask(
        mask=mask,
        blob=blob,
        offset=tuple(int(v) for v in offset),
        brain_overlap=overlap,
        volume_voxels=volume,
        volume_cm3=0.0,
        centre=tuple(int(v) for v in centre),
        seed=0,
    )


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool, copy=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())
