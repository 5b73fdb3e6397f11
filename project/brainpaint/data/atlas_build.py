"""Building the population atlas from training brains (`conditioning.atlas` places it on a case)."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import nibabel as nib
import numpy as np

from brainpaint.conditioning.atlas import ATLAS_SHAPE, Placement, _sample, brain_box, register, to_canonical
from brainpaint.conditioning.intensity import IntensityMap
from brainpaint.io.brats import load_case, to_ras


def build_atlas(volumes: Iterable[np.ndarray], log: Callable[[str], None] = lambda _: None, fit: str = "box") -> np.ndarray:
    """Mean of the volumes (ground-truth t1n, input scale) on the canonical box, each on the
    metric's [0, 1] scale (`IntensityMap.fit` on the volume itself). With `fit="affine"` each
    volume is then registered onto that mean (`register`) and the mean of the registered
    volumes is the atlas."""
    total = np.zeros(ATLAS_SHAPE, np.float64)
    brains = []  # (normalised volume in its brain box, the box) for the affine pass
    for volume in volumes:
        volume = np.asarray(volume, np.float32)
        box = brain_box(volume != 0)
        if box is None:
            continue
        normal = IntensityMap.fit(volume).normalize(volume)
        total += to_canonical(normal, box)
        brains.append((normal[box].copy() if fit == "affine" else None, box))
    if not brains:
        raise ValueError("no brain to build an atlas from")
    mean = (total / len(brains)).astype(np.float32)
    grid = "x".join(map(str, ATLAS_SHAPE))
    if fit == "box":
        log(f"atlas: mean of {len(brains)} brain(s) on a {grid} grid")
        return mean
    total[:] = 0.0
    atlas_points = np.indices(ATLAS_SHAPE, dtype=np.float32).reshape(3, -1).T
    for i, (inside, box) in enumerate(brains):
        local = tuple(slice(0, s.stop - s.start) for s in box)  # the brain box as its own grid
        placement = register(mean, inside, np.zeros(inside.shape, bool), inside != 0)
        placement = placement if placement is not None else Placement(local)
        total += _sample(inside, placement.to_case(atlas_points)).reshape(ATLAS_SHAPE)
        if (i + 1) % 8 == 0 or i + 1 == len(brains):
            log(f"atlas: {i + 1} of {len(brains)} brains registered onto the box mean")
    log(f"atlas: mean of {len(brains)} registered brain(s) on a {grid} grid")
    return (total / len(brains)).astype(np.float32)


def atlas_from_cases(cases, log: Callable[[str], None] = lambda _: None, fit: str = "box") -> np.ndarray:
    """`build_atlas` over the ground-truth t1n of labelled cases (`io.brats.Case`) of healthy
    brains, one case per subject: BraTS IDs that differ only in their last number
    (BraTS-GLI-00001-000, -001, ...) are scans of one brain and count once; any other ID is a
    subject of its own. Tumour brains (a non-empty mask-unhealthy) are left out: the atlas is
    where tissue lies in a healthy brain."""
    firsts = {}
    for case in cases:
        subject = re.fullmatch(r"(.*-\d+)-\d+", case.id)
        firsts.setdefault(subject.group(1) if subject else case.id, case)

    def brains():
        for case in firsts.values():
            if _has_tumour(case):
                log(f"atlas: {case.id} holds a tumour, left out")
                continue
            data = load_case(case, labels=True)
            yield to_ras(data.t1n, data.affine)

    return build_atlas(brains(), log=log, fit=fit)


def _has_tumour(case) -> bool:
    """Whether a case's mask-unhealthy file (when it has one) marks any voxel."""
    path = case.files.get("mask_unhealthy")
    return path is not None and bool(np.asarray(nib.load(str(path)).dataobj).any())
