"""Per-case validation tables: the shipped model (default settings) against the 3D harmonic fill.

    python benchmarks/validation_table.py                        # -> docs/validation_table.md
    python benchmarks/validation_table.py --weights runs/x/model.safetensors --out /tmp/t.md

Two validation sets, each a table: the healthy one, the `*-000` case of each validation subject
in `workspace/prepared/val` (one tumour-shaped mask per held-out healthy brain; `brainpaint
prepare --input-path ../shared/data/healthy-t1 --output-path workspace/prepared`), and the
tumour one, `workspace/prepared_tumour/val` (5 held-out BraTS 2018 glioma brains of three
sources, the tumour voided beside a tumour-shaped healthy mask; the command is in
docs/USAGE.md, "Tumour brains"), with its means per source as well. The fills cover the whole
mask (tumour and healthy region); they are scored on the healthy region only, with the official
`inpainting` metrics (`brainpaint.evaluate.official_metrics`: the package's numbers, computed
on the mask's bounding box), plus the stripe index (`brainpaint.evaluate.stripe_index`). The model runs with the code's default `infer` settings (the shipped sampler),
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
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from brainpaint.io.atomic import write_text
from brainpaint.io.brats import CaseData, discover_cases, from_ras, load_case
from brainpaint.config.settings import Config
from brainpaint.evaluate import official_metrics, stripe_index
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.infer.inpainter import DiffusionInpainter

REPO = Path(__file__).resolve().parents[1]
KEYS = ("ssim", "psnr", "mse")
SETS = {"healthy": REPO / "workspace" / "prepared" / "val", "tumour": REPO / "workspace" / "prepared_tumour" / "val"}
SOURCES = ("2013", "CBICA", "TCIA")  # BraTS 2018 sources, read from the subject names in the manifest


def stored_lps(data: CaseData) -> CaseData:
    """The case as an LPS-stored file would hold it: same voxels at the same world positions."""
    ras = data.in_ras()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(ras.voided.shape[:2]) - 1
    affine = ras.affine @ flip
    turn = lambda a: None if a is None else from_ras(a, affine)  # noqa: E731
    return dataclasses.replace(ras, voided=turn(ras.voided), mask=turn(ras.mask), t1n=turn(ras.t1n),
                               mask_healthy=turn(ras.mask_healthy), voided_disk=turn(ras.voided_disk), affine=affine)


def score_set(inpainter, folder: Path, n_cases: int, store: str) -> list[dict]:
    """Both fills of the `*-000` cases in `folder`, scored on their healthy masks."""
    cases, _ = discover_cases(folder, labels=True)
    subjects = _subjects(folder)
    rows = []
    for case in [c for c in cases if c.id.endswith("-000")][:n_cases]:
        data = load_case(case, labels=True)
        data = stored_lps(data) if store == "lps" else data
        mask, healthy = np.asarray(data.mask, bool), np.asarray(data.mask_healthy, bool)
        t0 = time.perf_counter()
        harmonic = harmonic_fill(np.asarray(data.voided, np.float32), mask)
        t1 = time.perf_counter()
        model = inpainter(data, seed=0).volume
        t2 = time.perf_counter()
        row = {"id": case.id, "voxels": int(healthy.sum()), "source": _source(subjects.get(case.id, "")),
               "h": official_metrics(harmonic, data.t1n, data.voided, healthy),
               "m": official_metrics(model, data.t1n, data.voided, healthy), "th": t1 - t0, "tm": t2 - t1}
        row["h"]["stripe"] = stripe_index(harmonic, data.t1n, healthy)
        row["m"]["stripe"] = stripe_index(model, data.t1n, healthy)
        rows.append(row)
        print(f"{case.id}: harmonic SSIM {row['h']['ssim']:.4f} PSNR {row['h']['psnr']:.2f} | model SSIM "
              f"{row['m']['ssim']:.4f} PSNR {row['m']['psnr']:.2f} ({t2 - t1:.1f} s)", file=sys.stderr, flush=True)
    return rows


def _subjects(folder: Path) -> dict[str, str]:
    manifest = folder.parent / "manifest.json"
    if not manifest.is_file():
        return {}
    return {c["id"]: c["subject"] for c in json.loads(manifest.read_text())["cases"]}


def _source(subject: str) -> str:
    return next((s for s in SOURCES if f"_{s}" in subject), "")


def _mean(rows: list[dict], side: str, key: str) -> float:
    return float(np.mean([r[side][key] for r in rows]))


def table(name: str, folder: Path, rows: list[dict]) -> list[str]:
    lines = [
        f"## {name.capitalize()} validation brains ({len(rows)} cases, `{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}`)",
        "",
        "| case | source | healthy voxels | harmonic SSIM | model SSIM | harmonic PSNR | model PSNR | harmonic MSE | model MSE "
        "| harmonic stripes | model stripes | harmonic s | model s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, m = r["h"], r["m"]
        lines.append(f"| {r['id']} | {r['source'] or '-'} | {r['voxels']} | {h['ssim']:.4f} | {m['ssim']:.4f} | {h['psnr']:.2f} | "
                     f"{m['psnr']:.2f} | {h['mse']:.5f} | {m['mse']:.5f} | {h['stripe']:.3f} | {m['stripe']:.3f} | {r['th']:.1f} | {r['tm']:.1f} |")
    groups = [("**mean**", rows)] + [(f"mean {s}", [r for r in rows if r["source"] == s]) for s in SOURCES]
    for label, group in groups:
        if not group or (label != "**mean**" and len(group) == len(rows)):
            continue
        lines.append(f"| {label} | | | " + " | ".join(
            f"{_mean(group, side, k):.{d}f}" for k, d in (("ssim", 4), ("psnr", 2), ("mse", 5), ("stripe", 3)) for side in "hm")
            + f" | {np.median([r['th'] for r in group]):.1f} (median) | {np.median([r['tm'] for r in group]):.1f} (median) |")
    wins = {k: sum((r["m"][k] < r["h"][k]) if k == "mse" else (r["m"][k] > r["h"][k]) for r in rows) for k in KEYS}
    lines += [
        "",
        f"Model minus harmonic fill: SSIM {_mean(rows, 'm', 'ssim') - _mean(rows, 'h', 'ssim'):+.4f}, "
        f"PSNR {_mean(rows, 'm', 'psnr') - _mean(rows, 'h', 'psnr'):+.2f} dB, "
        f"MSE {_mean(rows, 'm', 'mse') - _mean(rows, 'h', 'mse'):+.5f}, stripe index "
        f"{_mean(rows, 'm', 'stripe'):.3f} against {_mean(rows, 'h', 'stripe'):.3f}. The model is better on "
        f"{wins['ssim']} of {len(rows)} cases in SSIM, {wins['psnr']} in PSNR, {wins['mse']} in MSE.",
        "",
    ]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="healthy,tumour", help="comma-separated: healthy, tumour")
    ap.add_argument("--healthy", type=Path, default=SETS["healthy"], help="healthy validation folder")
    ap.add_argument("--tumour", type=Path, default=SETS["tumour"], help="tumour validation folder")
    ap.add_argument("--weights", type=Path, default=REPO / "workspace" / "additional_files" / "model.safetensors")
    ap.add_argument("--parameters-file", type=Path, default=None)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "validation_table.md")
    ap.add_argument("--store", choices=("as-is", "lps"), default="as-is",
                    help="lps: turn each case to the LPS storage of BraTS files before filling it")
    args = ap.parse_args(argv)
    folders = {name: getattr(args, name) for name in args.sets.split(",")}
    missing = [f"{name} ({folder})" for name, folder in folders.items() if not folder.is_dir()]
    for what in missing:
        print(f"SKIPPED: no validation data for {what} (brainpaint prepare, see docs/USAGE.md)", file=sys.stderr)
    folders = {name: folder for name, folder in folders.items() if folder.is_dir()}
    if not folders:
        return 0
    torch.set_num_threads(args.threads)
    base = Config.load(args.parameters_file) if args.parameters_file else Config()
    inpainter = DiffusionInpainter(base.override({"infer.weights": str(args.weights), "infer.device": "cpu"}))
    inf = inpainter.infer
    lines = [
        "# Shipped model vs. the harmonic fill (validation brains)",
        "",
        "<!-- written by benchmarks/validation_table.py; do not edit by hand -->",
        f"Command: `python benchmarks/validation_table.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"- Weights: `{args.weights.relative_to(REPO) if args.weights.is_relative_to(REPO) else args.weights}`; "
        f"sampler {inf.sampler}, {inf.steps} step(s), temperature {inf.temperature:g}, "
        f"{'fixed-size windows' if inf.tile else 'one box per volume'}, filter sigma {inf.smoothing_sigma:g}, "
        f"{'left-right flip average' if inf.flip_average else 'no flip average'}, seed 0.",
        f"- Cases: the `*-000` case of each held-out subject{', stored LPS' if args.store == 'lps' else ''}; both fills "
        "cover the whole mask and are scored on the healthy mask only; official `inpainting` metrics and the stripe "
        f"index; seconds: CPU, {args.threads} torch thread(s), the fill alone (no file I/O).",
        "",
    ]
    for name, folder in folders.items():
        lines += table(name, folder, score_set(inpainter, folder, args.cases, args.store))
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
