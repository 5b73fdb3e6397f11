"""Python API: inpaint volumes already in memory, numpy arrays or nibabel images.

    from brainpaint import Inpainter

    inpainter = Inpainter.from_weights()          # the weights and settings `brainpaint infer` uses
    filled = inpainter(voided, mask)              # nibabel images: an image like `voided`
    filled = inpainter(voided_array, mask_array, affine=img.affine)   # arrays: an array like `voided_array`

`Inpainter` runs the predictor of `brainpaint infer` (`predictors.make_predictor`) and composes
its output the same way (`batch.compose_output`), so the guarantees are the command's: every
voxel outside the mask is the input's, bit for bit, in the input's dtype; the fill is inside
the mask only; a given case ID and seed give the same volume as the command line gives for the
case folder of that ID. Bad input is an `InputError` (a ValueError) whose message is one line
naming the input and the problem; bad settings are a `ConfigError` (also a ValueError).

Orientation. The network, the mirror channels and the atlas work in RAS axes, and a brain given
the wrong way round is filled worse without any error (BraTS files are stored LPS: their
`get_fdata()` arrays are not RAS). So numpy arrays need the affine of the image they came from
(`affine=img.affine`); arrays without it are refused with an `InputError`, never guessed.
nibabel images carry their own affine.

Fallbacks. Where a fill fell back on something else (the atlas placed by its box, the solver
short of its tolerance, the midline at the grid's centre), each is a `FallbackWarning` (the
`warnings` module), the lines `brainpaint infer` prints under the case's line.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import nibabel as nib
import numpy as np

from brainpaint.config.settings import Config, InferConfig
from brainpaint.errors import CaseError, FallbackWarning, InputError
from brainpaint.infer.batch import case_seed, compose_output
from brainpaint.infer.prediction import Predictor
from brainpaint.infer.predictors import make_predictor
from brainpaint.io.brats import AFFINE_TOLERANCE, CaseData, check_finite, check_geometry, check_mask, nifti_like


class Inpainter:
    """`inpainter(voided, mask)` -> the inpainted volume (see the module doc)."""

    def __init__(self, cfg: Config, predictor: Optional[Predictor] = None):
        self.cfg = cfg
        self.predictor = predictor if predictor is not None else make_predictor(cfg)

    @classmethod
    def from_weights(cls, path=None, **infer_settings: Any) -> "Inpainter":
        """Load a weights file (default: $BRAINPAINT_WEIGHTS, else the shipped weights) with the
        built-in `infer` settings, overridden by `infer_settings` (any key of the `infer`
        section of `brainpaint/config/settings.py`: `steps=16`, `sampler="ddpm"`, `temperature=1`,
        `ensemble=4`, `device="cuda:0"`, `seed=3`, `method="harmonic"`, ...)."""
        overrides = {f"infer.{key}": value for key, value in infer_settings.items()}
        if path is not None:
            overrides["infer.weights"] = str(path)
        return cls(Config().override(overrides))

    @property
    def settings(self) -> InferConfig:
        return self.cfg.infer

    def __call__(self, voided, mask, *, affine=None, return_std: bool = False, seed: Optional[int] = None,
                 case_id: str = "volume"):
        """Fill `mask` in `voided`: arrays give an array, nibabel images a NIfTI image with the
        voided image's affine and header. Arrays need `affine`, the 4x4 affine of their image
        (see the module doc: without it they are refused). `return_std=True` (with `ensemble`
        > 1) also returns the ensemble's standard deviation map (float32). `seed` defaults to
        the one the command line derives for `case_id` from the `seed` setting. Each fallback
        of the fill is a `FallbackWarning`."""
        if return_std and (self.settings.method != "diffusion" or self.settings.ensemble < 2):
            raise InputError(case_id, "return_std=True needs the diffusion method with ensemble > 1 (one fill has no spread)")
        data = case_data(case_id, voided, mask, affine)
        try:
            prediction = self.predictor(data, case_seed(self.settings.seed, case_id) if seed is None else seed)
            output = compose_output(data, prediction)
        except CaseError as exc:
            raise InputError(exc.case_id, exc.problem) from None
        for line in prediction.warnings:
            warnings.warn(f"{case_id}: {line}", FallbackWarning, stacklevel=2)
        filled = _like(voided, output, data)
        return (filled, _like(voided, prediction.std, data, np.float32)) if return_std else filled


def _array(case_id: str, name: str, value) -> np.ndarray:
    array = np.asanyarray(value.dataobj) if isinstance(value, nib.spatialimages.SpatialImage) else np.asarray(value)
    if array.ndim != 3:
        raise InputError(case_id, f"{name} is {array.ndim}D with shape {array.shape}; expected a 3D volume")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InputError(case_id, f"{name} has dtype {array.dtype}; expected numbers")
    return array


def case_affine(case_id: str, affine, images: list) -> np.ndarray:
    """The affine of in-memory volumes: `affine`, else that of the nibabel images among them;
    an InputError for arrays without one (their orientation would be a guess) or for an
    `affine` that is no 4x4 invertible matrix or contradicts the images'."""
    own = images[0].affine if images else None
    if affine is None:
        if own is None:
            raise InputError(case_id, "numpy arrays need the affine of their image: pass affine=img.affine (or pass "
                                      "nibabel images); without it their orientation is unknown")
        return np.asarray(own, np.float64)
    try:
        affine = np.asarray(affine, np.float64)
        usable = affine.shape == (4, 4) and np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12
    except (TypeError, ValueError):
        usable = False
    if not usable:
        raise InputError(case_id, "affine must be a finite invertible 4x4 matrix (the image's `img.affine`)")
    if own is not None and not np.allclose(affine, own, atol=AFFINE_TOLERANCE, rtol=0):
        raise InputError(case_id, "affine= differs from the nibabel image's own affine")
    return affine


def case_data(case_id: str, voided, mask, affine=None) -> CaseData:
    """The checked `CaseData` of in-memory volumes (the checks of a case folder's files, and
    `case_affine`)."""
    try:
        images = [v for v in (voided, mask) if isinstance(v, nib.spatialimages.SpatialImage)]
        if len(images) == 2:
            check_geometry(case_id, "mask", mask, voided, "voided")
        disk, mask_values = _array(case_id, "voided", voided), _array(case_id, "mask", mask)
        if disk.shape != mask_values.shape:
            raise InputError(case_id, f"shape mismatch: voided {disk.shape} vs mask {mask_values.shape}")
        values = disk.astype(np.float32)
        check_finite(case_id, "voided", values)
        inside = check_mask(case_id, "mask", mask_values)
    except CaseError as exc:
        raise InputError(exc.case_id, exc.problem) from None
    header = voided.header if isinstance(voided, nib.spatialimages.SpatialImage) else None
    return CaseData(id=case_id, voided=values, mask=inside, affine=case_affine(case_id, affine, images), header=header,
                    dtype=disk.dtype, voided_disk=disk)


def _like(voided, volume: np.ndarray, data: CaseData, dtype=None):
    """`volume` as `voided` came: an array, or a NIfTI image with its affine and header."""
    if not isinstance(voided, nib.spatialimages.SpatialImage):
        return volume if dtype is None else np.asarray(volume, dtype)
    return nifti_like(volume, data.header, voided.affine, dtype if dtype is not None else data.dtype)
