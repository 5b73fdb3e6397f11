"""What a population atlas knows inside a mask, without any network.

    python benchmarks/atlas_information.py --weights runs/x0_ctx2at/model.safetensors
    python benchmarks/atlas_information.py --atlas-from workspace/prepared_uniform/train --data workspace/data
    python benchmarks/atlas_information.py --atlas-from workspace/prepared_uniform/train --fit affine

For the `*-000` case of each held-out subject in `--data`, scores with the official `inpainting`
metrics (`evaluate.official_metrics`) the 3D harmonic fill and the harmonic fill plus the atlas
residual (`atlas.atlas_residual`: what the mean training brain, placed on the case by `--fit`,
holds inside the mask beyond its own harmonic fill). The atlas is the one a `model.atlas`
weights file carries (`--weights`, placed by the fit the file records unless `--fit` is given)
or is built from the training cases of `--atlas-from` with `--fit` (default box). If
the second fill beats the first, the atlas carries information about the masked tissue that the
harmonic fill lacks, which is what the network's atlas channel is given. Without the data the
script says so loudly and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from brainpaint.conditioning.atlas import ATLAS_FITS, atlas_residual
from brainpaint.data.atlas_build import atlas_from_cases
from brainpaint.io.brats import discover_cases, load_case
from brainpaint.evaluate import official_metrics
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.conditioning.intensity import IntensityMap
from brainpaint.model.weights import weights_config

REPO = Path(__file__).resolve().parents[1]
KEYS = ("ssim", "psnr", "mse")


def load_atlas(args) -> tuple[np.ndarray, str]:
    """(atlas, fit): the atlas of `--weights` or built from `--atlas-from`, and how to place it."""
    if args.weights:
        with safe_open(str(args.weights), "np") as f:
            if "atlas" not in f.keys():
                raise SystemExit(f"error: {args.weights} holds no atlas (not trained with model.atlas)")
            atlas = f.get_tensor("atlas")
        return atlas, args.fit or weights_config(args.weights).data.atlas_fit
    fit = args.fit or "box"
    cases, _ = discover_cases(args.atlas_from, labels=True)
    return atlas_from_cases(cases, log=lambda m: print(m, file=sys.stderr), fit=fit), fit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "workspace" / "prepared" / "val")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a model.atlas weights file: its atlas")
    source.add_argument("--atlas-from", type=Path, help="a folder of training cases: build the atlas")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--fit", choices=ATLAS_FITS, default=None, help="how the atlas is placed on each case (data.atlas_fit)")
    args = ap.parse_args(argv)
    if not args.data.is_dir() or (args.atlas_from and not args.atlas_from.is_dir()):
        print(f"SKIPPED: no data at {args.data} or {args.atlas_from} (brainpaint prepare, see README)", file=sys.stderr)
        return 0
    atlas, fit = load_atlas(args)
    cases, _ = discover_cases(args.data, labels=True)
    cases = [c for c in cases if c.id.endswith("-000")][: args.cases]
    lines = [f"| case | harmonic SSIM / PSNR / MSE | harmonic + atlas residual ({fit} fit) SSIM / PSNR / MSE |", "|---|---|---|"]
    scores = {"h": [], "a": []}
    for case in cases:
        data = load_case(case, labels=True).in_ras()  # the atlas's (and the network's) axes
        voided, mask = np.asarray(data.voided, np.float32), np.asarray(data.mask, bool)
        harmonic = harmonic_fill(voided, mask)
        imap = IntensityMap.fit(voided)
        residual = atlas_residual(atlas, imap.normalize(voided), mask, (voided != 0) | mask, fit)
        guided = np.where(mask, imap.denormalize(np.clip(imap.normalize(harmonic) + residual, 0, 1)), voided)
        h, a = (official_metrics(fill, data.t1n, voided, mask) for fill in (harmonic, guided))
        scores["h"].append(h)
        scores["a"].append(a)
        lines.append(f"| {case.id} | {h['ssim']:.4f} / {h['psnr']:.2f} / {h['mse']:.5f} | "
                     f"{a['ssim']:.4f} / {a['psnr']:.2f} / {a['mse']:.5f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    mean = {s: {k: float(np.mean([r[k] for r in scores[s]])) for k in KEYS} for s in scores}
    lines.append(f"| **mean** | {mean['h']['ssim']:.4f} / {mean['h']['psnr']:.2f} / {mean['h']['mse']:.5f} | "
                 f"{mean['a']['ssim']:.4f} / {mean['a']['psnr']:.2f} / {mean['a']['mse']:.5f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
