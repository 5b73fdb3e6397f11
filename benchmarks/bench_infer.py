"""Inference benchmark: the default path, few-step conditional means and the paper's 1000 steps,
on the same weights and case, in one run.

Paths (each in a fresh child process, so its peak RSS is its own):

    default        the configured sampler (`--parameters-file`, else the code's defaults)
    ddim-1/2/4/16  DDIM from x_T = 0 (temperature 0) with that many steps and the same filter:
                   the conditional-mean estimates (one step from pure noise is exactly the
                   network's x0 prediction, the conditional mean an x0/v model is trained for)
    ddpm-1000      the paper-faithful path: ancestral DDPM, 1000 steps, batches of 16, fp32,
                   one draw at temperature 1, Gaussian filter sigma 1.075

For each: seconds per volume (inference of the whole case, after a warm-up), SSIM and PSNR
from the official `inpainting` package, the stripe index, and the child's peak RSS. Then the
speed ratio of the default against ddpm-1000 and the SSIM gaps.

    python benchmarks/bench_infer.py --subject sub-50 --mask-cm3 2 3
    python benchmarks/bench_infer.py --validation       # 1/2/4/16 steps on the validation subjects
    python benchmarks/bench_infer.py --brats-size       # BraTS-size cases: stages, harmonic ratio, RSS

BraTS-size mode (`--brats-size`): real glioma brains from `../shared/data/brats18-t1`, each
with its tumour (seg > 0, grown by 2 voxels) voided plus a tumour-shaped healthy mask clear of
the tumour, together at least `--total-cm3` (250), in the BraTS 2023 layout (cached under
`workspace/prepared_brats_size/`); `--cases-dir` adds other labelled case folders (the tumour and
healthy validation sets). On every case, in one process and interleaved: the harmonic fill and
the default (shipped weights, default settings), timed and scored with the official metrics, the
default's stage times; then the same cases as one `brainpaint infer --profile` run in a child
process (reading and preparing overlapped with the network), its per-case seconds, stage table,
wall time and peak RSS, and `--method harmonic` the same way. Prints the stage table, median and
maximum seconds per case, the ratio of the default's time to the harmonic fill's, peak RSS.

Case: `--case <folder>` (BraTS layout, with `-t1n` and `-mask-healthy` for quality), else a
case built from `../shared/data/healthy-t1/<subject>` with a generated tumour-shaped mask
(`--mask-cm3 2 3`: a small one, so the 1000-step path runs in full on a CPU). Without the data
the script says so loudly and exits 0. `--random-preset tiny` uses random weights to check the
pipeline (quality meaningless). `--faithful-steps N` times N ancestral steps and scales to 1000
(printed as EXTRAPOLATED, no quality).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `brainpaint infer` runs torch (predictors.make_predictor)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from brainpaint.infer.batch import case_seed, compose_output  # noqa: E402
from brainpaint.io.brats import CaseData, discover_cases, load_case, write_nifti_atomic  # noqa: E402
from brainpaint.config.settings import Config  # noqa: E402
from brainpaint.evaluate import official_metrics, stripe_index  # noqa: E402
from brainpaint.infer.inpainter import DiffusionInpainter  # noqa: E402
from brainpaint.model.weights_path import resolve_weights  # noqa: E402
from brainpaint.stages import STAGES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "healthy-t1"
DEFAULT_VAL = REPO / "workspace" / "prepared" / "val"
PAPER_STEPS = 1000
FEW_STEPS = (1, 2, 4, 16)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", file=sys.stderr)


# --------------------------------------------------------------------------- the case
def build_case(data_root: Path, subject: str, seed: int, mask_cm3, out: Path) -> Path | None:
    """A labelled case folder from a healthy T1: a generated mask voided out, the T1 as truth."""
    import nibabel as nib

    from brainpaint.data.masks import generate_masks

    path = data_root / f"{subject}_T1w.nii.gz"
    if not path.is_file():
        loud(f"SKIPPED: {path} not found. Pass --case <BraTS case folder> or provide ../shared/data/healthy-t1/.")
        return None
    img = nib.load(str(path))
    disk = np.asanyarray(img.dataobj)
    mask = generate_masks(disk > 0, 1, seed=seed, volume_range_cm3=tuple(mask_cm3))[0]
    case_id = f"BraTS-BENCH-{int(subject.split('-')[-1]):05d}-000"
    folder = out / case_id
    folder.mkdir(parents=True)  # alone in its parent: discover_cases reads the parent
    for suffix, array, dtype in (("t1n", disk, disk.dtype), ("t1n-voided", np.where(mask, 0, disk), disk.dtype),
                                 ("mask", mask, np.uint8), ("mask-healthy", mask, np.uint8),
                                 ("mask-unhealthy", np.zeros_like(mask), np.uint8)):
        write_nifti_atomic(np.asarray(array).astype(dtype), img.header, img.affine, folder / f"{case_id}-{suffix}.nii.gz", dtype)
    return folder


BRATS_SIZE_SUBJECTS = ("Brats18_2013_11_1", "Brats18_CBICA_AME_1", "Brats18_TCIA01_378_1", "Brats18_TCIA02_606_1",
                       "Brats18_TCIA10_637_1")
DEFAULT_BRATS18 = REPO.parent / "shared" / "data" / "brats18-t1"
BRATS_SIZE_CACHE = REPO / "workspace" / "prepared_brats_size"


def build_brats_size_case(root: Path, subject: str, out: Path, total_cm3: float = 250.0, min_healthy_cm3: float = 20.0,
                          seed: int = 0) -> Path:
    """A BraTS 2023-layout case of a glioma brain: the tumour (seg > 0, grown by 2 voxels within
    the brain) and a tumour-shaped healthy mask clear of it voided, together >= `total_cm3`;
    the healthy mask is the region scored."""
    import nibabel as nib
    from scipy import ndimage

    from brainpaint.data.masks import generate_mask_details

    case_id = f"BraTS-SIZE-{subject.replace('_', '-')}"
    folder = out / case_id
    if folder.is_dir():
        return folder
    img = nib.load(str(root / subject / f"{subject}_t1.nii.gz"))
    t1 = np.asanyarray(img.dataobj)
    seg = np.asanyarray(nib.load(str(root / subject / f"{subject}_seg.nii.gz")).dataobj) > 0
    tumour = (ndimage.binary_dilation(seg, iterations=2) & (t1 > 0)) | seg
    need = max(total_cm3 - tumour.sum() / 1000.0, min_healthy_cm3)
    healthy = generate_mask_details(t1 > 0, 1, seed, avoid=tumour, volume_range_cm3=(need, need * 1.15))[0].mask
    mask = healthy | tumour
    tmp = out / f".{case_id}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for suffix, array, dtype in (("t1n", t1, t1.dtype), ("t1n-voided", np.where(mask, 0, t1), t1.dtype), ("mask", mask, np.uint8),
                                 ("mask-healthy", healthy, np.uint8), ("mask-unhealthy", tumour, np.uint8)):
        write_nifti_atomic(np.asarray(array).astype(dtype), img.header, img.affine, tmp / f"{case_id}-{suffix}.nii.gz", dtype)
    tmp.rename(folder)
    return folder


def load_folder(folder: Path) -> CaseData:
    cases, errors = discover_cases(folder.parent, labels=True)
    for err in errors:
        if err.case_id == folder.name:
            raise SystemExit(f"error: {err}")
    return load_case(next(c for c in cases if c.id == folder.name), labels=True)


def random_weights(preset: str, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    from brainpaint.config.settings import model_config_yaml
    from brainpaint.model.unet import build_unet
    from brainpaint.conditioning.layout import network_channels

    cfg = Config.from_dict({"model": {"preset": preset}, "diffusion": {"prediction": "x0"},
                            "data": {"crop_size": 128, "prior": "harmonic", "mirror": True}})
    torch.manual_seed(0)
    model = build_unet(cfg.model, *network_channels(cfg))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.02)
    path = out_dir / f"random-{preset}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"config": model_config_yaml(cfg)})
    return path


# --------------------------------------------------------------------------- the paths
def path_settings(name: str, faithful_steps: int) -> dict:
    """`infer` overrides of a named path (over the default path's settings)."""
    if name == "default":
        return {}
    if name.startswith("ddim-"):
        return {"infer.sampler": "ddim", "infer.steps": int(name[5:]), "infer.temperature": 0.0, "infer.eta": 0.0,
                "infer.ensemble": 1}
    return {"infer.sampler": "ddpm", "infer.steps": faithful_steps, "infer.batch_slices": 16, "infer.bf16": False,
            "infer.ensemble": 1, "infer.temperature": 1.0,
            "infer.smoothing_sigma": 1.075}


def quality(data: CaseData, output: np.ndarray) -> dict[str, float]:
    if data.t1n is None or data.mask_healthy is None:
        return {}
    m = official_metrics(output, data.t1n, data.voided, data.mask_healthy)
    return {"ssim": m["ssim"], "psnr": m["psnr"], "stripe": stripe_index(output.astype(np.float32), data.t1n, data.mask_healthy)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(job: dict) -> dict:
    """One path on one case, in this process: warm up, time the whole case, score it."""
    torch.set_num_threads(job["threads"])
    data = load_folder(Path(job["case"]))
    cfg = Config.load(job["parameters"]).override(
        {"infer.weights": job["weights"], "infer.device": job["device"], **path_settings(job["name"], job["faithful_steps"])}
    )
    inpainter = DiffusionInpainter(cfg)
    seed = case_seed(cfg.infer.seed, data.id)
    extrapolated = job["name"] == "ddpm-1000" and job["faithful_steps"] != PAPER_STEPS
    with torch.inference_mode():  # warm-up: allocator and kernels, one step on a few slices
        _, _, box, cond = inpainter.conditioning(data)
        inpainter.diffusion.sample(inpainter.model, torch.from_numpy(cond[:4]).to(inpainter.device), sampler="ddim",
                                   steps=1, temperature=0.0)
    sync(inpainter.device)
    start = time.perf_counter()
    prediction = inpainter(data, seed)
    sync(inpainter.device)
    seconds = time.perf_counter() - start
    output = compose_output(data, prediction)
    result = {"name": job["name"], "seconds": seconds, "rss_gb": peak_rss_gb()}
    if extrapolated:
        result["seconds"] = seconds * PAPER_STEPS / job["faithful_steps"]
        result["note"] = f"EXTRAPOLATED from {job['faithful_steps']} steps"
    else:
        result.update(quality(data, output))
    if inpainter.device.type == "cuda":
        result["gpu_peak_gb"] = torch.cuda.max_memory_allocated(inpainter.device) / 1024**3
    result["settings"] = {k: getattr(cfg.infer, k) for k in ("sampler", "steps", "temperature", "ensemble", "smoothing_sigma",
                                                              "batch_slices", "tile")}
    return result


def in_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"path {job['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(r: dict) -> str:
    q = lambda k, f: format(r[k], f) if k in r else "n/a"  # noqa: E731
    return (f"{r['name']:<12} {r['seconds']:>10.2f} {q('ssim', '.4f'):>8} {q('psnr', '.2f'):>7} {q('stripe', '.3f'):>7} "
            f"{r['rss_gb']:>8.2f}  {r.get('note', '')}")


def single_case(args, weights: Path, case: Path) -> None:
    paths = ["default"] + [f"ddim-{n}" for n in FEW_STEPS] + ([] if args.skip_faithful else ["ddpm-1000"])
    base = {"case": str(case), "weights": str(weights), "device": args.device, "threads": args.threads,
            "parameters": str(args.parameters_file) if args.parameters_file else None,
            "faithful_steps": args.faithful_steps}
    data = load_folder(case)
    print(f"case {data.id}: {int(data.mask.any(axis=(0, 1)).sum())} masked slices, {int(data.mask.sum())} mask voxels; "
          f"weights {weights}; {args.threads} threads")
    print(f"{'path':<12} {'s/volume':>10} {'ssim':>8} {'psnr':>7} {'stripe':>7} {'peakRSS':>8}", flush=True)
    results = {}
    for name in paths:
        results[name] = in_child({**base, "name": name})
        if name == "default":
            print(f"# default settings: {results[name]['settings']}")
        print(fmt(results[name]), flush=True)
    if "ddpm-1000" in results:
        d, f = results["default"], results["ddpm-1000"]
        print(f"speed ratio ddpm-1000 / default: {f['seconds'] / d['seconds']:.1f}x{' (EXTRAPOLATED)' if 'note' in f else ''}")
        if "ssim" in f:
            print(f"SSIM default - ddpm-1000: {d['ssim'] - f['ssim']:+.4f}")
    if "ssim" in results["default"]:
        print(f"SSIM default - ddim-16: {results['default']['ssim'] - results['ddim-16']['ssim']:+.4f}")


def validation(args, weights: Path) -> None:
    """1/2/4/16 DDIM steps and the default on the validation subjects (`*-000` cases), in-process."""
    if not args.val.is_dir():
        loud(f"SKIPPED: {args.val} not found (build it with `brainpaint prepare`, see README)")
        return
    cases = [c for c in discover_cases(args.val, labels=True)[0] if c.id.endswith("-000")][: args.cases]
    torch.set_num_threads(args.threads)
    rows = {}
    datas = [load_case(c, labels=True) for c in cases]
    for name in ["default"] + [f"ddim-{n}" for n in FEW_STEPS]:
        cfg = Config.load(args.parameters_file).override(
            {"infer.weights": str(weights), "infer.device": args.device, **path_settings(name, PAPER_STEPS)})
        inpainter = DiffusionInpainter(cfg)
        scores, seconds = [], []
        for data in datas:
            start = time.perf_counter()
            prediction = inpainter(data, case_seed(cfg.infer.seed, data.id))
            seconds.append(time.perf_counter() - start)
            scores.append(official_metrics(compose_output(data, prediction), data.t1n, data.voided, data.mask_healthy))
        rows[name] = {k: float(np.mean([s[k] for s in scores])) for k in ("ssim", "psnr", "mse")}
        rows[name]["median_s"] = float(np.median(seconds))
        r = rows[name]
        print(f"{name:<10} SSIM {r['ssim']:.4f}  PSNR {r['psnr']:.2f}  MSE {r['mse']:.5f}  median {r['median_s']:.2f} s/volume",
              flush=True)
    print(f"{len(datas)} validation cases; SSIM default - ddim-16: {rows['default']['ssim'] - rows['ddim-16']['ssim']:+.4f}")


def _interleaved(args, weights: Path, cases) -> list[dict]:
    """Harmonic fill then default on each case, in this process: seconds, stages, metrics."""
    from brainpaint.infer.prediction import harmonic_predictor

    torch.set_num_threads(args.threads)
    cfg = Config.load(args.parameters_file).override({"infer.weights": str(weights), "infer.device": args.device})
    inpainter = DiffusionInpainter(cfg)
    rows = []
    for case in cases:
        data = load_case(case, labels=True)
        seed = case_seed(cfg.infer.seed, data.id)
        start = time.perf_counter()
        harmonic = harmonic_predictor(data, seed)
        middle = time.perf_counter()
        prediction = inpainter(data, seed)
        end = time.perf_counter()
        row = {"id": data.id, "mask_cm3": data.mask.sum() / 1000.0, "slices": int(data.mask.any(axis=(0, 1)).sum()),
               "harmonic_s": middle - start, "default_s": end - middle, "stages": prediction.stages}
        for name, pred in (("harmonic", harmonic), ("default", prediction)):
            m = official_metrics(compose_output(data, pred), data.t1n, data.voided, data.mask_healthy)
            row[f"{name}_ssim"], row[f"{name}_psnr"] = m["ssim"], m["psnr"]
        rows.append(row)
        print(f"{row['id']:<34} {row['mask_cm3']:>6.0f} {row['slices']:>4d} {row['harmonic_s']:>7.2f} {row['default_s']:>7.2f} "
              f"{row['default_s'] / row['harmonic_s']:>6.1f}x  {row['harmonic_ssim']:.4f} {row['default_ssim']:.4f}  "
              f"{row['harmonic_psnr']:.2f} {row['default_psnr']:.2f}", flush=True)
    return rows


# The command line, saying its own peak RSS when it exits: VmHWM, the high-water mark of its own
# memory (getrusage's ru_maxrss would count the benchmark's memory, which a child inherits at exec).
PEAK_RSS_CLI = ("import atexit, re, sys; atexit.register(lambda: print('peak RSS %.3f GB' % (int(re.search("
                "r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024**2), file=sys.stderr)); "
                "sys.argv[0] = 'brainpaint'; from brainpaint.cli import main; main()")


def _batch_run(args, weights: Path, folder: Path, method: str) -> dict:
    """`brainpaint infer --profile` over `folder` in a child process: per-case seconds, the stage
    table it prints, its wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", PEAK_RSS_CLI, "infer", "--data-path", str(folder), "--output-path", out,
                   "--weights", str(weights), "--device", args.device, "--method", method, "--profile"]
        if args.parameters_file:
            command += ["--parameters-file", str(args.parameters_file)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"brainpaint infer --method {method} failed:\n{proc.stderr[-3000:]}")
    seconds = [float(m) for m in re.findall(r": ok \((\d+\.\d) s,", proc.stderr)]
    rss = float(re.findall(r"^peak RSS (\d+\.\d+) GB$", proc.stderr, re.M)[-1])
    table = [line for line in proc.stderr.splitlines() if re.match(r"(case +load|median|\S+ +\d+\.\d\d +\d+\.\d\d)", line)
             or "inpainted in" in line]
    return {"seconds": seconds, "table": table, "wall": wall, "rss_gb": rss}


def brats_size(args, weights: Path) -> None:
    """The BraTS-size benchmark (module doc): built cases plus `--cases-dir` folders."""
    if not args.brats18.is_dir():
        loud(f"SKIPPED: {args.brats18} not found (the BraTS 2018 glioma T1 scans, ../shared/data/brats18-t1)")
        return
    built = {build_brats_size_case(args.brats18, s, BRATS_SIZE_CACHE / "val", args.total_cm3).name for s in args.subjects}
    cases = [c for c in discover_cases(BRATS_SIZE_CACHE / "val", labels=True)[0] if c.id in built]
    cases += [c for folder in args.cases_dir for c in discover_cases(folder, labels=True)[0]]
    with tempfile.TemporaryDirectory() as tmp:  # every case as one folder for the batch runs
        together = Path(tmp) / "cases"
        together.mkdir()
        for case in cases:
            (together / case.id).symlink_to(case.folder.resolve())
        print(f"{len(cases)} cases; weights {weights}; {args.threads} threads")
        print(f"{'case':<34} {'cm3':>6} {'sl':>4} {'harm s':>7} {'def s':>7} {'ratio':>7}  {'SSIM h/d':<15} {'PSNR h/d'}")
        rows = _interleaved(args, weights, cases)
        stage_names = [n for n in STAGES if any(n in r["stages"].seconds for r in rows)]
        print("median stage seconds (default): " + ", ".join(
            f"{n} {np.median([r['stages'].seconds.get(n, 0.0) for r in rows]):.2f}" for n in stage_names))
        d, h = np.array([r["default_s"] for r in rows]), np.array([r["harmonic_s"] for r in rows])
        print(f"default: median {np.median(d):.2f} s, max {d.max():.2f} s per case; harmonic fill: median {np.median(h):.2f} s; "
              f"default / harmonic: {d.sum() / h.sum():.1f}x (total), {np.median(d / h):.1f}x (median per case)")
        print(f"mean SSIM default {np.mean([r['default_ssim'] for r in rows]):.4f}, harmonic {np.mean([r['harmonic_ssim'] for r in rows]):.4f}; "
              f"mean PSNR default {np.mean([r['default_psnr'] for r in rows]):.2f}, harmonic {np.mean([r['harmonic_psnr'] for r in rows]):.2f} dB")
        runs = {method: _batch_run(args, weights, together, method) for method in ("diffusion", "harmonic")}
    for method, run in runs.items():
        secs = np.array(run["seconds"])
        print(f"\nbrainpaint infer --method {method} --profile (one run, next case prepared in the background):")
        print("\n".join(run["table"]))
        print(f"per case: median {np.median(secs):.2f} s, max {secs.max():.2f} s; run wall {run['wall']:.1f} s "
              f"(start-up included); peak RSS {run['rss_gb']:.2f} GB")
    ratio = np.median(runs["diffusion"]["seconds"]) / np.median(runs["harmonic"]["seconds"])
    print(f"batch default / harmonic (median case seconds, reading and writing included): {ratio:.1f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="weights file (default: the shipped weights)")
    ap.add_argument("--random-preset", choices=("tiny", "small", "paper"), help="random weights of this preset")
    ap.add_argument("--case", type=Path, help="BraTS case folder with labels (default: built from --data-root)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--subject", default="sub-50")
    ap.add_argument("--mask-cm3", type=float, nargs=2, default=(2.0, 3.0), metavar=("LO", "HI"))
    ap.add_argument("--parameters-file", type=Path, help="YAML for the default path (infer section)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated mask")
    ap.add_argument("--faithful-steps", type=int, default=PAPER_STEPS, help="time this many ancestral steps and extrapolate")
    ap.add_argument("--skip-faithful", action="store_true")
    ap.add_argument("--validation", action="store_true", help="1/2/4/16 steps and the default on the validation subjects")
    ap.add_argument("--val", type=Path, default=DEFAULT_VAL)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--brats-size", action="store_true", help="BraTS-size glioma cases: stages, harmonic ratio, RSS")
    ap.add_argument("--brats18", type=Path, default=DEFAULT_BRATS18)
    ap.add_argument("--subjects", nargs="*", default=list(BRATS_SIZE_SUBJECTS))
    ap.add_argument("--total-cm3", type=float, default=250.0)
    ap.add_argument("--cases-dir", nargs="*", default=[], help="more labelled case folders for --brats-size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_path(json.loads(args.child))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_preset:
            weights = random_weights(args.random_preset, Path(tmp))
            loud(f"RANDOM {args.random_preset} weights: timings are real, quality numbers are meaningless")
        else:
            weights = resolve_weights(args.weights)
        if args.validation:
            validation(args, weights)
            return 0
        if args.brats_size:
            brats_size(args, weights)
            return 0
        case = args.case or build_case(args.data_root, args.subject, args.seed, args.mask_cm3, Path(tmp) / "cases")
        if case is None:
            return 0
        single_case(args, weights, case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
