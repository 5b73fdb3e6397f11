"""Fixture and checks for the container smoke test (scripts/container_smoke.sh).

    python scripts/smoke_case.py make WORKSPACE        # tiny case, labels, random tiny model, parameters
    python scripts/smoke_case.py check WORKSPACE       # verify what the MLCube tasks wrote
    python scripts/smoke_case.py brats-input FOLDER    # input folder as the BraTS orchestrator writes it
    python scripts/smoke_case.py check-output INPUT OUTPUT   # verify an output folder for that input

`make` writes an MLCube workspace laid out like the shipped one: `data/<ID>/` (the voided image
and mask, with the ground truth beside them, so the same folder serves `infer` and the
`evaluate` task's default `labels`), `additional_files/model.safetensors` (a randomly initialised tiny network whose metadata
describes it, so it loads exactly like trained weights) and `parameters.yaml` (a two-step
DDIM run). A random network makes no useful image, but it exercises the whole path: weights
loading, conditioning, sampling, writing. `check` then verifies the prediction file by name,
shape, affine and voxels, the metrics file, and that the inputs were not modified.

`brats-input` writes what the BraTS orchestrator (`brats` package) puts into a container's input
folder for an inpainting batch: `BraTS-GLI-0000k-000/BraTS-GLI-0000k-000-t1n-voided.nii.gz` and
`...-mask.nii.gz`, nothing else. `check-output` verifies an output folder as the orchestrator
reads it (it finds each case's file by the `0000k-000` part of its ID and loads every file in
the folder) and as brainpaint promises it: exactly `<ID>-t1n-inference.nii.gz` per case, each
with the input's shape and affine and every known voxel unchanged; and that the input folder
is as `brats-input` left it.
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


def _check_prediction(case: Path, prediction: Path) -> None:
    """The prediction of one case folder: shape, affine, known voxels bit-exact, fill in range."""
    case_id = case.name
    voided_img = nib.load(str(case / f"{case_id}-t1n-voided.nii.gz"))
    mask = np.asarray(nib.load(str(case / f"{case_id}-mask.nii.gz")).dataobj) > 0
    voided = np.asarray(voided_img.dataobj, dtype=np.float32)
    out_img = nib.load(str(prediction))
    out = np.asarray(out_img.dataobj, dtype=np.float32)

    if out.shape != voided.shape:
        _fail(f"prediction shape {out.shape}, expected {voided.shape}")
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
        f"prediction ok: {prediction.name} shape {out.shape} affine == input, {int((~mask).sum())} known voxels "
        f"bit-exact, {int(mask.sum())} in-mask voxels in [{inside.min():.1f}, {inside.max():.1f}]"
    )


def _check_names(predictions: Path, case_ids: list[str]) -> None:
    expected = sorted(f"{case_id}-t1n-inference.nii.gz" for case_id in case_ids)
    names = sorted(p.name for p in predictions.iterdir())
    if names != expected:
        _fail(f"{predictions} holds {names}, expected exactly {expected} (no temporary files)")


def check(workspace: Path) -> None:
    _check_names(workspace / "predictions", [CASE_ID])
    _check_prediction(workspace / "data" / CASE_ID, workspace / "predictions" / f"{CASE_ID}-t1n-inference.nii.gz")

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


# The orchestrator's names for the cases of a batch (its inpainting `input_name_schema`).
BRATS_IDS = ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]


def brats_input(folder: Path) -> None:
    for k, case_id in enumerate(BRATS_IDS):
        synth.write_case(folder, case_id, shape=SHAPE, seed=10 + k, labels=False, radius=4 + k)
    (folder / DIGESTS).write_text(json.dumps(_folder_digests(folder), indent=1))
    print(f"orchestrator-style input ready: {folder} ({', '.join(BRATS_IDS)})")


def _folder_digests(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DIGESTS)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def check_output(input_folder: Path, output: Path) -> None:
    case_ids = sorted(p.name for p in input_folder.iterdir() if p.is_dir())
    _check_names(output, case_ids)
    for case_id in case_ids:
        found = list(output.glob(f"*{'-'.join(case_id.split('-')[-2:])}*"))  # how the orchestrator finds it
        if len(found) != 1:
            _fail(f"{case_id}: the orchestrator's lookup finds {[p.name for p in found]} in {output}")
        _check_prediction(input_folder / case_id, found[0])
    if json.loads((input_folder / DIGESTS).read_text()) != _folder_digests(input_folder):
        _fail(f"a file in {input_folder} was modified or added")
    print(f"output ok: {len(case_ids)} cases, one prediction each; input folder unchanged")


COMMANDS = {"make": (make, 1), "check": (check, 1), "brats-input": (brats_input, 1), "check-output": (check_output, 2)}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS or len(argv) != 1 + COMMANDS[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    COMMANDS[argv[0]][0](*(Path(a).resolve() for a in argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
