"""Training slices (x0, conditioning) from BraTS-layout cases.

What the network sees is built by `conditioning` (`inputs.volume_inputs`,
`layout.InputLayout.build`, `target.encode_target`), as at inference, so training and
inference cannot drift apart.

For training, the ground truth is `t1n` and the region cut out is `mask-healthy`: the
conditioning is `t1n` with the mask-healthy voxels set to 0 while the tumour stays
visible, as in the paper. Each volume is decoded once per loader worker and kept in a
small cache together with its (expensive) harmonic fill; `TrainStream` walks the pairs
volume-group by volume-group so that the cache is hit, never thrashed.
"""
from __future__ import annotations

import os
import random
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

from brainpaint.conditioning.geometry import crop, full_slice_box
from brainpaint.conditioning.inputs import PriorCache, VolumeInputs, prior_cache, prior_key, volume_inputs
from brainpaint.conditioning.layout import InputLayout
from brainpaint.conditioning.target import encode_target
from brainpaint.data.augment import IntensityAugmentation
from brainpaint.data.masks import generate_masks
from brainpaint.errors import CaseError, MaskPlacementError
from brainpaint.io.brats import discover_cases, load_case, to_ras


@dataclass
class _Unit:
    """One (case, mask) training volume: k == 0 is mask-healthy, k >= 1 a generated mask."""

    case_index: int
    k: int
    z_slices: tuple[int, ...]  # axial slices where this mask is non-empty


@dataclass
class _Prepared:
    """A decoded unit restricted to the slices training can touch (mask slices +- context)."""

    vin: VolumeInputs  # b and mask of slices z0 .. z0 + depth
    gt: np.ndarray  # normalised ground truth, same slices
    known: np.ndarray  # uint8, 0 in a voided tumour (no truth there), same slices
    z0: int
    full_box: Optional[tuple]  # whole-slice box (crop_size None), else None


@dataclass
class SampleDraw:
    """Every random choice of one training sample: the crop's shift, the intensity augmentation
    and the left-right flip. `draw_sample` makes them all, so that a resumed stream
    (`SliceDataset.skip_sample`) advances the generator exactly as the samples it skips did."""

    jitter: tuple[float, float] = (0.0, 0.0)
    augmentation: Optional[IntensityAugmentation] = None
    flip: bool = False


def draw_sample(rng: random.Random, data_cfg, augment: bool) -> SampleDraw:
    """The random choices of one sample (none without augmentation): the crop jitter (crops
    only, one shift per axis within the crop's middle half), then the intensity augmentation,
    then the flip."""
    if not augment:
        return SampleDraw()
    jitter = (0.0, 0.0)
    if data_cfg.crop_size is not None:
        quarter = data_cfg.crop_size / 4
        jitter = (rng.uniform(-quarter, quarter), rng.uniform(-quarter, quarter))
    augmentation = None
    if data_cfg.gamma_aug > 0 or data_cfg.bias_aug > 0:
        augmentation = IntensityAugmentation.draw(rng, data_cfg)
    return SampleDraw(jitter, augmentation, rng.random() < data_cfg.flip_prob)


def _stable_seed(*parts) -> int:
    """A seed that is the same in every process (unlike hash() of strings)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _mask_slices(mask: np.ndarray) -> tuple[int, ...]:
    """Indices of the axial slices where `mask` [X, Y, Z] is non-empty."""
    return tuple(int(z) for z in np.flatnonzero(mask.any(axis=(0, 1))))


def _read_mask_slices(case) -> tuple[int, ...]:
    """The axial slices where mask-healthy is non-empty, reading only that (small) file."""
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
    return _mask_slices(mask)


class SliceDataset(Dataset):
    """Training pairs (x0 [1,H,W], cond [C,H,W]) from BraTS-layout cases with labels.

    Cases are used in RAS axes (`CaseData.in_ras`), the frame inference gives the network.
    A pair is (case, mask k, z) for every axial slice z (the RAS volume's last axis) where the
    mask is non-empty; mask 0 is the case's mask-healthy, masks 1..n are
    `data.extra_masks_per_volume` generated healthy masks (`masks.generate_masks`, sized in cm³
    with the case's voxel spacing; a brain with no room for them keeps its mask-healthy alone,
    with a warning).
    Cases that cannot be used are collected in `.errors` (one-line CaseErrors) and skipped.

    Decoded units live in an LRU cache of `data.cache_volumes` entries per process/worker;
    `decode_count` counts decodes so benchmarks and tests can see the cache working.
    """

    def __init__(self, source, cfg, *, augment: bool = True, seed: int = 0, log=print):
        self.cfg = cfg
        self.layout = InputLayout.of(cfg)
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
        # Generated masks are kept as (bounding-box offset, cropped bool array): a few hundred KB each.
        self._extra: dict[tuple[int, int], tuple[tuple[int, int, int], np.ndarray]] = {}
        self.units: list[_Unit] = []
        usable = []
        for case in self.cases:
            ci = len(usable)
            try:
                z_healthy = _read_mask_slices(case)
            except CaseError as exc:
                self.errors.append(exc)
                continue
            units = [_Unit(ci, 0, z_healthy)] if z_healthy else []
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
            units.append(_Unit(ci, k, _mask_slices(mask)))
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
        return len(self.layout.conditioning)

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
        # A tumour brain's tumour (mask minus mask-healthy) is voided as at inference; its truth
        # is not healthy tissue, so it is never a target (`_Prepared.known`).
        tumour = np.asarray(data.mask, bool) & ~np.asarray(data.mask_healthy, bool)
        healthy = np.asarray(data.mask_healthy, bool) if unit.k == 0 else self._extra_mask(unit.case_index, unit.k, t1n.shape)
        mask = healthy | tumour
        voided = np.where(mask, np.float32(0), t1n)
        if self.cfg.model.atlas and self.atlas is None:
            raise RuntimeError("model.atlas is set but the data set has no atlas (SliceDataset.atlas)")
        atlas = self.atlas if self.cfg.model.atlas else None
        known = self._cached_prior(case.id, unit.k, voided, mask, atlas)
        vin = volume_inputs(voided, mask, self.cfg.data, known, atlas)
        gt = vin.imap.normalize(t1n)

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
        return _Prepared(vin=view, gt=np.ascontiguousarray(gt[:, :, z0:z1], dtype=np.float32),
                         known=np.ascontiguousarray(~tumour[:, :, z0:z1], dtype=np.uint8), z0=z0, full_box=full_box)

    def _cached_prior(
        self, case_id: str, k: int, voided: np.ndarray, mask: np.ndarray, atlas: Optional[np.ndarray] = None
    ) -> Optional[PriorCache]:
        """The unit's harmonic fill, midline and (given an `atlas`) atlas residual from
        `data.cache_dir` (computed and stored there on first use, keyed by `inputs.prior_key`:
        the algorithm's version, the voided volume, the mask and the atlas); None without a
        cache folder."""
        if not self.cfg.data.cache_dir:
            return None
        name = f"{case_id}-{k:03d}-{prior_key(voided, mask, atlas, self.cfg.data.atlas_fit)}"
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
    def crop_box(self, mask2d: np.ndarray, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[slice, slice]:
        """A crop_size square containing the mask's centre, shifted by `jitter` (`SampleDraw`)."""
        size = self.cfg.data.crop_size
        starts = []
        for axis in (0, 1):
            coords = np.flatnonzero(mask2d.any(axis=1 - axis))
            centre = (coords.min() + coords.max()) / 2.0
            start = int(round(centre - size / 2 + jitter[axis]))
            extent = mask2d.shape[axis]
            start = min(max(start, 0), extent - size) if extent >= size else 0  # pad at the high end
            starts.append(start)
        return slice(starts[0], starts[0] + size), slice(starts[1], starts[1] + size)

    def sample(self, pair: tuple[int, int], rng: random.Random, augment: Optional[bool] = None) -> dict:
        """x0 [1,H,W] (diffusion space) and cond [C,H,W] of one (unit, z) pair."""
        draw = draw_sample(rng, self.cfg.data, self.augment if augment is None else augment)
        unit_index, z = pair
        entry = self.prepared(unit_index)
        zl = z - entry.z0
        box = entry.full_box if entry.full_box is not None else self.crop_box(entry.vin.mask[:, :, zl] > 0, draw.jitter)
        cond = self.layout.build(entry.vin, zl, box)
        gt = crop(entry.gt[:, :, zl], box)
        known = crop(entry.known[:, :, zl], box).astype(np.float32)
        if draw.augmentation is not None:
            cond, gt = draw.augmentation.apply(cond, gt, self.layout)
        b = cond[self.layout.index("b")]
        x0 = encode_target(np.where(known > 0, gt, b) if not known.all() else gt, b, self.cfg.data.prior)[None]
        weight = known[None]
        if draw.flip:  # left-right (first volume axis): brains are roughly symmetric, other flips are not
            cond, x0, weight = cond[:, ::-1], x0[:, ::-1], weight[:, ::-1]
        return {
            "x0": torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32)),
            "cond": torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32)),
            "weight": torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
        }

    def skip_sample(self, rng: random.Random, augment: Optional[bool] = None) -> None:
        """Advance `rng` exactly as `sample` does, without decoding anything (to resume a stream)."""
        draw_sample(rng, self.cfg.data, self.augment if augment is None else augment)

    def __getitem__(self, index: int) -> dict:
        return self.sample(self.pairs[index], self._rng)

    def case_of(self, pair: tuple[int, int]) -> str:
        return self.cases[self.units[pair[0]].case_index].id
