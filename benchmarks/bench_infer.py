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
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainpaint.infer.batch import case_seed, compose_output
from brainpaint.io.brats import CaseData, discover_cases, load_case, write_nifti_atomic
from brainpaint.config.settings import Config
from brainpaint.evaluate import official_metrics, stripe_index
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.model.weights_path import resolve_weights

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
            "infer.ensemble": 1, "infer.repaint": False, "infer.noise_correlation": 0.0, "infer.temperature": 1.0,
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
        case = args.case or build_case(args.data_root, args.subject, args.seed, args.mask_cm3, Path(tmp) / "cases")
        if case is None:
            return 0
        single_case(args, weights, case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
