"""Held-out cases as another scanner might have shown them: a gamma curve and a smooth bias field.

The 56 training and validation brains come from one scanner and protocol; the cases a user
brings do not. This writes a copy of held-out BraTS-layout cases with their intensities
changed the way scanners differ: v' = top * (v / top) ** gamma * field, where top is the
brain's 99.5th percentile, gamma alternates between 0.8 and 1.25 from case to case, and the
field is exp of a random linear function of position (up to about ±15 % across the brain).
The voided image is the changed t1n with the mask set to 0; masks are copied. Score models on
it with `validation_table.py --data <out>`:

    python benchmarks/intensity_shift.py --data workspace/prepared/val --out workspace/prepared_shifted/val
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "project"))
from brainpaint.io.brats import SUFFIXES, discover_cases  # noqa: E402


def shift_volume(vol: np.ndarray, gamma: float, slopes: np.ndarray) -> np.ndarray:
    brain = vol > 0
    top = float(np.percentile(vol[brain], 99.5))
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in vol.shape]
    field = np.exp(slopes[0] * axes[0][:, None, None] + slopes[1] * axes[1][None, :, None] + slopes[2] * axes[2][None, None, :])
    out = top * np.power(np.clip(vol, 0, None) / top, gamma) * field
    return np.where(brain, np.maximum(out, 1.0), 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("workspace/prepared/val"))
    ap.add_argument("--out", type=Path, default=Path("workspace/prepared_shifted/val"))
    ap.add_argument("--cases", type=int, default=8, help="the first N `*-000` cases")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cases, _ = discover_cases(args.data, labels=True)
    cases = [c for c in cases if c.id.endswith("-000")][: args.cases]
    if not cases:
        print(f"error: no *-000 cases in {args.data}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    for i, case in enumerate(cases):
        gamma = 0.8 if i % 2 == 0 else 1.25
        slopes = rng.uniform(-0.15, 0.15, size=3)
        dst = args.out / case.id
        dst.mkdir(parents=True, exist_ok=True)
        t1n = nib.load(str(case.files["t1n"]))
        mask = np.asarray(nib.load(str(case.files["mask"])).dataobj) > 0
        shifted = np.round(shift_volume(np.asarray(t1n.dataobj, np.float32), gamma, slopes)).astype(np.int16)
        for role, vol in (("t1n", shifted), ("voided", np.where(mask, 0, shifted).astype(np.int16))):
            img = nib.Nifti1Image(vol, t1n.affine, t1n.header)
            img.set_data_dtype(np.int16)
            nib.save(img, str(dst / f"{case.id}-{SUFFIXES[role]}"))
        for role in ("mask", "mask_healthy", "mask_unhealthy"):
            if role in case.files:
                shutil.copyfile(case.files[role], dst / case.files[role].name)
        print(f"{case.id}: gamma {gamma}, field slopes {np.round(slopes, 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
