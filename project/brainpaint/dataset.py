"""Training slices (x0, conditioning) from BraTS-layout cases, and the per-volume inputs
shared with inference.

The network sees one axial slice at a time: the conditioning `b` (the voided slice,
normalised to [0, 1]; inside the mask either 0 -- the paper -- or a 3D harmonic fill),
the mask `m`, optionally neighbouring `b`/`m` slices, and the noisy target `x_t`.
`volume_inputs`, `slice_conditioning`, `encode_target` and `decode_sample` are the one
place that defines those tensors, so training and inference cannot drift apart.

For training, the ground truth is `t1n` and the region cut out is `mask-healthy`: the
conditioning is `t1n` with the mask-healthy voxels set to 0 while the tumour stays
visible, as in the paper. Each volume is decoded once per loader worker and kept in a
small cache together with its (expensive) harmonic fill; `TrainStream` walks the pairs
volume-group by volume-group so that the cache is hit, never thrashed.
"""
from __future__ import annotations

import math
import os
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .architecture import input_layout
from .atlas import atlas_residual
from .brats_io import CaseError, discover_cases, load_case, to_ras
from .distributed import ignore_stop_signals
from .errors import MaskPlacementError
from .geometry import crop, full_slice_box, midline_shift, mirror_x, plane_names, to_plane
from .harmonic import harmonic_fill
from .intensity import IntensityMap
from .masks import generate_masks

# --------------------------------------------------------------------------- shared with inference
@dataclass
class VolumeInputs:
    """Network-scale inputs of one (volume, mask): `b` and `mask` are [X, Y, Z] (float32 or,
    in the training cache, a byte mask); `mirror_shift` is the midline of the mirrored channels
    (`geometry.mirror_x`), None without `data.mirror`; `atlas` the atlas residual
    (`atlas.atlas_residual`, [X, Y, Z]), None without `model.atlas`."""

    imap: IntensityMap
    b: np.ndarray
    mask: np.ndarray
    mirror_shift: Optional[int] = None
    atlas: Optional[np.ndarray] = None

    def in_plane(self, plane: str) -> "VolumeInputs":
        """The same inputs with `plane`'s slices on the last axis (`geometry.to_plane`, views)."""
        turn = lambda a: None if a is None else to_plane(a, plane)  # noqa: E731
        return VolumeInputs(self.imap, turn(self.b), turn(self.mask), self.mirror_shift, turn(self.atlas))

    def z_range(self, z0: int, z1: int) -> "VolumeInputs":
        """The same inputs restricted to slices z0 .. z1 - 1."""
        cut = lambda a: None if a is None else np.ascontiguousarray(a[:, :, z0:z1])  # noqa: E731
        return VolumeInputs(self.imap, cut(self.b), cut(self.mask), self.mirror_shift, cut(self.atlas))


@dataclass
class PriorCache:
    """What `volume_inputs` would compute expensively: the harmonic fill at the mask voxels
    (input scale), the midline shift and the atlas residual at the mask voxels. Any may be
    None (then it is computed)."""

    fill: Optional[np.ndarray] = None
    shift: Optional[int] = None
    atlas: Optional[np.ndarray] = None


def volume_inputs(
    voided: np.ndarray, mask: np.ndarray, data_cfg, known: Optional[PriorCache] = None, atlas: Optional[np.ndarray] = None
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
    repeated scoring of the same case).
    """
    known = known or PriorCache()
    mask = np.asarray(mask, dtype=bool)
    voided = np.asarray(voided, dtype=np.float32)
    imap = IntensityMap.fit(voided)
    if data_cfg.prior == "harmonic" and mask.any():
        if known.fill is None:
            filled = harmonic_fill(voided, mask)
        else:
            filled = voided.copy()
            filled[mask] = known.fill
        b = imap.normalize(filled)
    else:
        b = imap.normalize(voided)
        b[mask] = 0.0
    shift = None
    if data_cfg.mirror:
        shift = midline_shift(voided, (voided != 0) & ~mask) if known.shift is None else int(known.shift)
    residual = None
    if atlas is not None:
        if known.atlas is None:
            residual = _case_atlas_residual(atlas, voided, mask, imap, data_cfg.atlas_fit)
        else:
            residual = np.zeros(mask.shape, np.float32)
            residual[mask] = known.atlas
        if data_cfg.atlas_gain:  # the atlas-guided fill (the residual is zero outside the mask)
            b = np.clip(b + np.float32(data_cfg.atlas_gain) * residual, 0.0, 1.0)
    return VolumeInputs(imap, np.ascontiguousarray(b, dtype=np.float32), mask.astype(np.float32), shift, residual)


def _case_atlas_residual(
    atlas: np.ndarray, voided: np.ndarray, mask: np.ndarray, imap: IntensityMap, fit: str = "box"
) -> np.ndarray:
    """`atlas.atlas_residual` of a voided volume: its known voxels on the network scale, its brain
    the non-zero voxels and the mask, the atlas placed by `fit` (`data.atlas_fit`)."""
    return atlas_residual(atlas, imap.normalize(voided), mask, (voided != 0) | mask, fit)


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


def encode_target(gt_norm, b, prior: str):
    """Ground truth in [0, 1] -> diffusion space x0 (numpy arrays or torch tensors).

    "none": the whole slice mapped to [-1, 1] (the paper). "harmonic": twice the residual
    over the fill, which is zero outside the mask because there `b` equals the ground truth.
    """
    if prior == "none":
        return 2 * gt_norm - 1
    return 2 * (gt_norm - b)


def decode_sample(x0, b, prior: str):
    """Inverse of `encode_target`: diffusion-space sample -> normalised image clipped to [0, 1]."""
    if prior == "none":
        out = (x0 + 1) / 2
    else:
        out = b + x0 / 2
    return out.clip(0, 1)


def clip_bound(prior: str) -> float:
    """Bound of the predicted x0 while sampling: the whole slice in [-1, 1] ("none"), or twice a
    residual over the fill in [-2, 2] ("harmonic"). One rule for inference and validation."""
    return 1.0 if prior == "none" else 2.0


def slice_conditioning(vin: VolumeInputs, z: int, box, context_slices: int) -> np.ndarray:
    """Conditioning channels of slice z: [b_z, m_z, (b~_z, m~_z), b_{z-1}, m_{z-1}, b_{z+1}, m_{z+1}, ..., (a_z)].

    b~ and m~ are b and m mirrored about the midline (only with `vin.mirror_shift`): the other
    hemisphere, for the network to compare. Neighbours are ordered by distance (z-1, z+1, z-2,
    z+2, ...); beyond the volume edge they are zeros. a_z is the atlas residual (only with
    `vin.atlas`), last. Every channel is cropped to `box`.
    """
    depth = vin.b.shape[2]
    offsets = [0]
    for k in range(1, context_slices + 1):
        offsets += [-k, k]
    channels = []
    for off in offsets:
        zz = z + off
        if 0 <= zz < depth:
            channels += [crop(vin.b[:, :, zz], box), crop(vin.mask[:, :, zz], box)]
        else:
            blank = np.zeros((box[0].stop - box[0].start, box[1].stop - box[1].start), np.float32)
            channels += [blank, blank]
    if vin.mirror_shift is not None:
        channels[2:2] = [crop(mirror_x(a[:, :, z], vin.mirror_shift), box) for a in (vin.b, vin.mask)]
    if vin.atlas is not None:
        channels.append(crop(vin.atlas[:, :, z], box))
    return np.stack(channels).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- intensity augmentation
@dataclass
class IntensityAugmentation:
    """One draw of the training intensity augmentation: a gamma and smooth bias fields.

    A field is exp of a quadratic polynomial over the patch (5 coefficients). The target and
    the slice's own channels share one field; the mirrored channels get their own, since
    scanner shading is not left-right symmetric.
    """

    gamma: float = 1.0
    field: Optional[tuple[float, ...]] = None
    mirror_field: Optional[tuple[float, ...]] = None

    @classmethod
    def draw(cls, rng: random.Random, data_cfg) -> "IntensityAugmentation":
        gamma = math.exp(rng.gauss(0.0, data_cfg.gamma_aug)) if data_cfg.gamma_aug > 0 else 1.0
        coefficients = lambda: tuple(rng.gauss(0.0, data_cfg.bias_aug) for _ in range(5))  # noqa: E731
        field = coefficients() if data_cfg.bias_aug > 0 else None
        mirror_field = coefficients() if (data_cfg.bias_aug > 0 and data_cfg.mirror) else None
        return cls(gamma, field, mirror_field)

    @staticmethod
    def _field(coefficients, shape) -> np.ndarray:
        u = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
        v = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
        terms = (u, v, u * u, v * v, u * v)
        return np.exp(sum(np.float32(c) * term for c, term in zip(coefficients, terms))).astype(np.float32)

    def _image(self, image: np.ndarray, coefficients) -> np.ndarray:
        out = np.power(np.clip(image, 0.0, 1.0), self.gamma) if self.gamma != 1.0 else image
        if coefficients is not None:
            out = out * self._field(coefficients, image.shape)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def apply(self, cond: np.ndarray, gt: np.ndarray, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
        """Augmented copies of the conditioning (image channels only; masks and a trailing atlas
        residual, the population's and not this scan's, untouched) and target."""
        cond = cond.copy()
        for c in range(0, cond.shape[0] - cond.shape[0] % 2, 2):  # b, (mirrored b), neighbouring b's
            cond[c] = self._image(cond[c], self.mirror_field if (mirror and c == 2) else self.field)
        return cond, self._image(gt, self.field)


# --------------------------------------------------------------------------- training data
@dataclass
class _Unit:
    """One (case, mask) training volume: k == 0 is mask-healthy, k >= 1 a generated mask."""

    case_index: int
    k: int
    z_slices: tuple[int, ...]  # slices (of `plane`) where this mask is non-empty
    plane: str = "axial"


@dataclass
class _Prepared:
    """A decoded unit restricted to the slices training can touch (mask slices +- context)."""

    vin: VolumeInputs  # b and mask of slices z0 .. z0 + depth
    gt: np.ndarray  # normalised ground truth, same slices
    z0: int
    full_box: Optional[tuple]  # whole-slice box (crop_size None), else None


def _stable_seed(*parts) -> int:
    """A seed that is the same in every process (unlike hash() of strings)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _mask_slices(mask: np.ndarray, plane: str) -> tuple[int, ...]:
    """Indices of the slices of `plane` where `mask` [X, Y, Z] is non-empty."""
    return tuple(int(z) for z in np.flatnonzero(to_plane(mask, plane).any(axis=(0, 1))))


def _read_mask_slices(case, planes: list[str]) -> dict[str, tuple[int, ...]]:
    """Per plane, the slices where mask-healthy is non-empty, reading only that (small) file."""
    path = case.files.get("mask_healthy")
    if path is None:
        raise CaseError(case.id, "no mask-healthy file (needed for training)")
    try:
        img = nib.load(str(path))
        mask = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise CaseError(case.id, f"cannot read {Path(path).name}: {exc}") from exc
    if mask.ndim != 3:
        raise CaseError(case.id, f"mask-healthy must be 3D, got shape {mask.shape}")
    mask = to_ras(mask != 0, img.affine)  # the decoded units' frame (CaseData.in_ras)
    return {plane: _mask_slices(mask, plane) for plane in planes}


class SliceDataset(Dataset):
    """Training pairs (x0 [1,H,W], cond [C,H,W]) from BraTS-layout cases with labels.

    Cases are used in RAS axes (`CaseData.in_ras`), the frame inference gives the network.
    A pair is (case, mask k, z) for every slice z where the mask is non-empty, of every plane
    in `data.planes` (axial: z indexes the RAS volume's last axis; coronal: its second); mask 0
    is the case's mask-healthy, masks 1..n are `data.extra_masks_per_volume` generated
    healthy masks (`masks.generate_masks`, sized in cm³ with the case's voxel spacing; a brain
    with no room for them keeps its mask-healthy alone, with a warning).
    Cases that cannot be used are collected in `.errors` (one-line CaseErrors) and skipped.

    Decoded units live in an LRU cache of `data.cache_volumes` entries per process/worker;
    `decode_count` counts decodes so benchmarks and tests can see the cache working.
    """

    def __init__(self, source, cfg, *, augment: bool = True, seed: int = 0, log=print):
        self.cfg = cfg
        self.augment = augment
        self.seed = seed
        self.log = log
        if isinstance(source, (str, Path)):
            self.cases, self.errors = discover_cases(Path(source), labels=True)
        else:
            self.cases, self.errors = list(source), []
        self.cases = list(self.cases)
        self.errors = list(self.errors)

        n_extra = cfg.data.extra_masks_per_volume
        self.planes = plane_names(cfg.data.planes)
        # Generated masks are kept as (bounding-box offset, cropped bool array): a few hundred KB each.
        self._extra: dict[tuple[int, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        self.units: list[_Unit] = []
        usable = []
        for case in self.cases:
            ci = len(usable)
            try:
                z_healthy = _read_mask_slices(case, self.planes)
            except CaseError as exc:
                self.errors.append(exc)
                continue
            units = [_Unit(ci, 0, zs, plane) for plane, zs in z_healthy.items() if zs]
            if n_extra:
                try:
                    units += self._generate_extra(case, ci, n_extra)
                except CaseError as exc:
                    self.errors.append(exc)
                    continue
                except MaskPlacementError as exc:  # no room for a mask in a small brain: keep mask-healthy
                    log(f"warning: {case.id}: no extra masks ({exc})")
            usable.append(case)
            self.units += units
        self.cases = usable
        self.pairs: list[tuple[int, int]] = [(u, z) for u, unit in enumerate(self.units) for z in unit.z_slices]
        self._cache: OrderedDict[int, _Prepared] = OrderedDict()
        self._bad_units: set[int] = set()
        # The population atlas (`atlas.build_atlas`) with `model.atlas`; the trainer sets it.
        self.atlas: Optional[np.ndarray] = None
        self.decode_count = 0
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------ index
    def _generate_extra(self, case, ci: int, n: int) -> list[_Unit]:
        data = load_case(case, labels=True).in_ras()
        # Keep clear of the tumour and of the case's own healthy mask; brain = non-zero tissue.
        avoid = np.asarray(data.mask, bool) | np.asarray(data.mask_healthy, bool)
        brain = (np.asarray(data.t1n) != 0) | avoid
        voxel = float(np.prod(data.header.get_zooms()[:3]))
        masks = generate_masks(brain, n, seed=_stable_seed(self.seed, case.id), avoid=avoid, voxel_volume_mm3=voxel)
        units = []
        for k, mask in enumerate(masks, start=1):
            mask = np.asarray(mask, bool)
            nz = np.argwhere(mask)
            if not len(nz):
                continue
            lo, hi = nz.min(0), nz.max(0) + 1
            self._extra[(ci, k)] = (tuple(int(v) for v in lo), mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy())
            units += [_Unit(ci, k, _mask_slices(mask, plane), plane) for plane in self.planes]
        return units

    def _extra_mask(self, ci: int, k: int, shape) -> np.ndarray:
        (x, y, z), crop = self._extra[(ci, k)]
        full = np.zeros(shape, bool)
        full[x : x + crop.shape[0], y : y + crop.shape[1], z : z + crop.shape[2]] = crop
        return full

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def channels(self) -> int:
        return len(input_layout(self.cfg)) - 1  # every input channel but x_t

    # ------------------------------------------------------------------ decoding
    def prepared(self, unit_index: int) -> _Prepared:
        """The decoded unit, from the cache or decoded now (then cached, LRU)."""
        hit = self._cache.get(unit_index)
        if hit is not None:
            self._cache.move_to_end(unit_index)
            return hit
        entry = self._decode(unit_index)
        self._cache[unit_index] = entry
        while len(self._cache) > self.cfg.data.cache_volumes:
            self._cache.popitem(last=False)
        return entry

    def _decode(self, unit_index: int) -> _Prepared:
        unit = self.units[unit_index]
        case = self.cases[unit.case_index]
        data = load_case(case, labels=True).in_ras()
        self.decode_count += 1
        t1n = np.asarray(data.t1n, np.float32)
        if unit.k == 0:
            mask = np.asarray(data.mask_healthy, bool)
        else:
            mask = self._extra_mask(unit.case_index, unit.k, t1n.shape)
        voided = np.where(mask, np.float32(0), t1n)
        if self.cfg.model.atlas and self.atlas is None:
            raise RuntimeError("model.atlas is set but the data set has no atlas (SliceDataset.atlas)")
        atlas = self.atlas if self.cfg.model.atlas else None
        known = self._cached_prior(case.id, unit.k, voided, mask, atlas)
        vin = volume_inputs(voided, mask, self.cfg.data, known, atlas)
        gt = vin.imap.normalize(t1n)
        # The fill and midline are those of the volume; only the slicing turns with the plane.
        vin = vin.in_plane(unit.plane)
        gt, t1n, mask = (to_plane(a, unit.plane) for a in (gt, t1n, mask))

        full_box = None
        if self.cfg.data.crop_size is None:
            # The same brain extent as inference uses (non-zero voided voxels or the mask).
            size = self.cfg.data.slice_size
            box = full_slice_box((t1n != 0) | mask, size=size, case_id=case.id)
            # On a grid smaller than the slice size the box is the whole axis: pad at the high end.
            full_box = tuple(slice(s.start, s.start + max(size, s.stop - s.start)) for s in box)

        ctx = self.cfg.model.context_slices
        z0 = max(min(unit.z_slices) - ctx, 0)
        z1 = min(max(unit.z_slices) + ctx + 1, t1n.shape[2])
        if not unit.z_slices or max(unit.z_slices) >= t1n.shape[2]:
            raise CaseError(case.id, "mask-healthy does not match the image grid")
        view = vin.z_range(z0, z1)
        view.mask = view.mask.astype(np.uint8)  # 0/1: bytes keep the cache small
        return _Prepared(vin=view, gt=np.ascontiguousarray(gt[:, :, z0:z1], dtype=np.float32), z0=z0, full_box=full_box)

    def _cached_prior(
        self, case_id: str, k: int, voided: np.ndarray, mask: np.ndarray, atlas: Optional[np.ndarray] = None
    ) -> Optional[PriorCache]:
        """The unit's harmonic fill, midline and (given an `atlas`) atlas residual from
        `data.cache_dir` (computed and stored there on first use, keyed by the voided volume,
        the mask and the atlas); None without a cache folder."""
        if not self.cfg.data.cache_dir:
            return None
        key = zlib.crc32(np.packbits(mask).tobytes()) ^ zlib.crc32(np.ascontiguousarray(voided).tobytes())
        name = f"{case_id}-{k:03d}-{key:08x}"
        if atlas is not None:
            name += f"-atlas{zlib.crc32(np.ascontiguousarray(atlas, np.float32).tobytes()):08x}"
            name += "" if self.cfg.data.atlas_fit == "box" else f"-{self.cfg.data.atlas_fit}"
        path = Path(self.cfg.data.cache_dir) / f"{name}.npz"
        if path.is_file():
            try:
                with np.load(path) as data:
                    residual = data["atlas"] if atlas is not None else None
                    return PriorCache(fill=data["fill"], shift=int(data["shift"]), atlas=residual)
            except (OSError, ValueError, KeyError):  # a damaged entry is computed again
                pass
        known = prior_cache(voided, mask, atlas, self.cfg.data.atlas_fit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
        extra = {"atlas": known.atlas.astype(np.float32)} if known.atlas is not None else {}
        np.savez(tmp, fill=known.fill.astype(np.float32), shift=np.int64(known.shift), **extra)
        os.replace(tmp, path)
        return known

    # ------------------------------------------------------------------ samples
    def crop_box(self, mask2d: np.ndarray, rng: random.Random, jitter: bool = True) -> tuple[slice, slice]:
        """A crop_size square containing the mask's centre, jittered within the crop's middle half."""
        size = self.cfg.data.crop_size
        starts = []
        for axis in (0, 1):
            coords = np.flatnonzero(mask2d.any(axis=1 - axis))
            centre = (coords.min() + coords.max()) / 2.0
            shift = rng.uniform(-size / 4, size / 4) if jitter else 0.0
            start = int(round(centre - size / 2 + shift))
            extent = mask2d.shape[axis]
            start = min(max(start, 0), extent - size) if extent >= size else 0  # pad at the high end
            starts.append(start)
        return slice(starts[0], starts[0] + size), slice(starts[1], starts[1] + size)

    def sample(self, pair: tuple[int, int], rng: random.Random, augment: Optional[bool] = None) -> dict:
        """x0 [1,H,W] (diffusion space) and cond [C,H,W] of one (unit, z) pair."""
        augment = self.augment if augment is None else augment
        unit_index, z = pair
        entry = self.prepared(unit_index)
        zl = z - entry.z0
        if entry.full_box is not None:
            box = entry.full_box
        else:
            box = self.crop_box(entry.vin.mask[:, :, zl] > 0, rng, jitter=augment)
        cond = slice_conditioning(entry.vin, zl, box, self.cfg.model.context_slices)
        gt = crop(entry.gt[:, :, zl], box)
        if augment and (self.cfg.data.gamma_aug > 0 or self.cfg.data.bias_aug > 0):
            cond, gt = IntensityAugmentation.draw(rng, self.cfg.data).apply(cond, gt, self.cfg.data.mirror)
        x0 = encode_target(gt, cond[0], self.cfg.data.prior)[None]
        if augment and rng.random() < self.cfg.data.flip_prob:
            # Left-right flip (first volume axis): brains are roughly symmetric, other flips are not.
            cond, x0 = cond[:, ::-1], x0[:, ::-1]
        return {
            "x0": torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32)),
            "cond": torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32)),
        }

    def skip_sample(self, rng: random.Random, augment: Optional[bool] = None) -> None:
        """Advance `rng` exactly as `sample` does, without decoding anything (to resume a stream).

        `sample` draws, when augmenting, the crop jitter (one draw per axis, crops only), the
        intensity augmentation and then the flip; keep the two methods in step.
        """
        if not (self.augment if augment is None else augment):
            return
        for _ in range(2 if self.cfg.data.crop_size is not None else 0):
            rng.random()
        if self.cfg.data.gamma_aug > 0 or self.cfg.data.bias_aug > 0:
            IntensityAugmentation.draw(rng, self.cfg.data)
        rng.random()

    def __getitem__(self, index: int) -> dict:
        return self.sample(self.pairs[index], self._rng)

    def case_of(self, pair: tuple[int, int]) -> str:
        return self.cases[self.units[pair[0]].case_index].id


class TrainStream(IterableDataset):
    """Endless shuffled stream of training samples, sharded over DDP ranks and loader workers.

    The cases are dealt out once to the shards (rank x worker) with a seed shared by all of
    them; each epoch a shard walks its own cases in a new order, in groups that fit the volume
    cache, shuffling the pairs within a group. Every volume is thus decoded by a single worker,
    at most once per epoch, and only once per run when the shard's cases fit in its cache. With fewer cases than shards, the pairs themselves are dealt out instead.
    The stream never ends: training is counted in steps, and ranks never run out unevenly.

    `skip` batches of `batch_size` samples are passed over first (without decoding anything):
    a resumed run continues the stream of the uninterrupted one. With loader workers, batch j
    of a rank comes from worker j % workers, so each worker skips its own share.
    """

    def __init__(
        self, dataset: SliceDataset, seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0, batch_size: int = 1
    ):
        if not len(dataset):
            raise ValueError("no training slices: no usable case has a non-empty mask")
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skip = skip
        self.batch_size = batch_size

    def _shard(self) -> tuple[int, int, int]:
        """(this loader shard, number of shards, samples this shard skips)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        skipped_batches = len(range(worker, self.skip, workers))
        return self.rank * workers + worker, self.world_size * workers, skipped_batches * self.batch_size

    def shard_pairs(self, epoch: int, shard: int, n_shards: int) -> list[list[tuple[int, int]]]:
        """The groups of pairs one shard visits in one epoch (each group fits the cache)."""
        ds = self.dataset
        order = list(range(len(ds.cases)))
        # Cases are dealt to shards once (not per epoch): a shard whose cases all fit in its
        # cache then decodes each of them only once for the whole run.
        random.Random(_stable_seed(self.seed, "deal")).shuffle(order)
        by_case: dict[int, list[tuple[int, int]]] = {}
        for pair in ds.pairs:
            by_case.setdefault(ds.units[pair[0]].case_index, []).append(pair)
        order = [c for c in order if c in by_case]
        local = random.Random(_stable_seed(self.seed, "shard", shard, epoch))
        if len(order) >= n_shards:
            mine = order[shard::n_shards]
            local.shuffle(mine)
            units_per_case = max(1, math.ceil(len(ds.units) / max(1, len(by_case))))
            per_group = max(1, ds.cfg.data.cache_volumes // units_per_case)
            groups = []
            for i in range(0, len(mine), per_group):
                group = [p for c in mine[i : i + per_group] for p in by_case[c]]
                local.shuffle(group)
                groups.append(group)
            return groups
        pairs = [p for c in order for p in by_case[c]]
        random.Random(_stable_seed(self.seed, "pairs", epoch)).shuffle(pairs)
        mine = pairs[shard::n_shards] or [pairs[shard % len(pairs)]]
        return [mine]

    def __iter__(self) -> Iterator[dict]:
        shard, n_shards, skip = self._shard()
        ds = self.dataset
        epoch = 0
        while True:
            aug = random.Random(_stable_seed(self.seed, "augment", shard, epoch))
            produced = 0
            for group in self.shard_pairs(epoch, shard, n_shards):
                for pair in group:
                    if pair[0] in ds._bad_units:
                        continue
                    if skip:
                        ds.skip_sample(aug)
                        skip -= 1
                        produced += 1
                        continue
                    try:
                        yield ds.sample(pair, aug)
                    except CaseError as exc:
                        ds._bad_units.add(pair[0])
                        ds.log(f"warning: skipping {exc}")
                        continue
                    produced += 1
            if produced == 0:
                raise RuntimeError("every training case assigned to this loader failed to load")
            epoch += 1


def train_loader(dataset: SliceDataset, tc, workers: int, dist, step: int, device) -> DataLoader:
    """The training data stream of this rank, past the batches `step` steps have used."""
    stream = TrainStream(dataset, seed=tc.seed * 1000003, rank=dist.rank, world_size=dist.world_size, skip=step,
                         batch_size=tc.batch_size)
    return DataLoader(
        stream,
        batch_size=tc.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
