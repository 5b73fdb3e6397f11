"""Per-case validation table: the shipped model (default settings) against the 3D harmonic fill.

    python benchmarks/validation_table.py                        # -> docs/validation_table.md
    python benchmarks/validation_table.py --weights runs/x0_mirror/model.safetensors --out /tmp/t.md

Cases: the `*-000` case of each validation subject in `workspace/prepared/val` (one
tumour-shaped mask per held-out brain). Both fills are scored with the official `inpainting`
metrics (`brainpaint.evaluate.official_metrics`: the package's numbers, computed on the mask's
bounding box). The model runs with the code's default `infer` settings (the shipped sampler),
`--parameters-file` overriding them. Prints and writes a markdown table: one row per case, the
means, and on how many cases the model beats the harmonic fill in each metric. Without the
prepared data the script says so loudly and exits 0.

`--store lps` stores each case the way BraTS stores its files (LPS axes: the arrays' first two
axes reversed, the affine to match, every voxel at its world position) before filling it. The
network works in RAS axes whatever the storage (`CaseData.in_ras`), so that table must equal the
RAS one.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from brainpaint.io.atomic import write_text
from brainpaint.io.brats import CaseData, discover_cases, from_ras, load_case
from brainpaint.config.settings import Config
from brainpaint.evaluate import official_metrics
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.infer.inpainter import DiffusionInpainter

REPO = Path(__file__).resolve().parents[1]
KEYS = ("ssim", "psnr", "mse")


def stored_lps(data: CaseData) -> CaseData:
    """The case as an LPS-stored file would hold it: same voxels at the same world positions."""
    ras = data.in_ras()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.voided.shape[:2]) - 1
    affine = ras.affine @ flip
    turn = lambda a: None if a is None else from_ras(a, affine)  # noqa: E731
    return dataclasses.replace(ras, voided=turn(ras.voided), mask=turn(ras.mask), t1n=turn(ras.t1n),
                               mask_healthy=turn(ras.mask_healthy), voided_disk=turn(ras.voided_disk), affine=affine)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "workspace" / "prepared" / "val")
    ap.add_argument("--weights", type=Path, default=REPO / "workspace" / "additional_files" / "model.safetensors")
    ap.add_argument("--parameters-file", type=Path, default=None)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "validation_table.md")
    ap.add_argument("--store", choices=("as-is", "lps"), default="as-is",
                    help="lps: turn each case to the LPS storage of BraTS files before filling it")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"SKIPPED: no validation data at {args.data} (brainpaint prepare, see README)", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    base = Config.load(args.parameters_file) if args.parameters_file else Config()
    cfg = base.override({"infer.weights": str(args.weights), "infer.device": "cpu"})
    inpainter = DiffusionInpainter(cfg)
    cases, _ = discover_cases(args.data, labels=True)
    cases = [c for c in cases if c.id.endswith("-000")][: args.cases]
    rows = []
    for case in cases:
        data = load_case(case, labels=True)
        if args.store == "lps":
            data = stored_lps(data)
        mask = np.asarray(data.mask, bool)
        t0 = time.perf_counter()
        harmonic = harmonic_fill(np.asarray(data.voided, np.float32), mask)
        t1 = time.perf_counter()
        model = inpainter(data, seed=0).volume
        t2 = time.perf_counter()
        h = official_metrics(harmonic, data.t1n, data.voided, mask)
        m = official_metrics(model, data.t1n, data.voided, mask)
        rows.append((case.id, int(mask.sum()), h, m, t1 - t0, t2 - t1))
        print(f"{case.id}: harmonic SSIM {h['ssim']:.4f} PSNR {h['psnr']:.2f} | model SSIM {m['ssim']:.4f} "
              f"PSNR {m['psnr']:.2f} ({t2 - t1:.1f} s)", file=sys.stderr, flush=True)
    inf = inpainter.infer
    lines = [
        "# Shipped model vs. the harmonic fill (validation subjects)",
        "",
        "<!-- written by benchmarks/validation_table.py; do not edit by hand -->",
        f"Command: `python benchmarks/validation_table.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + "",
        "",
        f"- Weights: `{args.weights.relative_to(REPO) if args.weights.is_relative_to(REPO) else args.weights}`; "
        f"sampler {inf.sampler}, {inf.steps} step(s), temperature {inf.temperature:g}, "
        f"{'fixed-size windows' if inf.tile else 'one box per volume'}, filter sigma {inf.smoothing_sigma:g}, "
        f"{'left-right flip average' if inf.flip_average else 'no flip average'}, seed 0.",
        f"- Cases: the `*-000` case of {len(rows)} held-out subjects in `{args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data}`"
        f"{', stored LPS' if args.store == 'lps' else ''}; "
        "official `inpainting` metrics; seconds: CPU, "
        f"{args.threads} torch thread(s), the fill alone (no file I/O).",
        "",
        "| case | mask voxels | harmonic SSIM | model SSIM | harmonic PSNR | model PSNR | harmonic MSE | model MSE | harmonic s | model s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cid, vox, h, m, th, tm in rows:
        lines.append(f"| {cid} | {vox} | {h['ssim']:.4f} | {m['ssim']:.4f} | {h['psnr']:.2f} | {m['psnr']:.2f} | "
                     f"{h['mse']:.5f} | {m['mse']:.5f} | {th:.1f} | {tm:.1f} |")
    mean = {side: {k: float(np.mean([r[2 if side == 'h' else 3][k] for r in rows])) for k in KEYS} for side in "hm"}
    lines.append(f"| **mean** | | {mean['h']['ssim']:.4f} | **{mean['m']['ssim']:.4f}** | {mean['h']['psnr']:.2f} | "
                 f"**{mean['m']['psnr']:.2f}** | {mean['h']['mse']:.5f} | **{mean['m']['mse']:.5f}** | "
                 f"{np.median([r[4] for r in rows]):.1f} (median) | {np.median([r[5] for r in rows]):.1f} (median) |")
    wins = {k: sum((r[3][k] < r[2][k]) if k == "mse" else (r[3][k] > r[2][k]) for r in rows) for k in KEYS}
    lines += [
        "",
        f"Model minus harmonic fill: SSIM {mean['m']['ssim'] - mean['h']['ssim']:+.4f}, "
        f"PSNR {mean['m']['psnr'] - mean['h']['psnr']:+.2f} dB, MSE {mean['m']['mse'] - mean['h']['mse']:+.5f}. "
        f"The model is better on {wins['ssim']} of {len(rows)} cases in SSIM, {wins['psnr']} in PSNR, {wins['mse']} in MSE.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
