"""Learning curve of the shipped model across its training stages: validation SSIM and PSNR
against the CPU minutes spent since the first step, the harmonic fill as a line.

    python benchmarks/stage_curve.py --run runs/x0_ctx2rg2 --stage "x0_ctx2rg2 (continued)" --start-minutes 612
    python benchmarks/stage_curve.py --weights runs/x0_ctx2rg/model.safetensors --stage "x0_ctx2rg (registered atlas)" --start-minutes 582
    python benchmarks/stage_curve.py --report-only      # redraw docs/stage_curve.png from the CSV

Each stage warm-starts from the one before it, so its points sit at the stage's own CPU minutes
(the `cpu_seconds` of each export) plus `--start-minutes`, the minutes of the stages before it.
`--run` scores every EMA export of a run folder (`exports/step_*.safetensors`) not yet in the
CSV, so rerunning it while a run trains picks up the new exports; `--weights` scores one file
(`--step` and `--minutes` place it when its metadata does not). Scoring
(`Validation`): the `*-000` case of the 8 validation subjects, each weights file's own
inference settings (the defaults), the official `inpainting` metrics, mean over cases.

Results: `docs/stage_curve.csv` (one row per scored point; rows of stages whose exports are no
longer kept carry `source: recorded`, the numbers of the model card's table) and
`docs/stage_curve.png`. Without the prepared data the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

from brainpaint.conditioning.inputs import prior_cache
from brainpaint.config.settings import Config
from brainpaint.evaluate import official_metrics
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.io.brats import discover_cases, load_case
from brainpaint.model.weights import read_metadata

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["stage", "step", "minutes", "ssim", "psnr", "mse", "source"]


class Validation:
    """The validation cases, loaded once in RAS axes (the frame of the predictor's
    `known_priors`), with their harmonic fills and midlines."""

    def __init__(self, folder: Path, n: int):
        cases, errors = discover_cases(folder, labels=True)
        if errors:
            raise SystemExit(f"validation data: {errors[0]}")
        self.cases = [load_case(c, labels=True).in_ras() for c in cases if c.id.endswith("-000")][:n]
        self.prior = {data.id: prior_cache(data.voided, data.mask) for data in self.cases}

    def score(self, predict) -> dict:
        rows = []
        for data in self.cases:
            rows.append(official_metrics(predict(data), data.t1n, data.voided, data.mask))
        out = {}
        for key in ("ssim", "psnr", "mse"):
            values = np.array([r[key] for r in rows])
            out[key], out[f"{key}_std"] = float(values.mean()), float(values.std())
        return out

    def harmonic(self) -> dict:
        def fill(data):
            mask = np.asarray(data.mask, bool)
            out = np.asarray(data.voided, np.float32).copy()
            out[mask] = self.prior[data.id].fill
            return out

        return self.score(fill)

    def weights(self, path: Path, infer: dict, threads: int) -> dict:
        cfg = Config.from_dict({"infer": dict(infer, weights=str(path), device="cpu")})
        inpainter = DiffusionInpainter(cfg)
        inpainter.known_priors = self.prior
        torch.set_num_threads(threads)
        return self.score(lambda data: inpainter(data, seed=0).volume)


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def exports_of(run: Path) -> list[tuple[int, Path, float]]:
    """(step, file, CPU minutes) of every exported EMA state of a run, by step."""
    found = []
    for path in sorted((run / "exports").glob("step_*.safetensors")):
        meta = read_metadata(path)
        found.append((int(meta.get("step", path.stem.split("_")[1])), path, float(meta.get("cpu_seconds", "nan")) / 60.0))
    return found


def draw_curves(series: list[tuple[str, list[tuple[float, dict]]]], harmonic: dict, xlabel: str, title: str,
                path: Path, legend_size: int = 8) -> None:
    """Validation SSIM and PSNR (two panels) of each (label, [(x, scored row)]) series, the
    harmonic fill as a dashed line, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "ssim", "validation SSIM"), (axes[1], "psnr", "validation PSNR (dB)")):
        for name, points in series:
            pts = sorted((x, float(r[key])) for x, r in points)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.axhline(harmonic[key], color="k", ls="--", lw=1, label="harmonic fill")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=legend_size, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def score_point(val: Validation, stage: str, step: int, minutes: float, path: Path, threads: int) -> dict:
    scores = val.weights(path, {}, threads)
    print(f"{stage} step {step} ({minutes:.0f} CPU min): SSIM {scores['ssim']:.4f} PSNR {scores['psnr']:.2f} MSE {scores['mse']:.5f}")
    return {"stage": stage, "step": step, "minutes": f"{minutes:.1f}", "ssim": f"{scores['ssim']:.6f}",
            "psnr": f"{scores['psnr']:.4f}", "mse": f"{scores['mse']:.6f}", "source": str(path)}


def plot(rows: list[dict], harmonic: dict, path: Path) -> None:
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    series = [(stage, [(float(r["minutes"]), r) for r in rows if r["stage"] == stage]) for stage in stages]
    draw_curves(series, harmonic, "CPU minutes since the first step (all stages)",
                "Shipped model's stages (official metrics, 8 validation subjects, one step)", path, legend_size=7)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder: score each of its exports")
    ap.add_argument("--weights", type=Path, help="one weights file to score")
    ap.add_argument("--stage", help="the stage's name in the CSV and the legend")
    ap.add_argument("--start-minutes", type=float, default=0.0, help="CPU minutes of the stages before")
    ap.add_argument("--step", type=int, help="--weights: its step (default: its metadata)")
    ap.add_argument("--minutes", type=float, help="--weights: its stage's CPU minutes (default: its metadata)")
    ap.add_argument("--val", type=Path, default=REPO / "workspace" / "prepared" / "val")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument("--report-only", action="store_true", help="no scoring: redraw from the CSV")
    args = ap.parse_args(argv)
    csv_path = args.docs / "stage_curve.csv"
    rows = read_csv(csv_path)
    if not args.report_only and (args.run is None) == (args.weights is None):
        ap.error("give one of --run, --weights or --report-only")
    if not args.report_only and not args.stage:
        ap.error("--stage names the scored stage")
    if not args.val.is_dir():
        print(f"SKIPPED: no validation data at {args.val} (brainpaint prepare, see README)")
        return 0
    val = Validation(args.val, args.cases)
    harmonic = val.harmonic()
    if not args.report_only:
        done = {(r["stage"], int(r["step"])) for r in rows}
        if args.run is not None:
            todo = [(step, path, args.start_minutes + minutes) for step, path, minutes in exports_of(args.run)]
        else:
            meta = read_metadata(args.weights)
            step = args.step if args.step is not None else int(meta.get("step", 0))
            minutes = args.minutes if args.minutes is not None else float(meta.get("cpu_seconds", 0)) / 60.0
            todo = [(step, args.weights, args.start_minutes + minutes)]
        for step, path, minutes in todo:
            if (args.stage, step) not in done:
                rows.append(score_point(val, args.stage, step, minutes, path, args.threads))
                write_csv(csv_path, rows, FIELDS)  # after each point: an interrupted run keeps what it scored
    print(f"harmonic fill: SSIM {harmonic['ssim']:.4f} PSNR {harmonic['psnr']:.2f}")
    if rows:
        plot(rows, harmonic, args.docs / "stage_curve.png")
        print(f"wrote {csv_path} and {args.docs / 'stage_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
