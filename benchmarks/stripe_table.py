"""Slice-consistency table: stripe index, SSIM, PSNR, MSE and time for each sampling variant.

Slice-wise 2D sampling draws every axial slice independently, which leaves stripes in coronal
and sagittal views; the official SSIM is computed in sagittal planes, so stripes cost score.
This script runs every variant through the real pipeline (`brainpaint.batch.run_infer`, then
`brainpaint.evaluate.run_evaluate` with the official metrics and the stripe index) on the same
validation cases and prints one markdown table, mean ± population std over cases:

    python benchmarks/stripe_table.py --weights workspace/additional_files/model.safetensors \
        --weights-control runs/budget_2d/model.safetensors --weights-25d runs/budget_25d/model.safetensors

Without --variants it runs harmonic, plain, gauss, rho0.9+gauss, combo, t0 and default, then
ctl+default and 25d+default when their weights are given (the README's table).
Variants (`--variants` takes a comma-separated subset of these keys, in the order given):

    harmonic      the classical 3D harmonic fill (no network): the reference
    default       the shipped sampler: the infer settings of --parameters-file as they are
    plain         the plain 2D sampler: no filter, one sample, independent noise per slice
    gauss         plain + the paper's Gaussian post-filter (sigma 1.075)
    rho0.5/0.9/1  plain + noise shared across slices (infer.noise_correlation = rho)
    ens4          plain + the mean of K = 4 samples
    rho0.9+gauss  correlated noise + filter
    combo         correlated noise (0.9) + ensemble of 4 + filter
    t0, t0+gauss  temperature 0: DDIM from x_T = 0, one deterministic fill per case (+ filter)
    t0.5+gauss    temperature 0.5 + filter
    25d, 25d+gauss, 25d+combo   the same sampler settings with the --weights-25d model
    25d+default   the --weights-25d model with the sampler of --parameters-file as it is
    ctl, ctl+gauss, ctl+default the same with --weights-control: a 2D model trained with the
                  2.5D model's budget, the equal-budget comparison

`--variants harmonic,default` reproduces the harmonic-vs-shipped-model table alone.

Every variant starts from the sampler in --parameters-file (default workspace/parameters.yaml)
and changes only what its row names. Samples are shared between variants: member k of a
case with a given noise setting is the same draw whatever the ensemble size or filter, so it
is computed once; its sampling time is still charged to every variant that uses it, so the
s/volume column is what a standalone run of that variant takes on this machine.

Cases: the `*-000` cases of --data (one mask per validation subject), or every case with
--all-masks; --cases N keeps the first N. Without the data folder the script says so loudly
and exits 0 (it is built from ../shared/data/healthy-t1 by `brainpaint prepare`).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainpaint.io.atomic import write_text
from brainpaint.infer.batch import run_infer
from brainpaint.io.brats import discover_cases
from brainpaint.config.settings import Config
from brainpaint.evaluate import run_evaluate, summarize
from brainpaint.errors import InferenceSetupError
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.model.weights_path import resolve_weights

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "workspace" / "prepared" / "val"
DEFAULT_PARAMETERS = REPO / "workspace" / "parameters.yaml"

PLAIN = {"infer.smoothing_sigma": 0.0, "infer.ensemble": 1, "infer.noise_correlation": 0.0, "infer.temperature": 1.0}
MEAN = {**PLAIN, "infer.temperature": 0.0}
GAUSS = {"infer.smoothing_sigma": 1.075}
COMBO = {"infer.noise_correlation": 0.9, "infer.ensemble": 4, **GAUSS}

# key -> (row label, weights role, overrides applied on top of the parameters file)
VARIANTS: dict[str, tuple[str, str, dict]] = {
    "harmonic": ("harmonic fill (no network)", "none", {"infer.method": "harmonic"}),
    "default": ("default (workspace/parameters.yaml)", "2d", {}),
    "plain": ("plain 2D sampler", "2d", PLAIN),
    "gauss": ("+ Gaussian filter (sigma 1.075)", "2d", {**PLAIN, **GAUSS}),
    "rho0.5": ("+ correlated noise (rho 0.5)", "2d", {**PLAIN, "infer.noise_correlation": 0.5}),
    "rho0.9": ("+ correlated noise (rho 0.9)", "2d", {**PLAIN, "infer.noise_correlation": 0.9}),
    "rho1": ("+ correlated noise (rho 1.0)", "2d", {**PLAIN, "infer.noise_correlation": 1.0}),
    "ens4": ("+ ensemble K=4", "2d", {**PLAIN, "infer.ensemble": 4}),
    "rho0.9+gauss": ("+ correlated noise (rho 0.9) + filter", "2d", {**PLAIN, "infer.noise_correlation": 0.9, **GAUSS}),
    "combo": ("+ correlated noise (rho 0.9) + ensemble K=4 + filter", "2d", {**PLAIN, **COMBO}),
    "t0": ("temperature 0 (DDIM from x_T = 0, deterministic)", "2d", MEAN),
    "t0+gauss": ("temperature 0 + filter", "2d", {**MEAN, **GAUSS}),
    "t0.5+gauss": ("temperature 0.5 + filter", "2d", {**PLAIN, "infer.temperature": 0.5, **GAUSS}),
    "25d": ("2.5D model, plain sampler", "25d", PLAIN),
    "25d+gauss": ("2.5D model + Gaussian filter", "25d", {**PLAIN, **GAUSS}),
    "25d+combo": ("2.5D model + correlated noise (rho 0.9) + ensemble K=4 + filter", "25d", {**PLAIN, **COMBO}),
    "25d+default": ("2.5D model, default sampler", "25d", {}),
    "ctl": ("2D control (equal budget), plain sampler", "ctl", PLAIN),
    "ctl+gauss": ("2D control (equal budget) + Gaussian filter", "ctl", {**PLAIN, **GAUSS}),
    "ctl+default": ("2D control (equal budget), default sampler", "ctl", {}),
}
# The README's table: every option once, then the equal-budget pair when both weights are given.
DEFAULT_VARIANTS = ["harmonic", "plain", "gauss", "rho0.9+gauss", "combo", "t0", "default"]
DEFAULT_VARIANTS_CONTROL = ["ctl+default"]
DEFAULT_VARIANTS_25D = ["25d+default"]
ROLE_NAMES = {"2d": "2D", "25d": "2.5D", "ctl": "2D control"}
COLUMNS = ("stripe_index", "ssim", "psnr", "mse")


def loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", file=sys.stderr)


class SharedSampleInpainter(DiffusionInpainter):
    """A `DiffusionInpainter` whose slice samples are shared by all variants of one table.

    The key holds everything that determines a draw (weights, conditioning, seed, member, noise
    and sampler settings), so a reused sample is bit-identical to a fresh one. `charged_s`
    accumulates the sampling time of reused draws, so timings stay those of standalone runs.
    """

    def __init__(self, cfg: Config, store: dict):
        super().__init__(cfg)
        self.store = store
        self.charged_s = 0.0

    def sample_slices(self, cond: np.ndarray, seed: int, member: int, keys=None) -> np.ndarray:
        inf = self.infer
        key = (
            repr(keys),
            str(self.weights), str(self.device), hashlib.sha1(np.ascontiguousarray(cond).tobytes()).hexdigest(),
            int(seed), int(member), float(inf.noise_correlation), float(inf.temperature), inf.sampler, int(inf.steps), float(inf.eta),
            bool(inf.repaint), bool(inf.bf16),
        )
        if key in self.store:
            x0, seconds = self.store[key]
            self.charged_s += seconds
            return x0.copy()
        start = time.perf_counter()
        x0 = super().sample_slices(cond, seed, member, keys)
        self.store[key] = (x0.copy(), time.perf_counter() - start)
        return x0


def select_cases(data: Path, all_masks: bool, limit: int | None) -> list:
    cases, errors = discover_cases(data, labels=True)
    for err in errors:
        print(f"warning: skipping {err}", file=sys.stderr)
    chosen = [c for c in cases if all_masks or c.id.endswith("-000")]
    return chosen[:limit] if limit else chosen


def weights_label(path: Path) -> str:
    """The weights path plus the training step recorded in its metadata (when there is one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except Exception:
        step = None
    return f"{path}" + (f" (step {step})" if step else "")


def run_variant(key: str, cfg: Config, data: Path, work: Path, store: dict, n_cases: int) -> dict:
    """Infer + score one variant; returns per-case rows, timing and failure count."""
    label, _, _ = VARIANTS[key]
    out = work / f"pred_{key.replace('+', '_')}"
    print(f"--- {key}: {label}", file=sys.stderr)
    try:
        predictor = SharedSampleInpainter(cfg, store) if cfg.infer.method == "diffusion" else None
    except InferenceSetupError as exc:
        print(f"error: {key}: {exc}", file=sys.stderr)
        return {"key": key, "label": label, "rows": [], "stats": {}, "s_per_volume": math.nan, "failed": n_cases}
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        rc_infer = run_infer(cfg, data, out, overwrite=True, predictor=predictor)
    seconds = time.perf_counter() - start + (predictor.charged_s if predictor else 0.0)
    scores = work / f"scores_{key.replace('+', '_')}.csv"
    with contextlib.redirect_stdout(sys.stderr):
        rc_eval = run_evaluate(cfg, out, data, scores)
    rows = []
    if scores.is_file():
        with scores.open() as f:
            rows = [{k: (v if k == "case" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    return {
        "key": key,
        "label": label,
        "rows": rows,
        "stats": summarize(rows) if rows else {},
        "s_per_volume": seconds / max(n_cases, 1),
        "failed": n_cases - len(rows) if (rc_infer or rc_eval) else 0,
    }


def fmt(stat: dict | None, digits: int) -> str:
    if not stat or not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_table(results: list[dict]) -> str:
    lines = [
        "| variant | stripe index | SSIM | PSNR | MSE | s/volume |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["stats"]
        label = r["label"] + (f" ({r['failed']} failed)" if r["failed"] else "")
        seconds = "n/a" if math.isnan(r["s_per_volume"]) else f"{r['s_per_volume']:.1f}"
        lines.append(
            f"| {label} | {fmt(s.get('stripe_index'), 3)} | {fmt(s.get('ssim'), 4)} | {fmt(s.get('psnr'), 2)} "
            f"| {fmt(s.get('mse'), 5)} | {seconds} |"
        )
    return "\n".join(lines)


def goal_lines(results: list[dict]) -> list[str]:
    """The issue's goal: stripe index <= 1.1 with SSIM >= the plain sampler + Gaussian filter."""
    by_key = {r["key"]: r for r in results}
    ref = by_key.get("gauss", {}).get("stats", {}).get("ssim")
    if not ref:
        return []
    met = [
        r["label"]
        for r in results
        if r["stats"].get("stripe_index", {}).get("mean", math.inf) <= 1.1
        and r["stats"].get("ssim", {}).get("mean", -math.inf) >= ref["mean"]
    ]
    goal = "Goal (stripe index <= 1.1 and SSIM >= plain sampler + Gaussian filter): "
    return [goal + ("met by " + "; ".join(met) if met else "not met by any variant") + "."]


def display_path(path: Path) -> str:
    """A path relative to the repository when it lies inside it (stable across checkouts)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="2D model weights (default: infer.weights, else the shipped weights)")
    ap.add_argument("--weights-25d", help="2.5D model weights (model.context_slices > 0): adds the 2.5D rows")
    ap.add_argument(
        "--weights-control", help="2D weights trained with the 2.5D model's budget (the equal-budget control): adds the ctl rows"
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BraTS-layout cases with labels")
    ap.add_argument("--parameters-file", type=Path, default=DEFAULT_PARAMETERS, help="base sampler settings")
    ap.add_argument("--variants", help=f"comma-separated keys from: {', '.join(VARIANTS)}")
    ap.add_argument("--cases", type=int, default=None, help="use only the first N cases")
    ap.add_argument("--all-masks", action="store_true", help="every case, not only the *-000 ones")
    ap.add_argument("--steps", type=int, default=None, help="override infer.steps for every variant")
    ap.add_argument("--device", default=None, help="override infer.device (auto, cpu, cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, help="also write the table (with its header) to this markdown file")
    ap.add_argument("--keep", type=Path, help="keep predictions and per-case scores in this folder")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants:
        keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    else:
        keys = DEFAULT_VARIANTS + (DEFAULT_VARIANTS_CONTROL if args.weights_control else [])
        keys += DEFAULT_VARIANTS_25D if args.weights_25d else []
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        loud(
            f"SKIPPED: validation data {args.data} not found. Build it with `brainpaint prepare` from "
            "../shared/data/healthy-t1 (see the README), or pass --data <BraTS folder with labels>."
        )
        return 0

    base = Config.load(args.parameters_file if args.parameters_file.is_file() else None)
    fixed = {}
    if args.steps:
        fixed["infer.steps"] = args.steps
    if args.device:
        fixed["infer.device"] = args.device
    # role -> (weights file, the option that must give it; the 2D role falls back to the shipped weights)
    given = {
        "2d": (args.weights or base.infer.weights, None),
        "25d": (args.weights_25d, "--weights-25d"),
        "ctl": (args.weights_control, "--weights-control"),
    }
    used = {VARIANTS[k][1] for k in keys}
    weights = {}
    try:
        for role in (r for r in ROLE_NAMES if r in used):
            path, option = given[role]
            if option and not path:
                raise InferenceSetupError(f"the {ROLE_NAMES[role]} variants need {option}")
            weights[role] = resolve_weights(path)
    except InferenceSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    cases = select_cases(args.data, args.all_masks, args.cases)
    if not cases:
        print(f"error: no usable cases in {args.data}", file=sys.stderr)
        return 2
    ids = [c.id for c in cases]
    print(f"{len(ids)} cases: {', '.join(ids)}", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stripe_table_")))
        data = work / "cases"
        data.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = data / case.id
            if not link.exists():
                link.symlink_to(case.folder.resolve())
        store: dict = {}
        results = []
        done: dict[str, dict] = {}  # resolved infer settings -> result (e.g. default == gauss)
        for key in keys:
            _, role, overrides = VARIANTS[key]
            settings = {**overrides, **fixed}
            if role in weights:
                settings["infer.weights"] = str(weights[role])
            cfg = base.override(settings)
            same = repr(sorted(cfg.to_dict()["infer"].items()))
            if same in done:
                print(f"--- {key}: same settings as {done[same]['key']}, not run again", file=sys.stderr)
                results.append({**done[same], "key": key, "label": VARIANTS[key][0]})
            else:
                results.append(run_variant(key, cfg, data, work, store, len(cases)))
                done[same] = results[-1]
            if key == "default":
                results[-1]["label"] = f"default ({display_path(args.parameters_file)})"

    inf = base.override(fixed).infer
    device = "CUDA" if (inf.device in ("auto", "cuda") and torch.cuda.is_available()) or str(inf.device).startswith("cuda") else "CPU"
    header = [
        f"Cases: {len(ids)} ({', '.join(ids)}) from {args.data}.",
        f"Sampler (from {args.parameters_file.name}{', --steps' if args.steps else ''}): {inf.sampler}, "
        f"{inf.steps} steps, eta {inf.eta}, temperature {inf.temperature}, ensemble {inf.ensemble}, "
        f"filter sigma {inf.smoothing_sigma}; seed {inf.seed}. Mean ± population std over cases.",
    ]
    for role, path in weights.items():
        header.append(f"{ROLE_NAMES[role]} weights: {weights_label(path)}.")
    header.append(f"s/volume: {device}, {torch.get_num_threads()} torch thread(s), end to end (load, sample, write).")
    command = "python benchmarks/stripe_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = "\n".join(
        [f"Command: `{command}`", ""] + [f"- {h}" for h in header] + ["", format_table(results), ""] + goal_lines(results)
    )
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 1 if any(r["failed"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
