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

No registration is done: the box scaling is the whole alignment, so the atlas is blurred by
the spread of brain shapes, and the network learns how far to trust it. The atlas's axes are
RAS (`to_ras` turns each training brain by its affine); `atlas_for` turns it into the array
order of a case, so an LPS-stored BraTS case gets its anterior side where its array has it.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from .harmonic import harmonic_fill
from .intensity import IntensityMap

ATLAS_SHAPE = (120, 144, 120)  # about 1.2 mm over an adult brain's bounding box
FIT_STRIDE = 7  # every 7th known brain voxel fits the intensity line
RAS = axcodes2ornt("RAS")


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`volume` with its axes turned to RAS by its `affine` (flips and transposes only)."""
    return apply_orientation(np.asarray(volume), io_orientation(np.asarray(affine, np.float64)))


def atlas_for(atlas: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The atlas (RAS axes) in the array order of an image with `affine`: `to_ras` undone."""
    return np.ascontiguousarray(apply_orientation(atlas, ornt_transform(RAS, io_orientation(np.asarray(affine, np.float64)))))


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


def build_atlas(volumes: Iterable[np.ndarray], log: Callable[[str], None] = lambda _: None) -> np.ndarray:
    """Mean of the volumes (ground-truth t1n, input scale) on the canonical box, each on the
    metric's [0, 1] scale (`IntensityMap.fit` on the volume itself)."""
    total = np.zeros(ATLAS_SHAPE, np.float64)
    n = 0
    for volume in volumes:
        volume = np.asarray(volume, np.float32)
        box = brain_box(volume != 0)
        if box is None:
            continue
        total += to_canonical(IntensityMap.fit(volume).normalize(volume), box)
        n += 1
    if not n:
        raise ValueError("no brain to build an atlas from")
    log(f"atlas: mean of {n} brain(s) on a {'x'.join(map(str, ATLAS_SHAPE))} grid")
    return (total / n).astype(np.float32)


def atlas_residual(atlas: np.ndarray, b: np.ndarray, mask: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """What the atlas holds inside `mask` beyond its own harmonic fill, on the case's scale.

    `b` is the case's normalised volume (known voxels are what counts), `brain` its brain
    (non-zero voided voxels or the mask). Zero outside the mask. Returns float32 [X, Y, Z].
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, np.float32)
    box = brain_box(brain)
    if box is None or not mask.any():
        return out
    scaled = from_canonical(atlas, box, mask.shape)
    known = np.asarray(brain, bool) & ~mask
    a, y = scaled[known][::FIT_STRIDE], np.asarray(b, np.float32)[known][::FIT_STRIDE]
    if a.size >= 2 and np.ptp(a) > 0:
        slope, offset = np.polyfit(a.astype(np.float64), y.astype(np.float64), 1)
        scaled = (scaled * np.float32(slope) + np.float32(offset)).astype(np.float32)
    out[mask] = scaled[mask] - harmonic_fill(scaled, mask)[mask]
    return out


def atlas_from_cases(cases, log: Callable[[str], None] = lambda _: None) -> np.ndarray:
    """`build_atlas` over the ground-truth t1n of labelled cases (`brats_io.Case`), one case per
    subject: BraTS IDs that differ only in their last number (BraTS-GLI-00001-000, -001, ...)
    are scans of one brain and count once; any other ID is a subject of its own."""
    from .brats_io import load_case  # noqa: PLC0415 (brats_io is not needed to use an atlas)

    firsts = {}
    for case in cases:
        subject = re.fullmatch(r"(.*-\d+)-\d+", case.id)
        firsts.setdefault(subject.group(1) if subject else case.id, case)

    def brains():
        for case in firsts.values():
            data = load_case(case, labels=True)
            yield to_ras(data.t1n, data.affine)

    return build_atlas(brains(), log=log)
