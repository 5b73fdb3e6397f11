"""Fixed-budget model study: every arm trains for the same CPU time, then is scored on the
validation subjects with the official metrics at fixed training steps.

    python benchmarks/model_study.py                      # all arms, 40 CPU minutes each
    python benchmarks/model_study.py --arms x0_64,eps_64  # a subset (in that order)
    python benchmarks/model_study.py --report-only        # redraw table and curve from the results

Each arm is `configs/study/<arm>.yaml` laid over `configs/study/base.yaml`: one or two settings
of the ordinary configuration (prediction target, crop size, mirror channel, loss weighting,
schedule, augmentation, width), never a separate code path. Every arm starts from the same
seed, data and validation cases. Training stops when the training process has used
`--cpu-minutes` of CPU time (`train.max_cpu_minutes`, all threads counted, kept across
resumes), so an arm with a costlier step simply takes fewer steps. The EMA weights are exported
every `train.export_every` steps.

Validation: the `*-000` case of each validation subject (one tumour-shaped mask per brain),
inpainted with the arm's own `infer` settings (`configs/study/<arm>.yaml`, else the base
file's), scored with the official `inpainting` metrics (`brainpaint.evaluate.official_metrics`,
identical numbers on the mask's bounding box), mean over cases. The 3D harmonic fill of the
same cases is the reference line.

Results: `runs/study/<arm>/` (run folder, exports, `eval.csv`), then `docs/model_study.csv`
(every scored export), `docs/model_study.md` (one row per arm at its last export, with the
harmonic fill) and `docs/model_study.png` (validation SSIM and PSNR against training step).
Training and scoring resume where they stopped: rerunning the command finishes a study.
Without the prepared data (`brainpaint prepare`, see README) the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from brainpaint.io.brats import discover_cases, load_case
from brainpaint.config.settings import Config, merge_parameters
from brainpaint.evaluate import official_metrics
from brainpaint.train.checkpoints import list_checkpoints
from brainpaint.conditioning.inputs import prior_cache
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.model.weights import read_metadata

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "study"
# Arms in the order they run, with the one-line description the table shows.
ARMS = {
    "eps_64": "paper target (eps), 64-px crops, harmonic prior (the earlier shipped recipe)",
    "x0_64": "x0 target",
    "x0_128": "x0 target, 128-px crops",
    "x0_128_mirror": "x0, 128-px crops, mirrored hemisphere channel",
    "x0_128_mirror_minsnr": "... + min-SNR-5 loss weighting",
    "x0_128_mirror_terminal": "... + a quarter of the samples at t = T - 1",
    "x0_128_mirror_sched": "... + linear LR decay over the budget, 200 warm-up steps",
    "x0_128_mirror_aug": "... + gamma and bias-field intensity augmentation",
    "x0_128_mirror_wide": "... + twice the width (32 base channels)",
}
EVAL_FIELDS = ["arm", "step", "cpu_minutes", "slices_seen", "ssim", "psnr", "mse", "ssim_std", "psnr_std", "mse_std", "seconds"]


def arm_parameters(arm: str, cpu_minutes: float) -> tuple[dict, dict]:
    """(brainpaint settings, study settings) of an arm. An arm file may carry a `study:` section
    for the study itself (`eval_every`: score only exports at multiples of this step, e.g. for
    an arm whose sampler is slow); everything else is ordinary configuration."""
    base = yaml.safe_load((STUDY / "base.yaml").read_text())
    params = merge_parameters(base, yaml.safe_load((STUDY / f"{arm}.yaml").read_text()) or {})
    study = params.pop("study", None) or {}
    params.setdefault("train", {})["max_cpu_minutes"] = float(cpu_minutes)
    Config.from_dict(params)  # fail early on a typo
    return params, study


def cpu_minutes_done(run: Path) -> float:
    ckpts = list_checkpoints(run)
    if not ckpts:
        return 0.0
    state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=True)
    return float(state.get("cpu_seconds", 0.0)) / 60.0


def train_arm(arm: str, params: dict, args) -> None:
    run = args.out / arm
    budget = float(params["train"]["max_cpu_minutes"])
    done = cpu_minutes_done(run)
    if done >= budget - 0.05 and (run / "model.safetensors").is_file():
        print(f"[{arm}] trained: {done:.1f} of {budget:.0f} CPU minutes", flush=True)
        return
    run.mkdir(parents=True, exist_ok=True)
    param_file = run / "study_parameters.yaml"
    param_file.write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [
        sys.executable, "-m", "brainpaint", "train",
        "--data-path", str(args.train), "--output-path", str(run), "--parameters-file", str(param_file),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"[{arm}] training ({done:.1f} of {budget:.0f} CPU minutes done): {' '.join(cmd)}", flush=True)
    with (run / "train_stdout.log").open("a") as log:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"[{arm}] training failed with exit status {rc}; see {run / 'train_stdout.log'}")


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


def evaluate_arm(arm: str, params: dict, val: Validation, args, eval_every: int = 0) -> list[dict]:
    run = args.out / arm
    rows = read_csv(run / "eval.csv")
    seen = {int(r["step"]) for r in rows}
    infer = dict(params.get("infer", {}))
    batch = int(params["train"]["batch_size"])
    exports = exports_of(run)
    for step, path, cpu in exports:
        stride = eval_every or args.eval_every
        thinned = stride and step % stride and step != exports[-1][0]  # always the last
        if step in seen or thinned:
            continue
        t0 = time.time()
        scores = val.weights(path, infer, args.threads)
        rows.append({"arm": arm, "step": step, "cpu_minutes": f"{cpu:.2f}", "slices_seen": step * batch,
                     **{k: f"{v:.6g}" for k, v in scores.items()}, "seconds": f"{time.time() - t0:.1f}"})
        rows.sort(key=lambda r: int(r["step"]))
        write_csv(run / "eval.csv", rows, EVAL_FIELDS)
        print(f"[{arm}] step {step}: SSIM {scores['ssim']:.4f} PSNR {scores['psnr']:.2f} MSE {scores['mse']:.5f}", flush=True)
    return rows


def report(arms: list[str], harmonic: dict, args) -> None:
    all_rows = []
    for arm in arms:
        all_rows += read_csv(args.out / arm / "eval.csv")
    write_csv(args.docs / "model_study.csv", all_rows, EVAL_FIELDS)
    lines = [
        "| arm | what changes | steps | slices | CPU min | SSIM | PSNR | MSE | ΔSSIM | ΔPSNR |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| harmonic | 3D harmonic fill, no network | – | – | – | {harmonic['ssim']:.4f} ± {harmonic['ssim_std']:.4f} | "
        f"{harmonic['psnr']:.2f} ± {harmonic['psnr_std']:.2f} | {harmonic['mse']:.5f} | – | – |",
    ]
    for arm in arms:
        rows = [r for r in all_rows if r["arm"] == arm]
        if not rows:
            continue
        last = max(rows, key=lambda r: int(r["step"]))
        s, p, m = float(last["ssim"]), float(last["psnr"]), float(last["mse"])
        lines.append(
            f"| {arm} | {ARMS.get(arm, '')} | {last['step']} | {last['slices_seen']} | {float(last['cpu_minutes']):.1f} | "
            f"{s:.4f} ± {float(last['ssim_std']):.4f} | {p:.2f} ± {float(last['psnr_std']):.2f} | {m:.5f} | "
            f"{s - harmonic['ssim']:+.4f} | {p - harmonic['psnr']:+.2f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.docs / "model_study.md").write_text(
        "<!-- written by benchmarks/model_study.py; do not edit by hand -->\n"
        f"Validation subjects: {args.cases}, `*-000` masks; each arm at its last export "
        f"(budget {args.cpu_minutes:g} CPU minutes); mean ± population std over cases.\n\n" + table
    )
    print(table)
    plot(arms, all_rows, harmonic, args.docs / "model_study.png")


def plot(arms: list[str], rows: list[dict], harmonic: dict, path: Path) -> None:
    series = [(arm, [(int(r["step"]), r) for r in rows if r["arm"] == arm]) for arm in arms]
    draw_curves(series, harmonic, "training step", "Fixed-budget model study (official metrics, validation subjects)", path)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (configs/study/<arm>.yaml)")
    ap.add_argument("--cpu-minutes", type=float, default=40.0, help="training budget of every arm (CPU minutes)")
    ap.add_argument("--train", type=Path, default=REPO / "workspace" / "prepared" / "train")
    ap.add_argument("--val", type=Path, default=REPO / "workspace" / "prepared" / "val")
    ap.add_argument("--cases", type=int, default=8, help="validation subjects (their *-000 case)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=0, help="score only exports at multiples of this step")
    ap.add_argument("--report-only", action="store_true", help="no training or scoring: redraw from the results")
    args = ap.parse_args(argv)
    if not args.train.is_dir() or not args.val.is_dir():
        print(
            f"SKIPPED: prepared data not found ({args.train}, {args.val}); build it with "
            "`brainpaint prepare --input-path ../shared/data/healthy-t1 --output-path workspace/prepared`",
            file=sys.stderr,
        )
        return 0
    arms = [a for a in args.arms.split(",") if a]
    for arm in arms:
        if not (STUDY / f"{arm}.yaml").is_file():
            raise SystemExit(f"unknown arm '{arm}': no {STUDY / (arm + '.yaml')}")
    torch.set_num_threads(args.threads)
    val = Validation(args.val, args.cases)
    harmonic = val.harmonic()
    print(f"harmonic fill: SSIM {harmonic['ssim']:.4f} PSNR {harmonic['psnr']:.2f}", flush=True)
    for arm in arms:
        params, study = arm_parameters(arm, args.cpu_minutes)
        if not args.report_only:
            train_arm(arm, params, args)
            evaluate_arm(arm, params, val, args, int(study.get("eval_every", 0)))
        report(arms, harmonic, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
