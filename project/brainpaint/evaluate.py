"""Score a predictions folder with the official BraTS 2023 inpainting metrics.

SSIM, PSNR, MSE (and the package's other outputs) come from the official PyPI package
`inpainting` (`inpainting.challenge_metrics_2023`): the files are read with its own
`read_nifti_to_tensor` and scored with its own `generate_metrics`, exactly as its
`compute_image_quality_metrics` does, so the numbers are the challenge's numbers. Nothing here
re-derives them. The evaluation region is `<ID>-mask-healthy`; the normalisation image is
`<ID>-t1n-voided`, both from the labels folder. `generate_metrics` is handed the bounding box
of the mask (`official_metrics`), which gives the same numbers as the whole volume about 30
times faster (a test compares both).

On top of that, the stripe index (`cfg.evaluate.stripe_index`) measures slice-to-slice
artefacts, which slice-wise 2D models are prone to and the official metrics barely see:
see `stripe_index`.

Output: a per-case CSV at `out_file` and `<stem>_summary.yaml` beside it (count, mean and
population std of every metric, failed cases with their one-line reasons); the summary table is
printed on stdout. Missing predictions, extra files in the predictions folder and invalid label
cases are one-line errors; the other cases are still scored and the exit status is 1.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from inpainting import challenge_metrics_2023

from brainpaint.config.settings import Config
from brainpaint.errors import CaseError, one_line
from brainpaint.infer.progress import CaseProgress
from brainpaint.io.atomic import write_text
from brainpaint.io.brats import check_finite, check_geometry, check_mask, discover_cases, open_image, prediction_name

MAIN_METRICS = ("ssim", "psnr", "mse")
# torchmetrics' SSIM window is 11 x 11: with more than 5 zero voxels around the mask every
# window that touches the mask is the one of the whole volume (see `official_metrics`).
CROP_MARGIN = 12


def official_metrics(prediction, target, voided, mask, crop: bool = True) -> dict[str, float]:
    """`generate_metrics` of one volume ([X, Y, Z] arrays or tensors, input intensity scale).

    The package zeroes everything outside the mask and computes SSIM over the planes of the
    last two axes (its [1, X, Y, Z] tensor is read as X images of Y x Z) with an 11 x 11 window,
    so cutting x to the mask's extent and y, z to the mask plus a margin of zeros changes none
    of its numbers; the percentile window still comes from the whole voided volume, passed as
    the normalisation tensor. `crop=False` hands it the whole volume.
    """
    mask = np.asarray(mask, dtype=bool)
    region = (slice(None),) * 3
    if crop and mask.any():
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0) + 1
        region = (slice(int(lo[0]), int(hi[0])),) + tuple(
            slice(max(int(a) - CROP_MARGIN, 0), min(int(b) + CROP_MARGIN, n)) for a, b, n in zip(lo[1:], hi[1:], mask.shape[1:])
        )

    def tensor(array, dtype=np.float32):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=dtype)[region]))[None]

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package and torchmetrics print diagnostics
        metrics = challenge_metrics_2023.generate_metrics(
            prediction=tensor(prediction), target=tensor(target), mask=tensor(mask, bool),
            normalization_tensor=torch.from_numpy(np.asarray(voided, dtype=np.float32))[None],
        )
    # The challenge's headline metrics first, then everything else the package reports.
    row = {k: float(metrics[k]) for k in MAIN_METRICS}
    row.update({k: float(v) for k, v in metrics.items() if k not in MAIN_METRICS})
    return row


def stripe_index(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """Through-plane roughness of the prediction relative to real tissue, inside the mask.

    For an image, the ratio R = mean squared difference between z-neighbours (last axis) over
    the mean squared difference between x- and y-neighbours, using only neighbour pairs whose
    two voxels are both in the mask. The index is R(pred) / R(gt): 1.0 means the prediction is as
    smooth across slices, relative to within slices, as the real tissue; values well above 1 show
    stripes between independently generated slices. NaN when undefined (no pairs, flat image).
    """
    mask = np.asarray(mask, dtype=bool)

    def ratio(image: np.ndarray) -> float:
        image = np.asarray(image, dtype=np.float64)
        energies = []
        for axis in range(3):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            both = mask[tuple(lo)] & mask[tuple(hi)]
            diff = (image[tuple(hi)] - image[tuple(lo)])[both]
            energies.append((float(np.sum(diff**2)), diff.size))
        (ex, nx), (ey, ny), (ez, nz) = energies
        if nz == 0 or nx + ny == 0:
            return math.nan
        in_plane = (ex + ey) / (nx + ny)
        return (ez / nz) / in_plane if in_plane > 0 else math.nan

    r_pred, r_gt = ratio(pred), ratio(gt)
    if not (math.isfinite(r_pred) and math.isfinite(r_gt)) or r_gt == 0:
        return math.nan
    return r_pred / r_gt


def score_case(case, pred_path: Path, with_stripes: bool = True) -> dict[str, float]:
    """Official metrics (+ stripe index) for one case; CaseError on any invalid input."""
    cm = challenge_metrics_2023
    cid = case.id
    v_path, h_path, t_path = case.files["voided"], case.files["mask_healthy"], case.files["t1n"]
    v_img = open_image(cid, v_path)
    check_geometry(cid, v_path.name, v_img)
    for path in (pred_path, t_path, h_path):
        check_geometry(cid, path.name, open_image(cid, path), v_img, v_path.name)

    def read(path: Path):
        try:
            return cm.read_nifti_to_tensor(str(path))
        except Exception as exc:
            raise CaseError(cid, f"cannot read {path.name}: {type(exc).__name__}: {exc}") from exc

    prediction, mask, target, voided = (read(p) for p in (pred_path, h_path, t_path, v_path))
    check_finite(cid, pred_path.name, prediction.numpy())
    check_finite(cid, t_path.name, target.numpy())
    check_finite(cid, v_path.name, voided.numpy())
    check_mask(cid, h_path.name, mask.numpy())
    mask = mask.bool()
    row = official_metrics(prediction[0].numpy(), target[0].numpy(), voided[0].numpy(), mask[0].numpy())
    if with_stripes:
        row["stripe_index"] = stripe_index(prediction[0].numpy(), target[0].numpy(), mask[0].numpy())
    return row


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and population std of every numeric column, ignoring NaN (with their count)."""
    keys = [k for k in rows[0] if k != "case"] if rows else list(MAIN_METRICS)
    out = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[key] = {
            "mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std()) if values.size else math.nan,
            "n": int(values.size),
        }
    return out


def _score(case, pred_files: dict[str, Path], pred_dir: Path, with_stripes: bool) -> dict:
    """The metrics row of one case; any problem is a one-line CaseError naming it."""
    name = prediction_name(case.id)
    if name not in pred_files:
        raise CaseError(case.id, f"missing prediction {name} in {pred_dir}")
    try:
        return {"case": case.id, **score_case(case, pred_files[name], with_stripes)}
    except CaseError:
        raise
    except Exception as exc:
        raise CaseError(case.id, f"{type(exc).__name__}: {one_line(exc)}") from exc


def _score_cases(cases, pred_files, pred_dir: Path, with_stripes: bool, failures: dict[str, str]) -> list[dict]:
    """The metrics rows of the cases that could be scored; the others go to `failures`.

    One line per case as it finishes (its time, or its one-line error), under a progress bar
    when stderr is a terminal."""
    rows: list[dict] = []
    with CaseProgress(len(cases), "evaluate") as progress:
        for case in cases:
            start = time.perf_counter()
            try:
                rows.append(_score(case, pred_files, pred_dir, with_stripes))
                progress.finished(f"{case.id}: scored ({time.perf_counter() - start:.1f} s)")
            except CaseError as exc:
                failures[exc.case_id] = exc.problem
                progress.finished(f"error: {exc}")
    return rows


def run_evaluate(cfg: Config, pred_dir: str | Path, label_dir: str | Path, out_file: str | Path) -> int:
    """Score `pred_dir/<ID>-t1n-inference.nii.gz` against the label cases in `label_dir`.

    Returns 0 when every case was scored, 1 when any case failed (missing/extra/invalid), and 2
    when the run cannot start (missing folders, unwritable output)."""
    pred_dir, label_dir, out_file = Path(pred_dir), Path(label_dir), Path(out_file)
    summary_file = out_file.with_name(f"{out_file.stem}_summary.yaml")
    try:
        if not pred_dir.is_dir():
            raise FileNotFoundError(f"predictions folder {pred_dir} does not exist")
        cases, errors = discover_cases(label_dir, labels=True)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out_file.parent, os.W_OK):
            raise PermissionError(f"cannot write to {out_file.parent}")
        pred_files = {p.name: p for p in pred_dir.iterdir() if not p.name.startswith(".")}
    except OSError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2

    failures: dict[str, str] = {}
    for error in errors:  # label folders that are not valid cases
        failures[error.case_id] = error.problem
        print(f"error: {error}", file=sys.stderr)
    rows = _score_cases(cases, pred_files, pred_dir, cfg.evaluate.stripe_index, failures)
    expected = {prediction_name(e.case_id) for e in errors} | {prediction_name(c.id) for c in cases}
    for name in sorted(set(pred_files) - expected):
        failures[name] = "extra file in the predictions folder (no label case matches it)"
        print(f"error: {name}: {failures[name]}", file=sys.stderr)
    stats = summarize(rows)
    summary = {
        "cases_scored": len(rows),
        "cases_failed": len(failures),
        "metrics": stats,
        "failed": dict(sorted(failures.items())),
        "predictions": str(pred_dir),
        "labels": str(label_dir),
    }
    try:
        write_text(out_file, _csv(rows))
        write_text(summary_file, yaml.safe_dump(summary, sort_keys=False))
    except OSError as exc:
        print(f"error: cannot write {out_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(format_summary(stats, len(rows), len(failures)))
    return 1 if failures else 0


def _csv(rows: list[dict]) -> str:
    """The per-case table, floats in full precision (repr)."""
    columns = ["case"] + (list(rows[0].keys())[1:] if rows else list(MAIN_METRICS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def format_summary(stats: dict, scored: int, failed: int) -> str:
    lines = [f"{'metric':<14} {'mean':>12} {'std':>12} {'n':>5}"]
    for key, s in stats.items():
        lines.append(f"{key:<14} {s['mean']:>12.6g} {s['std']:>12.6g} {s['n']:>5d}")
    lines.append(f"{scored + failed} cases: {scored} scored, {failed} failed")
    return "\n".join(lines)
