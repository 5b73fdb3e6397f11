"""BraTS 2023 inpainting data contract: case discovery, validation and NIfTI writing.

Layout. A data folder holds one sub-folder per case, named by the case ID (BraTS uses
`BraTS-GLI-XXXXX-YYY`, but any folder name is an ID). Inside `<ID>/` the files are
`<ID>-t1n-voided.nii.gz` and `<ID>-mask.nii.gz` (needed for inference) and, for training and
evaluation, `<ID>-t1n.nii.gz`, `<ID>-mask-healthy.nii.gz` and optionally
`<ID>-mask-unhealthy.nii.gz`. Any other file in a case folder (another suffix, another ID, a
`.nii` instead of `.nii.gz`) makes the case invalid: a misnamed file is far more likely to be a
packaging mistake than something to ignore. Hidden files (`.DS_Store`, ...) are ignored.

Validation. Every problem with a case becomes a `CaseError(case_id, problem)` whose `str()` is a
single line naming the case, so a batch can report it and carry on with the other cases:
missing/extra/misnamed files, unreadable or truncated files, images that are not 3D, shape or
affine (to 1e-4) mismatches between the image and its masks, masks that are not binary or are
empty, NaN/Inf voxels, and voided images stored with intensity scaling (scl_slope/scl_inter),
which could not be written back bit-identically in their on-disk dtype.

Voxel spacing. The network works in voxels, so a spacing other than 1 mm does not stop a case:
it is reported as a warning on stderr and the case proceeds. Only spacings that cannot be a
brain MRI (non-finite, <= 0 or above 20 mm) are errors.

Orientation. Files are read and written in their own array order (BraTS stores LPS). The
network works in one frame, RAS axes (`to_ras`, `CaseData.in_ras`: flips and transposes only,
so every voxel keeps its value): the training brains' and the atlas's, so an LPS-stored case
shows the network its slices the way round it was trained on; `from_ras` turns results back.

Writing. `write_nifti_atomic` writes through `atomic.atomic_write`, so a crash never leaves a
partial prediction under its final name.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from brainpaint.errors import CaseError
from brainpaint.io.atomic import atomic_write

# File role -> file-name suffix after "<ID>-".
SUFFIXES = {
    "voided": "t1n-voided.nii.gz",
    "mask": "mask.nii.gz",
    "t1n": "t1n.nii.gz",
    "mask_healthy": "mask-healthy.nii.gz",
    "mask_unhealthy": "mask-unhealthy.nii.gz",
}
INFERENCE_ROLES = ("voided", "mask")
LABEL_ROLES = ("voided", "mask", "t1n", "mask_healthy")
AFFINE_TOLERANCE = 1e-4
MAX_SPACING_MM = 20.0


@dataclass
class Case:
    id: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class CaseData:
    id: str
    voided: np.ndarray  # float32 [X, Y, Z], input intensity scale
    mask: np.ndarray  # bool [X, Y, Z], the region to inpaint
    affine: np.ndarray  # 4x4
    header: nib.Nifti1Header  # header of the voided image (template for outputs)
    dtype: np.dtype  # on-disk dtype of the voided image
    t1n: Optional[np.ndarray] = None  # float32 ground truth (labels only)
    mask_healthy: Optional[np.ndarray] = None  # bool (labels only)
    voided_disk: Optional[np.ndarray] = None  # voided image in its on-disk dtype (exact copy)

    def in_ras(self) -> "CaseData":
        """The case with every array turned to RAS axes (`to_ras`) and the affine of that grid;
        the case itself when it is stored RAS. `header` stays the on-disk one (for writing)."""
        ornt = io_orientation(self.affine)
        if np.array_equal(ornt, RAS):
            return self
        turn = lambda a: None if a is None else np.ascontiguousarray(apply_orientation(a, ornt))  # noqa: E731
        affine = np.asarray(self.affine, np.float64) @ inv_ornt_aff(ornt, np.shape(self.voided))
        return replace(
            self, voided=turn(self.voided), mask=turn(self.mask), affine=affine, t1n=turn(self.t1n),
            mask_healthy=turn(self.mask_healthy), voided_disk=turn(self.voided_disk),
        )


RAS = axcodes2ornt("RAS")


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """`volume` (stored with `affine`) with its axes turned to RAS: flips and transposes only."""
    return apply_orientation(np.asarray(volume), io_orientation(np.asarray(affine, np.float64)))


def from_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A RAS-axes `volume` in the array order of an image stored with `affine`: `to_ras` undone."""
    turn = ornt_transform(RAS, io_orientation(np.asarray(affine, np.float64)))
    return np.ascontiguousarray(apply_orientation(np.asarray(volume), turn))


def prediction_name(case_id: str) -> str:
    return f"{case_id}-t1n-inference.nii.gz"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- discovery
def _case_files(folder: Path, labels: bool) -> Case:
    case_id = folder.name
    by_name = {f"{case_id}-{suffix}": role for role, suffix in SUFFIXES.items()}
    case = Case(case_id, folder)
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        role = by_name.get(entry.name)
        if role is None:
            raise CaseError(case_id, f"unexpected file '{entry.name}' (expected files named {case_id}-<suffix>.nii.gz)")
        if not entry.is_file():
            raise CaseError(case_id, f"'{entry.name}' is not a regular file")
        case.files[role] = entry
    required = LABEL_ROLES if labels else INFERENCE_ROLES
    missing = [f"{case_id}-{SUFFIXES[r]}" for r in required if r not in case.files]
    if missing:
        raise CaseError(case_id, f"missing file {', '.join(missing)}")
    return case


def discover_cases(data_dir: str | Path, labels: bool = False) -> tuple[list[Case], list[CaseError]]:
    """Find the case folders under `data_dir`, sorted by ID.

    Folders whose files do not follow the contract become `CaseError`s; the good ones are still
    returned. Stray files at the top level are not cases: they are reported as warnings.
    A missing or unreadable `data_dir` raises `FileNotFoundError`/`NotADirectoryError`.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    if not data_dir.is_dir():
        raise NotADirectoryError(f"data folder {data_dir} is not a folder")
    cases: list[Case] = []
    errors: list[CaseError] = []
    for entry in sorted(data_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            warn(f"ignoring '{entry.name}' in {data_dir}: not a case folder")
            continue
        try:
            cases.append(_case_files(entry, labels))
        except CaseError as exc:
            errors.append(exc)
        except OSError as exc:
            errors.append(CaseError(entry.name, f"cannot list folder: {exc.strerror or exc}"))
    return cases, errors


# --------------------------------------------------------------------------- loading
def open_image(case_id: str, path: Path):
    """`nib.load` with every failure turned into a one-line CaseError."""
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        raise CaseError(case_id, f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc


def read_array(case_id: str, path: Path, img, dtype=np.float32) -> np.ndarray:
    """Decode the voxel data (this is where truncated or corrupt gzip files fail)."""
    try:
        if dtype is None:  # the on-disk values and dtype (callers have ruled out scaling)
            return np.asanyarray(img.dataobj)
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype)
    except Exception as exc:
        raise CaseError(case_id, f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc


def check_geometry(case_id: str, name: str, img, reference=None, ref_name: str = "") -> None:
    """3D, sane spacing (warn if not 1 mm), and same shape/affine as `reference`."""
    shape = tuple(img.shape)
    if len(shape) != 3:
        raise CaseError(case_id, f"{name} is {len(shape)}D with shape {shape}; expected a 3D image")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or np.any(zooms > MAX_SPACING_MM):
        raise CaseError(case_id, f"{name} has impossible voxel spacing {_mm(zooms)} mm")
    if reference is None:
        if not np.allclose(zooms, 1.0, atol=1e-3):
            warn(f"{case_id}: {name} has voxel spacing {_mm(zooms)} mm, not 1 mm; processing in voxels")
        return
    if shape != tuple(reference.shape):
        raise CaseError(case_id, f"shape mismatch: {name} {shape} vs {ref_name} {tuple(reference.shape)}")
    if not np.allclose(img.affine, reference.affine, atol=AFFINE_TOLERANCE, rtol=0):
        diff = float(np.abs(img.affine - reference.affine).max())
        raise CaseError(case_id, f"affine mismatch: {name} differs from {ref_name} by up to {diff:.4g}")


def _mm(zooms: np.ndarray) -> str:
    """Voxel spacings as a reader writes them: (2, 2, 2.5)."""
    return "(" + ", ".join(f"{float(z):.4g}" for z in zooms) + ")"


def check_finite(case_id: str, name: str, array: np.ndarray) -> None:
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise CaseError(case_id, f"{name} has {bad} NaN/Inf voxels")


def check_mask(case_id: str, name: str, array: np.ndarray) -> np.ndarray:
    """Binary (only 0 and 1), non-empty and not the whole grid; returns it as bool."""
    binary = (array == 0) | (array == 1)
    if not binary.all():
        extra = np.unique(array[~binary])
        shown = ", ".join(f"{v:g}" for v in extra[:3])
        raise CaseError(case_id, f"{name} is not binary (values other than 0/1: {shown}{', ...' if extra.size > 3 else ''})")
    mask = array == 1
    if not mask.any():
        raise CaseError(case_id, f"{name} is empty")
    if mask.all():
        raise CaseError(case_id, f"{name} covers the whole volume: there is no known tissue to fill from")
    return mask


def load_case(case: Case, labels: bool = False) -> CaseData:
    """Read and validate one case; raises CaseError with a one-line message on any problem."""
    cid = case.id
    v_path, m_path = case.files["voided"], case.files["mask"]
    v_img = open_image(cid, v_path)
    check_geometry(cid, v_path.name, v_img)
    slope, inter = v_img.dataobj.slope, v_img.dataobj.inter
    if not (slope == 1 and inter == 0):
        raise CaseError(cid, f"{v_path.name} uses intensity scaling (scl_slope={slope:g}, scl_inter={inter:g}); not supported")
    m_img = open_image(cid, m_path)
    check_geometry(cid, m_path.name, m_img, v_img, v_path.name)

    disk = read_array(cid, v_path, v_img, dtype=None)
    voided = disk.astype(np.float32)
    check_finite(cid, v_path.name, voided)
    mask = check_mask(cid, m_path.name, read_array(cid, m_path, m_img))
    data = CaseData(
        id=cid,
        voided=voided,
        mask=mask,
        affine=np.asarray(v_img.affine, dtype=np.float64),
        header=v_img.header,
        dtype=np.dtype(v_img.get_data_dtype()),
        voided_disk=disk,
    )
    if labels:
        for role in ("t1n", "mask_healthy"):
            if role not in case.files:
                raise CaseError(cid, f"missing file {cid}-{SUFFIXES[role]}")
        t_path, h_path = case.files["t1n"], case.files["mask_healthy"]
        t_img = open_image(cid, t_path)
        check_geometry(cid, t_path.name, t_img, v_img, v_path.name)
        h_img = open_image(cid, h_path)
        check_geometry(cid, h_path.name, h_img, v_img, v_path.name)
        data.t1n = read_array(cid, t_path, t_img)
        check_finite(cid, t_path.name, data.t1n)
        data.mask_healthy = check_mask(cid, h_path.name, read_array(cid, h_path, h_img))
    return data


# --------------------------------------------------------------------------- writing
def cast_to_dtype(array: np.ndarray, dtype) -> np.ndarray:
    """Cast for writing: integers are rounded and clipped to the dtype's range, floats clipped
    to the finite range (so a large value never wraps around or turns into Inf)."""
    dtype = np.dtype(dtype)
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if dtype == np.bool_:
        return array != 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array.astype(np.float64)), info.min, info.max).astype(dtype)
    info = np.finfo(dtype)
    return np.clip(array, info.min, info.max).astype(dtype)


def nifti_like(array: np.ndarray, like_header, affine: np.ndarray, dtype=None):
    """A NIfTI image of `array` with the header fields of `like_header` (orientation codes, units,
    description), the given affine, `dtype` on disk and no intensity scaling."""
    dtype = np.dtype(dtype if dtype is not None else np.asarray(array).dtype)
    data = cast_to_dtype(array, dtype)
    if isinstance(like_header, nib.Nifti2Header):
        klass = nib.Nifti2Image
    else:
        klass = nib.Nifti1Image
        if like_header is not None and not isinstance(like_header, nib.Nifti1Header):
            like_header = nib.Nifti1Header.from_header(like_header)
    header = like_header.copy() if like_header is not None else None
    img = klass(data, affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_nifti_atomic(array: np.ndarray, like_header, affine: np.ndarray, path: str | Path, dtype=None) -> Path:
    """Write `nifti_like(array, like_header, affine, dtype)` at `path`.

    The file appears under its final name only when complete (`atomic.atomic_write`).
    """
    path = Path(path)
    img = nifti_like(array, like_header, affine, dtype)
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path
