"""QA pictures: the shipped model's fill next to the harmonic fill and the ground truth.

    python benchmarks/qa_figures.py                       # two validation cases -> docs/qa_<ID>.png
    python benchmarks/qa_figures.py --val workspace/prepared_tumour/val \
        --cases BraTS-GLI-00001-000,BraTS-GLI-00014-000   # two tumour validation cases
    python benchmarks/qa_figures.py --cases BraTS-SYN-00052-000 --weights runs/long/model.safetensors

Each picture has one row per view (axial, coronal, sagittal through the mask's centre) and the
columns voided input (mask outlined in red, a voided tumour in yellow), prediction (`--parameters-file`, else the code's
defaults), 3D harmonic fill and ground truth, cut to the mask plus a margin and enlarged 2x,
grey levels in the official metric's window. The official metrics of both fills are printed.
Without the prepared validation data the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from brainpaint.io.atomic import atomic_write
from brainpaint.infer.batch import case_seed, compose_output
from brainpaint.io.brats import discover_cases, load_case
from brainpaint.config.settings import Config
from brainpaint.evaluate import official_metrics
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.conditioning.intensity import metric_window
from brainpaint.infer.predictors import make_predictor
from brainpaint.infer.report import render_comparison

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = "BraTS-SYN-00049-000,BraTS-SYN-00056-000"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val", type=Path, default=REPO / "workspace" / "prepared" / "val")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case IDs of --val")
    ap.add_argument("--weights", type=Path, help="weights file (default: the shipped weights)")
    ap.add_argument("--parameters-file", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)
    if not args.val.is_dir():
        print(f"SKIPPED: {args.val} not found (build it with `brainpaint prepare`, see README)", file=sys.stderr)
        return 0
    cfg = Config.load(args.parameters_file)
    if args.weights:
        cfg = cfg.override({"infer.weights": str(args.weights)})
    predict = make_predictor(cfg)
    by_id = {c.id: c for c in discover_cases(args.val, labels=True)[0]}
    for case_id in args.cases.split(","):
        data = load_case(by_id[case_id], labels=True)
        prediction = compose_output(data, predict(data, case_seed(cfg.infer.seed, data.id))).astype(np.float32)
        harmonic = harmonic_fill(data.voided, data.mask)
        for name, volume in (("prediction", prediction), ("harmonic", harmonic)):
            m = official_metrics(volume, data.t1n, data.voided, data.mask_healthy)
            print(f"{case_id} {name:<10} SSIM {m['ssim']:.4f} PSNR {m['psnr']:.2f} MSE {m['mse']:.5f}")
        panels = {"voided": data.voided, "prediction": prediction, "harmonic fill": harmonic, "ground truth": data.t1n}
        tumour = np.asarray(data.mask, bool) & ~np.asarray(data.mask_healthy, bool)
        image = render_comparison(panels, data.mask, metric_window(data.voided), lesion=tumour)
        path = args.out / f"qa_{case_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            image.save(tmp, format="PNG")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
