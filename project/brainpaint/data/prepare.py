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
INT16_MAX = 32767
RESCALED_MAX = 4095.0
FULL_LAYOUT = ("t1n", "voided", "mask", "mask_healthy", "mask_unhealthy")


@dataclass
class Subject:
    name: str  # e.g. "sub-49"
    path: Path
    number: int  # used in the case IDs


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


def find_subjects(input_dir: Path) -> list[Subject]:
    """NIfTI files directly in `input_dir` (natural order) with their names and numbers."""
    files = [
        p for p in Path(input_dir).iterdir()
        if not p.name.startswith(".") and p.is_file() and p.name.endswith((".nii", ".nii.gz"))
    ]
    files.sort(key=lambda p: _natural_key(p.name))
    names = []
    for p in files:
        stem = _stem(p)
        names.append(stem.split("_")[0] if stem.startswith("sub-") else stem)
    numbers = []
    for name in names:
        match = re.search(r"\d+", name)
        numbers.append(int(match.group()) if match else None)
    usable = all(n is not None and n < 100_000 for n in numbers) and len(set(numbers)) == len(numbers)
    if not usable:
        numbers = list(range(1, len(files) + 1))
    return [Subject(name, path, number) for name, path, number in zip(names, files, numbers)]


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


def case_id(subject_number: int, mask_index: int) -> str:
    return f"{CASE_PREFIX}-{subject_number:05d}-{mask_index:03d}"


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
    parent: Path, cid: str, t1n: np.ndarray, mask: np.ndarray, affine: np.ndarray, layout=FULL_LAYOUT
) -> Path:
    """Write `<parent>/<cid>/` with the files of `layout`; the folder appears only when complete.

    A previous folder of the same name is replaced (renamed aside, then deleted).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / cid
    mask = mask.astype(bool)
    arrays = {
        "t1n": (t1n, np.int16),
        "voided": (np.where(mask, 0, t1n), np.int16),
        "mask": (mask, np.uint8),
        "mask_healthy": (mask, np.uint8),
        "mask_unhealthy": (np.zeros(mask.shape, np.uint8), np.uint8),
    }
    with atomic_folder(final) as tmp:
        for role in layout:
            array, dtype = arrays[role]
            write_nifti_atomic(array.astype(dtype), _header(), affine, tmp / f"{cid}-{SUFFIXES[role]}", dtype=dtype)
    return final


# --------------------------------------------------------------------------- one subject
def prepare_subject(
    subject: Subject, n_masks: int, seed: int, volume_range_cm3=DEFAULT_VOLUME_RANGE_CM3, placement: str = "central"
) -> tuple[Conformed, list[maskgen.GeneratedMask], int]:
    """Load, conform and draw the masks of one subject (raises PrepareError naming the file)."""
    source = subject.path.name
    try:
        img = nib.load(str(subject.path))
        img.get_fdata(dtype=np.float32)  # read now so a truncated file fails here
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean "unreadable"
        raise PrepareError(source, f"cannot read NIfTI: {type(exc).__name__}: {exc}") from exc
    conformed = conform(img, source)
    sseed = subject_seed(seed, subject.number)
    try:
        found = maskgen.generate_mask_details(
            conformed.brain, n_masks, sseed, volume_range_cm3=volume_range_cm3, placement=placement
        )
    except maskgen.MaskPlacementError as exc:
        raise PrepareError(source, f"mask placement failed: {exc}") from exc
    return conformed, found, sseed


# --------------------------------------------------------------------------- command
def run_prepare(
    input_path: str | Path,
    output_path: str | Path,
    masks_per_subject: int = 1,
    val_subjects: str = "",
    seed: int = 0,
    volume_range_cm3: tuple[float, float] = DEFAULT_VOLUME_RANGE_CM3,
    placement: str = "central",
) -> int:
    """Build the data set (module doc). Returns 0, or 1 if any input failed, 2 for bad arguments.

    The options are checked as the `prepare` section of the configuration (`PrepareConfig`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    try:
        options = PrepareConfig(
            masks_per_subject=masks_per_subject, val_subjects=val_subjects, seed=seed, placement=placement
        )
        subjects, val = _plan(input_path, options)
    except ConfigError as exc:
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
    subjects = find_subjects(input_path)
    if not subjects:
        raise ConfigError(f"no .nii or .nii.gz files in {input_path}")
    return subjects, split_subjects(subjects, options.val_subjects)


def _write_subject(subject: Subject, split: str, output_path: Path, options: PrepareConfig, volume_range_cm3) -> list[dict]:
    """Write the cases of one subject into `output_path/split`; their manifest entries."""
    other = "train" if split == "val" else "val"
    conformed, found, sseed = prepare_subject(
        subject, options.masks_per_subject, options.seed, volume_range_cm3, options.placement
    )
    entries = []
    for k, g in enumerate(found):
        cid = case_id(subject.number, k)
        write_case(output_path / split, cid, conformed.t1n, g.mask, conformed.affine)
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
            conformed, found, _ = prepare_subject(subject, 1, seed, volume_range_cm3)
            cid = case_id(subject.number, 0)
            mask = found[0].mask
            write_case(Path(data_dir), cid, conformed.t1n, mask, conformed.affine, layout=FULL_LAYOUT)
            ids.append(cid)
    finally:
        nib.openers.Opener.default_compresslevel = level
    return ids
