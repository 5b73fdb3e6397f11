"""Real-data check of the classical path: `brainpaint infer --method harmonic` + `brainpaint evaluate`.

Builds one BraTS-layout case from a healthy T1 (../shared/data/healthy-t1/sub-49_T1w.nii.gz) with
a ~100 cm^3 ball mask inside the brain, runs both CLI commands in subprocesses and checks:
only `<ID>-t1n-inference.nii.gz` in the output folder; shape, affine, orientation and dtype
equal to the voided input; known voxels identical; non-zero inside the mask; and evaluate's
SSIM/PSNR/MSE equal to `inpainting.challenge_metrics_2023.compute_image_quality_metrics`.
It also times `harmonic_fill` on this mask. Prints the numbers; exit status 1 if a check fails.

    python benchmarks/check_harmonic_real.py [--t1 PATH] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_T1 = ROOT.parent / "shared" / "data" / "healthy-t1" / "sub-49_T1w.nii.gz"
CASE_ID = "BraTS-GLI-90049-000"
BALL_CM3 = 100.0


def ball_in_brain(brain: np.ndarray, volume_cm3: float) -> np.ndarray:
    """A ball of the given volume placed inside the brain, off the midline (left hemisphere)."""
    radius = (volume_cm3 * 1000.0 * 3.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    idx = np.argwhere(brain)
    centre = idx.mean(axis=0)
    centre[0] += 0.22 * (idx[:, 0].max() - idx[:, 0].min())
    grid = np.indices(brain.shape, dtype=np.float32)
    dist2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return dist2 <= radius**2


def build_case(t1_path: Path, root: Path) -> Path:
    img = nib.load(str(t1_path))
    t1 = np.asanyarray(img.dataobj)
    mask = ball_in_brain(t1 > 0, BALL_CM3)
    folder = root / CASE_ID
    folder.mkdir(parents=True)

    def save(array, suffix, dtype):
        out = nib.Nifti1Image(array.astype(dtype), img.affine, img.header)
        out.set_data_dtype(dtype)
        nib.save(out, str(folder / f"{CASE_ID}-{suffix}.nii.gz"))

    save(t1, "t1n", t1.dtype)
    save(np.where(mask, 0, t1), "t1n-voided", t1.dtype)
    save(mask, "mask", np.uint8)
    save(mask, "mask-healthy", np.uint8)
    save(np.zeros_like(mask), "mask-unhealthy", np.uint8)
    return folder


def run_cli(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "brainpaint", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"$ brainpaint {' '.join(args)}  ->  exit {done.returncode} in {seconds:.1f} s")
    for line in (done.stdout + done.stderr).strip().splitlines():
        print(f"    {line}")
    if done.returncode != 0:
        raise SystemExit(f"FAILED: brainpaint {args[0]} exited with {done.returncode}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1", type=Path, default=DEFAULT_T1)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    args = parser.parse_args()
    if not args.t1.exists():
        print("=" * 72)
        print(f"SKIPPED: real data not found at {args.t1}")
        print("This check needs ../shared/data/healthy-t1/ (not part of the repository).")
        print("=" * 72)
        return 0

    work = args.keep or Path(tempfile.mkdtemp(prefix="bp-harmonic-"))
    work.mkdir(parents=True, exist_ok=True)
    data, out, metrics = work / "data", work / "predictions", work / "metrics" / "metrics.csv"
    for path in (data, out, metrics.parent):
        shutil.rmtree(path, ignore_errors=True)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    try:
        folder = build_case(args.t1, data)
        voided_img = nib.load(str(folder / f"{CASE_ID}-t1n-voided.nii.gz"))
        voided = np.asanyarray(voided_img.dataobj)
        mask = np.asanyarray(nib.load(str(folder / f"{CASE_ID}-mask.nii.gz")).dataobj).astype(bool)
        print(f"case {CASE_ID}: grid {voided.shape} {voided.dtype}, mask {int(mask.sum())} voxels "
              f"({mask.sum() / 1000:.1f} cm^3)")

        from brainpaint.conditioning.harmonic import harmonic_fill

        start = time.perf_counter()
        harmonic_fill(voided.astype(np.float32), mask)
        fill_seconds = time.perf_counter() - start
        print(f"harmonic_fill: {fill_seconds:.2f} s for {int(mask.sum())} unknowns")

        infer_s = run_cli("infer", "--data-path", str(data), "--output-path", str(out), "--method", "harmonic")
        eval_s = run_cli("evaluate", "--predictions", str(out), "--labels", str(data), "--output-file", str(metrics))

        print("checks:")
        names = sorted(p.name for p in out.iterdir())
        check(names == [f"{CASE_ID}-t1n-inference.nii.gz"], f"output folder holds only the prediction: {names}")
        pred_img = nib.load(str(out / names[0]))
        pred = np.asanyarray(pred_img.dataobj)
        check(pred.shape == voided.shape, f"shape {pred.shape}")
        check(pred_img.get_data_dtype() == voided_img.get_data_dtype(), f"on-disk dtype {pred_img.get_data_dtype()}")
        check(np.array_equal(pred_img.affine, voided_img.affine), "affine equal to the voided input")
        check(nib.aff2axcodes(pred_img.affine) == nib.aff2axcodes(voided_img.affine),
              f"orientation {''.join(nib.aff2axcodes(pred_img.affine))}")
        check(pred[~mask].tobytes() == voided[~mask].tobytes(), "known voxels bit-identical")
        inside = pred[mask]
        check(bool(np.all(inside != 0)), f"non-zero inside the mask (min {inside.min()}, mean {inside.mean():.1f})")

        from inpainting.challenge_metrics_2023 import compute_image_quality_metrics

        with contextlib.redirect_stdout(io.StringIO()):
            official = compute_image_quality_metrics(
                prediction=str(out / names[0]),
                healthy_mask=str(folder / f"{CASE_ID}-mask-healthy.nii.gz"),
                reference_t1=str(folder / f"{CASE_ID}-t1n.nii.gz"),
                voided_t1=str(folder / f"{CASE_ID}-t1n-voided.nii.gz"),
            )
        with open(metrics, newline="") as fh:
            row = next(csv.DictReader(fh))
        for key in ("ssim", "psnr", "mse"):
            ours = float(row[key])
            check(ours == official[key], f"{key}: evaluate {ours!r} == official {official[key]!r}")
        print(f"stripe index: {float(row['stripe_index']):.4f}")
        print(f"timings: harmonic_fill {fill_seconds:.2f} s, infer CLI {infer_s:.1f} s, evaluate CLI {eval_s:.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print("RESULT:", "all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
