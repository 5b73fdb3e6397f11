"""Fixture and checks for the container smoke test (scripts/container_smoke.sh).

    python scripts/smoke_case.py make WORKSPACE    # tiny case, labels, random tiny model, parameters
    python scripts/smoke_case.py check WORKSPACE   # verify what the container wrote

`make` writes an MLCube workspace laid out like the shipped one: `data/<ID>/` (the voided image
and mask, with the ground truth beside them, so the same folder serves `infer` and the
`evaluate` task's default `labels`), `additional_files/model.safetensors` (a randomly initialised tiny network whose metadata
describes it, so it loads exactly like trained weights) and `parameters.yaml` (a two-step
DDIM run). A random network makes no useful image, but it exercises the whole path: weights
loading, conditioning, sampling, writing. `check` then verifies the prediction file by name,
shape, affine and voxels, the metrics file, and that the inputs were not modified.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "project"))

import synth  # noqa: E402  (tests/synth.py: synthetic BraTS cases)

CASE_ID = "BraTS-GLI-00042-000"
SHAPE = (48, 48, 20)
# The tiny network works on 32x32 crops around the mask (so a 48x48 grid is large enough).
TINY_MODEL = {"crop_size": 32}
PARAMETERS = {
    "infer": {"method": "diffusion", "sampler": "ddim", "steps": 2, "ensemble": 1, "device": "auto", "seed": 0},
    "evaluate": {"stripe_index": True},
}
INPUT_DIRS = ("data", "additional_files")
DIGESTS = ".input-digests.json"


def _digests(workspace: Path) -> dict[str, str]:
    """SHA-256 of every input file (and parameters.yaml), to prove the inputs stay untouched."""
    files = [workspace / "parameters.yaml"]
    for name in INPUT_DIRS:
        files += sorted(p for p in (workspace / name).rglob("*") if p.is_file())
    return {str(p.relative_to(workspace)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def make(workspace: Path) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    synth.write_case(workspace / "data", CASE_ID, shape=SHAPE, seed=3, labels=True)
    synth.tiny_weights(workspace / "additional_files" / "model.safetensors", **TINY_MODEL)
    (workspace / "parameters.yaml").write_text(yaml.safe_dump(PARAMETERS, sort_keys=False))
    (workspace / DIGESTS).write_text(json.dumps(_digests(workspace), indent=1))
    print(f"smoke workspace ready: {workspace} (case {CASE_ID}, {SHAPE}, tiny random model)")


def _fail(message: str) -> None:
    print(f"CHECK FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check(workspace: Path) -> None:
    predictions = workspace / "predictions"
    expected = f"{CASE_ID}-t1n-inference.nii.gz"
    names = sorted(p.name for p in predictions.iterdir())
    if names != [expected]:
        _fail(f"predictions folder holds {names}, expected exactly [{expected!r}] (no temporary files)")

    case = workspace / "data" / CASE_ID
    voided_img = nib.load(str(case / f"{CASE_ID}-t1n-voided.nii.gz"))
    mask = np.asarray(nib.load(str(case / f"{CASE_ID}-mask.nii.gz")).dataobj) > 0
    voided = np.asarray(voided_img.dataobj, dtype=np.float32)
    out_img = nib.load(str(predictions / expected))
    out = np.asarray(out_img.dataobj, dtype=np.float32)

    if out.shape != SHAPE:
        _fail(f"prediction shape {out.shape}, expected {SHAPE}")
    if not np.allclose(out_img.affine, voided_img.affine):
        _fail(f"prediction affine\n{out_img.affine}\ndiffers from the input's\n{voided_img.affine}")
    if not np.array_equal(out[~mask], voided[~mask]):
        changed = int((out[~mask] != voided[~mask]).sum())
        _fail(f"{changed} voxels outside the mask differ from the voided input")
    inside = out[mask]
    if not np.all(np.isfinite(inside)):
        _fail("non-finite values inside the mask")
    low, high = float(voided[~mask].min()), float(voided[~mask].max())
    if inside.min() < low - 1e-3 or inside.max() > high + 1e-3:
        _fail(f"in-mask values [{inside.min()}, {inside.max()}] outside the input range [{low}, {high}]")
    print(
        f"prediction ok: {expected} shape {out.shape} affine == input, {int((~mask).sum())} known voxels "
        f"bit-exact, {int(mask.sum())} in-mask voxels in [{inside.min():.1f}, {inside.max():.1f}]"
    )

    metrics = workspace / "metrics" / "metrics.csv"
    if not metrics.is_file():
        _fail(f"metrics file {metrics} missing")
    with metrics.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if [r.get("case") for r in rows] != [CASE_ID]:
        _fail(f"metrics rows {rows} do not hold exactly case {CASE_ID}")
    print(f"metrics ok: {metrics.name} {rows[0]}")

    before = json.loads((workspace / DIGESTS).read_text())
    if _digests(workspace) != before:
        _fail("an input file was modified or added")
    print("inputs ok: unchanged")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("make", "check"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    {"make": make, "check": check}[argv[0]](Path(argv[1]).resolve())


if __name__ == "__main__":
    main(sys.argv[1:])
