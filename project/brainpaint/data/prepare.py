"""Build BraTS-layout training/validation cases from healthy skull-stripped T1 volumes.

BraTS data cannot be redistributed, so the project makes its own "local synthesis" cases from
any collection of healthy, skull-stripped T1 NIfTI files (the 56 CC0 brains under
`../shared/data/healthy-t1/` by default):

1. **Conform** each volume to the BraTS grid: reorient to RAS (`nib.as_closest_canonical`);
   when the voxels are not 1 mm axis-aligned, resample linearly onto a 1 mm RAS grid (with a
   Gaussian anti-alias filter when downsampling); then pad/crop to 240x240x155 with the brain's
   bounding box centred, and store as int16. Intensities keep their scale, except that negative
   values become 0 (background) and images whose maximum is above 32767 or below 100 (float
   images normalised to [0, 1], say) are scaled linearly to a maximum of 4095 so int16 holds
   them without losing levels. Arrays are `[x, y, z]` in RAS voxel order, the affine records
   where the grid lies in scanner space.
2. **Brain mask**: the input is skull-stripped, so the brain is every voxel above 0, with
   enclosed holes filled.
3. **Masks**: `masks_per_subject` tumour-shaped masks (`brainpaint.masks`), each one case.
4. **Write** `<out>/<split>/<ID>/<ID>-{t1n, t1n-voided, mask, mask-healthy, mask-unhealthy}.nii.gz`:
   the voided image is t1n with the mask set to 0; a healthy brain has no tumour, so `mask` is
   the healthy mask and `mask-unhealthy` is all zeros (kept so the layout matches BraTS
   training folders). Each case is written to a hidden temporary folder and renamed into place.
5. **Manifest** `<out>/manifest.json`: the settings and, per case, source file, subject,
   split, seed, mask volume (cm³) and brain overlap; failed inputs are listed too.

Case IDs are `BraTS-SYN-<subject number, 5 digits>-<mask index, 3 digits>`; the subject
number is the first number in the file name (`sub-49_T1w.nii.gz` -> 49) when those numbers are
unique, otherwise the 1-based position in the (natural) file order.

Split by subject (never by case, so no brain is in both): `val_subjects` is a comma-separated
list of subject names (`sub-49,sub-50`; the name is the file stem up to the first `_`, or
the whole stem), a count `N` (the last N subjects in natural order), `none`, or empty for the
project default: the last seventh of the subjects, which for the 56 shared brains is
sub-49..sub-56.

**Tumour brains** (`lesion_suffix`, e.g. BraTS 2018's `<ID>/<ID>_t1.nii.gz` beside
`<ID>/<ID>_seg.nii.gz`: `image_suffix="_t1"`, `lesion_suffix="_seg"`). The image and its lesion
segmentation must share one grid, the BraTS grid (240x240x155, 1 mm); the case keeps that grid
and its stored orientation (LPS for BraTS), as the challenge's cases do. The tumour (label > 0,
grown by `lesion_margin` voxels) is voided and written as `mask-unhealthy`; the
`masks_per_subject` tumour-shaped healthy masks are placed clear of it (and of its margin) and
not clipped to the brain, as the organisers' masks can reach past the brain's edge, where the
truth is background; `mask` is the union, and only `mask-healthy` is ever scored. Their case
IDs start with `BraTS-GLI`, so tumour and healthy cases can share one training folder.

Each subject's mask seed is derived from (`seed`, subject number), so adding or removing
other files never changes a subject's masks; `masks.generate_masks(brain, n, seed)[k]`
reproduces mask `k` from the manifest's `seed`.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from brainpaint.conditioning.geometry import crop
from brainpaint.config.settings import PrepareConfig
from brainpaint.data import masks as maskgen
from brainpaint.errors import ConfigError, PrepareError, one_line
from brainpaint.io.atomic import atomic_folder, write_text
from brainpaint.io.brats import SUFFIXES, write_nifti_atomic

TARGET_SHAPE = (240, 240, 155)
DEFAULT_VOLUME_RANGE_CM3 = (5.0, 200.0)
DEFAULT_VAL_FRACTION = 1.0 / 7.0
CASE_PREFIX = "BraTS-SYN"
TUMOUR_PREFIX = "BraTS-GLI"
INT16_MAX = 32767
RESCALED_MAX = 4095.0
FULL_LAYOUT = ("t1n", "voided", "mask", "mask_healthy", "mask_unhealthy")


@dataclass
class Subject:
    name: str  # e.g. "sub-49"
    path: Path
    number: int  # used in the case IDs
    lesion: Optional[Path] = None  # the lesion segmentation of a tumour brain


@dataclass
class Conformed:
    """A volume on the BraTS grid and what was done to get it there."""

    t1n: np.ndarray  # int16 [240, 240, 155]
    affine: np.ndarray
    brain: np.ndarray  # bool
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs
def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _images(input_dir: Path, image_suffix: str) -> list[Path]:
    """NIfTI files directly in `input_dir` or, with an `image_suffix`, also one folder down,
    whose stem ends in `image_suffix` (natural order)."""
    folders = [Path(input_dir)]
    if image_suffix:
        folders += sorted(p for p in Path(input_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        p for folder in folders for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_file() and p.name.endswith((".nii", ".nii.gz"))
        and _stem(p).endswith(image_suffix)
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def find_subjects(input_dir: Path, image_suffix: str = "", lesion_suffix: str = "") -> list[Subject]:
    """The input images (`_images`) with their names and numbers and, with a `lesion_suffix`,
    their lesion files (PrepareError naming the image when one is missing)."""
    files = _images(input_dir, image_suffix)
    names = []
    for p in files:
        stem = _stem(p)[: len(_stem(p)) - len(image_suffix)]
        names.append(stem.split("_")[0] if stem.startswith("sub-") else stem)
    numbers = []
    for name in names:
        match = re.search(r"\d+", name)
        numbers.append(int(match.group()) if match else None)
    usable = all(n is not None and n < 100_000 for n in numbers) and len(set(numbers)) == len(numbers)
    if not usable:
        numbers = list(range(1, len(files) + 1))
    subjects = [Subject(name, path, number) for name, path, number in zip(names, files, numbers)]
    for subject in subjects if lesion_suffix else []:
        stem = _stem(subject.path)
        ext = subject.path.name[len(stem):]
        lesion = subject.path.with_name(stem[: len(stem) - len(image_suffix)] + lesion_suffix + ext)
        if not lesion.is_file():
            raise PrepareError(subject.path.name, f"no lesion file {lesion.name} beside it")
        subject.lesion = lesion
    return subjects


def split_subjects(subjects: list[Subject], val_subjects: str) -> set[str]:
    """Names of the validation subjects for a `val_subjects` spec (see module doc)."""
    spec = (val_subjects or "").strip()
    names = [s.name for s in subjects]
    if spec == "":
        count = int(round(len(names) * DEFAULT_VAL_FRACTION))
        if len(names) >= 2:
            count = max(1, count)
        return set(names[len(names) - count:]) if count else set()
    if spec.lower() == "none":
        return set()
    if spec.isdigit():
        count = int(spec)
        if count > len(names):
            raise ConfigError(f"prepare.val_subjects is {count} but only {len(names)} subjects were found")
        return set(names[len(names) - count:]) if count else set()
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    by_stem = {_stem(s.path): s.name for s in subjects}
    chosen, unknown = set(), []
    for w in wanted:
        if w in names:
            chosen.add(w)
        elif w in by_stem:
            chosen.add(by_stem[w])
        else:
            unknown.append(w)
    if unknown:
        raise ConfigError(f"prepare.val_subjects: no input file for subject(s) {', '.join(unknown)}")
    return chosen


def case_id(subject_number: int, mask_index: int, prefix: str = CASE_PREFIX) -> str:
    return f"{prefix}-{subject_number:05d}-{mask_index:03d}"


def subject_seed(seed: int, subject_number: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(subject_number)]).generate_state(1)[0])


# --------------------------------------------------------------------------- conforming
def conform(img: nib.spatialimages.SpatialImage, source: str = "image", shape=TARGET_SHAPE) -> Conformed:
    """Reorient, resample, pad/crop and cast one healthy T1 to the BraTS grid (module doc, 1-2)."""
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise PrepareError(source, f"expected a 3D image, got shape {tuple(img.shape)}")
    info = {
        "source_shape": [int(s) for s in img.shape],
        "source_spacing_mm": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
        "source_orientation": "".join(nib.aff2axcodes(img.affine)),
    }
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))
    if not np.isfinite(data).all():
        raise PrepareError(source, "image contains NaN or infinite voxels")
    affine = canonical.affine
    if np.allclose(affine[:3, :3], np.eye(3), atol=1e-3):
        info["resampled"] = False
    else:
        data, affine = _resample_to_ras_1mm(data, affine)
        info["resampled"] = True

    data = np.clip(data, 0, None)
    peak = float(data.max())
    if peak <= 0:
        raise PrepareError(source, "image has no voxel above 0 (expected a skull-stripped brain)")
    scale = 1.0
    if peak > INT16_MAX or peak < 100:
        scale = RESCALED_MAX / peak
        data = data * scale
    info["intensity_scale"] = scale

    data, affine, cropped = _pad_crop_centred(data, affine, shape)
    info["brain_voxels_cropped"] = cropped
    t1n = np.rint(data).astype(np.int16)
    brain = ndimage.binary_fill_holes(t1n > 0)
    if not brain.any():
        raise PrepareError(source, "no brain voxel left after conforming to the BraTS grid")
    info["brain_volume_cm3"] = round(float(brain.sum()) / 1000.0, 2)
    return Conformed(t1n=t1n, affine=affine, brain=brain, info=info)


def _resample_to_ras_1mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling onto an axis-aligned 1 mm RAS grid that covers the whole input."""
    shape = np.array(data.shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = (affine @ corners.T)[:3]
    origin = np.floor(world.min(axis=1))
    out_shape = tuple(int(v) for v in np.ceil(world.max(axis=1) - origin) + 1)
    out_affine = np.eye(4)
    out_affine[:3, 3] = origin
    # Anti-aliasing: input voxels per output voxel along each input axis.
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.clip((1.0 / spacing - 1.0) / 2.0, 0.0, None)
    if sigma.any():
        data = ndimage.gaussian_filter(data, sigma)
    to_input = np.linalg.inv(affine) @ out_affine
    out = ndimage.affine_transform(
        data, to_input[:3, :3], offset=to_input[:3, 3], output_shape=out_shape, order=1, mode="constant", cval=0.0
    )
    return out.astype(np.float32, copy=False), out_affine


def _pad_crop_centred(data: np.ndarray, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, int]:
    """Place `data` on a grid of `shape` with the bounding box of voxels > 0 centred."""
    nonzero = np.nonzero(data > 0)
    start = []
    for axis, size in enumerate(shape):
        lo, hi = int(nonzero[axis].min()), int(nonzero[axis].max())
        start.append(int(np.floor((lo + hi + 1) / 2.0 - size / 2.0)))
    out = crop(data, tuple(slice(s, s + size) for s, size in zip(start, shape)))
    cropped = int(np.count_nonzero(data > 0) - np.count_nonzero(out > 0))
    shift = np.eye(4)
    shift[:3, 3] = start
    return out, affine @ shift, cropped


# --------------------------------------------------------------------------- writing
def _header() -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    return header


def write_case(
    parent: Path, cid: str, t1n: np.ndarray, mask: np.ndarray, affine: np.ndarray, layout=FULL_LAYOUT,
    unhealthy: Optional[np.ndarray] = None,
) -> Path:
    """Write `<parent>/<cid>/` with the files of `layout`; the folder appears only when complete.

    `mask` is the healthy mask; an `unhealthy` one (a tumour) is voided too and `mask` is then
    the union. A previous folder of the same name is replaced (renamed aside, then deleted).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / cid
    healthy = mask.astype(bool)
    unhealthy = np.zeros(healthy.shape, bool) if unhealthy is None else unhealthy.astype(bool)
    union = healthy | unhealthy
    arrays = {
        "t1n": (t1n, np.int16),
        "voided": (np.where(union, 0, t1n), np.int16),
        "mask": (union, np.uint8),
        "mask_healthy": (healthy, np.uint8),
        "mask_unhealthy": (unhealthy, np.uint8),
    }
    with atomic_folder(final) as tmp:
        for role in layout:
            array, dtype = arrays[role]
            write_nifti_atomic(array.astype(dtype), _header(), affine, tmp / f"{cid}-{SUFFIXES[role]}", dtype=dtype)
    return final


# --------------------------------------------------------------------------- one subject
def _read(path: Path):
    """A NIfTI image with its voxels read (PrepareError naming the file when unreadable)."""
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # read now so a truncated file fails here
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean "unreadable"
        raise PrepareError(path.name, f"cannot read NIfTI: {type(exc).__name__}: {exc}") from exc
    return img


def conform_tumour_brain(subject: Subject, margin: int) -> tuple[Conformed, np.ndarray]:
    """A tumour brain on its own BraTS grid (module doc, "Tumour brains") and its voided tumour."""
    source = subject.path.name
    img, seg = _read(subject.path), _read(subject.lesion)
    if tuple(img.shape) != TARGET_SHAPE:
        raise PrepareError(source, f"with a lesion file the image must be on the BraTS grid {TARGET_SHAPE}, got {tuple(img.shape)}")
    if tuple(seg.shape) != tuple(img.shape) or not np.allclose(seg.affine, img.affine, atol=1e-3):
        raise PrepareError(subject.lesion.name, f"not on the grid of {source}")
    data = np.clip(np.asarray(img.get_fdata(dtype=np.float32)), 0, None)
    if not np.isfinite(data).all() or data.max() <= 0:
        raise PrepareError(source, "image has non-finite voxels or no voxel above 0")
    scale = RESCALED_MAX / float(data.max()) if (data.max() > INT16_MAX or data.max() < 100) else 1.0
    t1n = np.rint(data * scale).astype(np.int16)
    tumour = np.asarray(seg.dataobj) > 0
    if not tumour.any():
        raise PrepareError(subject.lesion.name, "the lesion segmentation is empty")
    if margin:
        tumour = ndimage.binary_dilation(tumour, iterations=margin)
    brain = ndimage.binary_fill_holes(t1n > 0) | tumour
    info = {
        "source_orientation": "".join(nib.aff2axcodes(img.affine)), "intensity_scale": scale,
        "brain_volume_cm3": round(float(brain.sum()) / 1000.0, 2), "tumour_volume_cm3": round(float(tumour.sum()) / 1000.0, 2),
    }
    return Conformed(t1n=t1n, affine=img.affine, brain=brain, info=info), tumour


def prepare_subject(
    subject: Subject, n_masks: int, seed: int, volume_range_cm3=DEFAULT_VOLUME_RANGE_CM3, placement: str = "central",
    lesion_margin: int = 2,
) -> tuple[Conformed, list[maskgen.GeneratedMask], int, Optional[np.ndarray]]:
    """Load, conform and draw the healthy masks of one subject (raises PrepareError naming the
    file); the voided tumour of a tumour brain (`subject.lesion`), else None."""
    tumour = None
    if subject.lesion is not None:
        conformed, tumour = conform_tumour_brain(subject, lesion_margin)
    else:
        conformed = conform(_read(subject.path), subject.path.name)
    sseed = subject_seed(seed, subject.number)
    try:
        found = maskgen.generate_mask_details(
            conformed.brain, n_masks, sseed, volume_range_cm3=volume_range_cm3, placement=placement,
            avoid=tumour, clip_to_brain=tumour is None,
        )
    except maskgen.MaskPlacementError as exc:
        raise PrepareError(subject.path.name, f"mask placement failed: {exc}") from exc
    return conformed, found, sseed, tumour


# --------------------------------------------------------------------------- command
def run_prepare(
    input_path: str | Path,
    output_path: str | Path,
    masks_per_subject: int = 1,
    val_subjects: str = "",
    seed: int = 0,
    volume_range_cm3: tuple[float, float] = DEFAULT_VOLUME_RANGE_CM3,
    placement: str = "central",
    image_suffix: str = "",
    lesion_suffix: str = "",
    lesion_margin: int = 2,
) -> int:
    """Build the data set (module doc). Returns 0, or 1 if any input failed, 2 for bad arguments.

    The options are checked as the `prepare` section of the configuration (`PrepareConfig`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    try:
        options = PrepareConfig(
            masks_per_subject=masks_per_subject, val_subjects=val_subjects, seed=seed, placement=placement,
            image_suffix=image_suffix, lesion_suffix=lesion_suffix, lesion_margin=lesion_margin,
        )
        subjects, val = _plan(input_path, options)
    except (ConfigError, PrepareError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_path.mkdir(parents=True, exist_ok=True)
    cases, failed = [], []
    started = time.time()
    for subject in tqdm(subjects, desc="prepare", unit="subject", file=sys.stderr):
        split = "val" if subject.name in val else "train"
        try:
            cases += _write_subject(subject, split, output_path, options, volume_range_cm3)
        except Exception as exc:  # a failure (expected or not) must not stop the other subjects
            problem = exc.problem if isinstance(exc, PrepareError) else one_line(f"{type(exc).__name__}: {exc}")
            failed.append({"source": subject.path.name, "error": problem})
            tqdm.write(f"error: {subject.path.name}: {problem}", file=sys.stderr)
    manifest = {
        "tool": "brainpaint prepare",
        "input_path": str(input_path.resolve()),
        "grid": list(TARGET_SHAPE),
        "seed": options.seed,
        "masks_per_subject": options.masks_per_subject,
        "placement": options.placement,
        "lesions": {"image_suffix": options.image_suffix, "lesion_suffix": options.lesion_suffix,
                    "margin": options.lesion_margin} if options.lesion_suffix else None,
        "volume_range_cm3": list(volume_range_cm3),
        "val_subjects": sorted(val, key=_natural_key),
        "cases": cases,
        "failed": failed,
    }
    write_text(output_path / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    n_val = sum(c["split"] == "val" for c in cases)
    print(
        f"prepared {len(cases)} cases ({len(cases) - n_val} train, {n_val} val) from "
        f"{len(subjects) - len(failed)} of {len(subjects)} subjects in {time.time() - started:.0f} s"
        + (f"; {len(failed)} failed" if failed else "")
    )
    return 1 if failed else 0


def _plan(input_path: Path, options: PrepareConfig) -> tuple[list[Subject], set[str]]:
    """The input subjects and the names of the validation ones (ConfigError when unusable)."""
    if not input_path.is_dir():
        raise ConfigError(f"input folder {input_path} does not exist or is not a folder")
    subjects = find_subjects(input_path, options.image_suffix, options.lesion_suffix)
    if not subjects:
        raise ConfigError(f"no .nii or .nii.gz files in {input_path}" + (f" ending in {options.image_suffix}" if options.image_suffix else ""))
    return subjects, split_subjects(subjects, options.val_subjects)


def _write_subject(subject: Subject, split: str, output_path: Path, options: PrepareConfig, volume_range_cm3) -> list[dict]:
    """Write the cases of one subject into `output_path/split`; their manifest entries."""
    other = "train" if split == "val" else "val"
    conformed, found, sseed, tumour = prepare_subject(
        subject, options.masks_per_subject, options.seed, volume_range_cm3, options.placement, options.lesion_margin
    )
    entries = []
    for k, g in enumerate(found):
        cid = case_id(subject.number, k, CASE_PREFIX if tumour is None else TUMOUR_PREFIX)
        write_case(output_path / split, cid, conformed.t1n, g.mask, conformed.affine, unhealthy=tumour)
        if (output_path / other / cid).exists():  # left over from a run with another split
            shutil.rmtree(output_path / other / cid)
        entries.append(
            {
                "id": cid,
                "split": split,
                "subject": subject.name,
                "source": subject.path.name,
                "seed": sseed,
                "mask_index": k,
                "mask_volume_cm3": round(g.volume_cm3, 3),
                "mask_brain_overlap": round(g.brain_overlap, 4),
                **conformed.info,
            }
        )
    return entries


def build_demo(
    source_dir: str | Path,
    data_dir: str | Path,
    subjects: tuple[str, ...] = ("sub-55", "sub-56"),
    seed: int = 2023,
    volume_range_cm3: tuple[float, float] = (20.0, 60.0),
) -> list[str]:
    """Write the shipped demo cases, in the full BraTS training layout, into `data_dir`.

    The ground-truth files sit beside the voided image and mask, so the same folder serves
    `infer` and `evaluate --labels`. Used once to make `workspace/data/` from the shared CC0
    brains; kept here so the demo can be rebuilt exactly (`python -c "from brainpaint.prepare
    import build_demo; build_demo('../shared/data/healthy-t1', 'workspace/data')"`).
    The volume range is moderate so the demo masks are clearly visible but quick to inpaint.
    """
    by_name = {s.name: s for s in find_subjects(Path(source_dir))}
    ids = []
    # The demo is committed to the repository: compress it harder than nibabel's default.
    level = nib.openers.Opener.default_compresslevel
    nib.openers.Opener.default_compresslevel = 9
    try:
        for name in subjects:
            if name not in by_name:
                raise PrepareError(name, f"not found in {source_dir}")
            subject = by_name[name]
            conformed, found, _, _ = prepare_subject(subject, 1, seed, volume_range_cm3)
            cid = case_id(subject.number, 0)
            mask = found[0].mask
            write_case(Path(data_dir), cid, conformed.t1n, mask, conformed.affine, layout=FULL_LAYOUT)
            ids.append(cid)
    finally:
        nib.openers.Opener.default_compresslevel = level
    return ids
