"""One volume's network inputs.

`volume_inputs` normalises a voided volume with the metric's own map and builds the `b`
channel (the prior-filled voided volume), the midline of the mirrored channels and the atlas
residual; `layout.InputLayout.build` cuts one slice's channels out of them. Training
(`data.slices`) and inference (`infer.inpainter`) both build the network's inputs here.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from brainpaint.conditioning.atlas import atlas_residual
from brainpaint.conditioning.geometry import midline_shift
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.conditioning.intensity import IntensityMap
from brainpaint.stages import Stages


@dataclass
class VolumeInputs:
    """Network-scale inputs of one (volume, mask): `b` and `mask` are [X, Y, Z] (float32 or,
    in the training cache, a byte mask); `mirror_shift` is the midline of the mirrored channels
    (`geometry.mirror_x`), None without `data.mirror`; `atlas` the atlas residual
    (`atlas.atlas_residual`, [X, Y, Z]), None without `model.atlas`. `notes` says, one line
    each, where building them fell back on something else (registration, solver, midline)."""

    imap: IntensityMap
    b: np.ndarray
    mask: np.ndarray
    mirror_shift: Optional[int] = None
    atlas: Optional[np.ndarray] = None
    notes: list[str] = field(default_factory=list)

    def z_range(self, z0: int, z1: int) -> "VolumeInputs":
        """The same inputs restricted to slices z0 .. z1 - 1."""
        cut = lambda a: None if a is None else np.ascontiguousarray(a[:, :, z0:z1])  # noqa: E731
        return VolumeInputs(self.imap, cut(self.b), cut(self.mask), self.mirror_shift, cut(self.atlas), self.notes)


# The version of what `prior_cache` computes (the harmonic fill, the midline, the atlas residual
# and its placement): bump it whenever one of them changes, and every cache built on an older
# one (`data.cache_dir`, keyed by `prior_key`) is computed again instead of read (caches of
# before the version had none in their names: they are never read either).
PRIOR_VERSION = 1


@dataclass
class PriorCache:
    """What `volume_inputs` would compute expensively: the harmonic fill at the mask voxels
    (input scale), the midline shift and the atlas residual at the mask voxels. Any may be
    None (then it is computed)."""

    fill: Optional[np.ndarray] = None
    shift: Optional[int] = None
    atlas: Optional[np.ndarray] = None


def volume_inputs(
    voided: np.ndarray, mask: np.ndarray, data_cfg, known: Optional[PriorCache] = None, atlas: Optional[np.ndarray] = None,
    stages: Optional[Stages] = None,
) -> VolumeInputs:
    """Normalise a voided volume and build the conditioning volume `b`.

    The intensity map is fitted on the voided volume exactly as the official metric does,
    so [0, 1] here is the metric's scale. With `prior="harmonic"` the region inside the mask
    holds the 3D harmonic fill of the surrounding tissue instead of zeros, which turns the
    network's job into predicting a residual texture rather than the whole region. With
    `data.mirror` the midline is found for the mirrored channels. With an `atlas`
    (`model.atlas`) its residual over its own harmonic fill is computed
    (`atlas.atlas_residual`), and `data.atlas_gain` times it is added to the fill in `b`.
    `known` passes a fill, midline or atlas residual computed before (training caches,
    repeated scoring of the same case). Fallbacks on the way are listed in `VolumeInputs.notes`;
    `stages` times each step (`brainpaint.stages`).
    """
    stages, known, notes = Stages.of(stages), known or PriorCache(), []
    mask = np.asarray(mask, dtype=bool)
    voided = np.asarray(voided, dtype=np.float32)
    with stages.time("intensity"):
        imap = IntensityMap.fit(voided)
        normal = imap.normalize(voided)
    if data_cfg.prior == "harmonic" and mask.any():
        with stages.time("harmonic"):
            if known.fill is None:
                filled = harmonic_fill(voided, mask, notes=notes)
            else:
                filled = voided.copy()
                filled[mask] = known.fill
            b = imap.normalize(filled)
    else:
        b = normal.copy()
        b[mask] = 0.0
    shift = None
    if data_cfg.mirror:
        with stages.time("midline"):
            shift = midline_shift(voided, (voided != 0) & ~mask, notes=notes) if known.shift is None else int(known.shift)
    residual = None
    if atlas is not None:
        if known.atlas is None:
            residual = atlas_residual(atlas, normal, mask, (voided != 0) | mask, data_cfg.atlas_fit, notes=notes, stages=stages)
        else:
            residual = np.zeros(mask.shape, np.float32)
            residual[mask] = known.atlas
        if data_cfg.atlas_gain:  # the atlas-guided fill (the residual is zero outside the mask)
            b = np.clip(b + np.float32(data_cfg.atlas_gain) * residual, 0.0, 1.0)
    return VolumeInputs(imap, np.ascontiguousarray(b, dtype=np.float32), mask.astype(np.float32), shift, residual, notes)


def _case_atlas_residual(
    atlas: np.ndarray, voided: np.ndarray, mask: np.ndarray, imap: IntensityMap, fit: str = "box", notes=None
) -> np.ndarray:
    """`atlas.atlas_residual` of a voided volume: its known voxels on the network scale, its brain
    the non-zero voxels and the mask, the atlas placed by `fit` (`data.atlas_fit`)."""
    return atlas_residual(atlas, imap.normalize(voided), mask, (voided != 0) | mask, fit, notes=notes)


def prior_cache(
    voided: np.ndarray, mask: np.ndarray, atlas: Optional[np.ndarray] = None, fit: str = "box"
) -> PriorCache:
    """The harmonic fill (at the mask voxels), midline and, given an `atlas`, the atlas
    residual (at the mask voxels, the atlas placed by `fit`) of a voided volume."""
    voided = np.asarray(voided, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    fill = harmonic_fill(voided, mask)[mask] if mask.any() else np.zeros(0, np.float32)
    residual = None if atlas is None else _case_atlas_residual(atlas, voided, mask, IntensityMap.fit(voided), fit)[mask]
    return PriorCache(fill=fill, shift=midline_shift(voided, (voided != 0) & ~mask), atlas=residual)


def prior_key(voided: np.ndarray, mask: np.ndarray, atlas: Optional[np.ndarray] = None, fit: str = "box") -> str:
    """The name under which `prior_cache(voided, mask, atlas, fit)` may be stored: its algorithm
    (`PRIOR_VERSION`) and its inputs (checksums of the voided volume, the mask and the atlas, and
    the atlas's fit), so a stored prior is read only where it would be computed the same."""
    mask = np.asarray(mask, dtype=bool)
    key = zlib.crc32(np.packbits(mask).tobytes()) ^ zlib.crc32(np.ascontiguousarray(voided).tobytes())
    name = f"v{PRIOR_VERSION}-{key:08x}"
    if atlas is not None:
        name += f"-atlas{zlib.crc32(np.ascontiguousarray(atlas, np.float32).tobytes()):08x}"
        name += "" if fit == "box" else f"-{fit}"
    return name
