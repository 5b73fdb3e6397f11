"""Inference benchmark: paper-faithful sampling vs the default path, on the same weights and case.

Measures, in one run (so the speed ratio compares like with like on one machine):
  * faithful: ancestral DDPM, 1000 steps, slice batches of 16, fp32 (the paper's sampler);
  * default:  the configured sampler (`--parameters-file`, else the Config defaults);
  * optionally the default path with RePaint-style known-region mixing (`--repaint-compare`).
For each: seconds per volume, in-mask SSIM/PSNR from the official `inpainting` package (when
the case has a ground truth), the stripe index, and the process's peak RSS after it.

On a CPU the 1000-step path on a whole volume takes hours with a real model; `--faithful-steps`
and `--faithful-slices` time a part of it and scale the time up to 1000 steps and all slices.
Such numbers are printed as EXTRAPOLATED, and no quality is reported for that path.

Case: `--case <folder>` (BraTS layout, with `-t1n` and `-mask-healthy` for quality), else a
validation case is built from `../shared/data/healthy-t1/` (one subject plus a generated
tumour-shaped mask). Weights: `--weights`, else the shipped weights; `--random-preset tiny`
builds randomly initialised weights to check the pipeline and timings (quality meaningless).

    python benchmarks/bench_infer.py --random-preset tiny --faithful-steps 20
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brainpaint.batch import compose_output, case_seed
from brainpaint.brats_io import CaseData, discover_cases, load_case
from brainpaint.config import Config
from brainpaint.predictors.diffusion import DiffusionInpainter
from brainpaint.weights import resolve_weights

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "healthy-t1"
PAPER_STEPS = 1000
PAPER_BATCH = 16


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def loud(message: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n{message}\n{bar}", file=sys.stderr)


def build_case(data_root: Path, subject: str, seed: int, mask_cm3: tuple[float, float] = (5.0, 200.0)) -> CaseData | None:
    """A validation case from a healthy T1: a generated mask voided out, the T1 as ground truth."""
    import nibabel as nib

    from brainpaint.masks import generate_masks

    path = data_root / f"{subject}_T1w.nii.gz"
    if not path.is_file():
        loud(f"SKIPPED: {path} not found. Pass --case <BraTS case folder> or provide ../shared/data/healthy-t1/.")
        return None
    img = nib.load(str(path))
    disk = np.asanyarray(img.dataobj)
    t1 = disk.astype(np.float32)
    mask = generate_masks(t1 > 0, 1, seed=seed, volume_range_cm3=mask_cm3)[0]
    voided_disk = np.where(mask, 0, disk).astype(disk.dtype)
    return CaseData(
        id=f"bench-{subject}",
        voided=voided_disk.astype(np.float32),
        mask=mask,
        affine=np.asarray(img.affine),
        header=img.header,
        dtype=np.dtype(img.get_data_dtype()),
        t1n=t1,
        mask_healthy=mask,
        voided_disk=voided_disk,
    )


def load_case_folder(folder: Path) -> CaseData:
    cases, errors = discover_cases(folder.parent)
    for err in errors:
        if err.case_id == folder.name:
            raise SystemExit(f"error: {err}")
    case = next(c for c in cases if c.id == folder.name)
    has_labels = "t1n" in case.files and "mask_healthy" in case.files
    return load_case(case, labels=has_labels)


def random_weights(preset: str, out_dir: Path) -> Path:
    from brainpaint.config import model_config_yaml
    from brainpaint.unet import build_unet, network_channels
    from safetensors.torch import save_file

    cfg = Config.from_dict({"model": {"preset": preset}})
    torch.manual_seed(0)
    model = build_unet(cfg.model, *network_channels(cfg))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.02)
    path = out_dir / f"random-{preset}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"config": model_config_yaml(cfg)})
    return path


def quality(data: CaseData, output: np.ndarray) -> dict[str, float]:
    """Official in-mask metrics (the challenge's own code) plus the stripe index."""
    if data.t1n is None or data.mask_healthy is None:
        return {}
    from inpainting.challenge_metrics_2023 import generate_metrics

    from brainpaint.evaluate import stripe_index

    as_tensor = lambda a: torch.Tensor(np.asarray(a, dtype=np.float32)).unsqueeze(0).contiguous()
    metrics = generate_metrics(
        prediction=as_tensor(output),
        target=as_tensor(data.t1n.astype(data.dtype)),
        normalization_tensor=as_tensor(data.voided_disk),
        mask=as_tensor(data.mask_healthy).bool(),
    )
    out = {"ssim": metrics["ssim"], "psnr": metrics["psnr"]}
    try:
        out["stripe"] = float(stripe_index(output.astype(np.float32), data.t1n, data.mask_healthy))
    except Exception:  # an optional extra; never fail the benchmark over it
        pass
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_full(inpainter: DiffusionInpainter, data: CaseData, seed: int):
    sync(inpainter.device)
    start = time.perf_counter()
    prediction = inpainter(data, seed)
    sync(inpainter.device)
    return time.perf_counter() - start, compose_output(data, prediction)


def time_partial(inpainter: DiffusionInpainter, data: CaseData, seed: int, slices: int | None):
    """Sample `slices` slices with the inpainter's steps; scale to all slices and 1000 steps."""
    zs, _, _, cond = inpainter.conditioning(data)
    part = cond[: slices or len(cond)]
    batch = int(inpainter.infer.batch_slices) or len(part)
    batches_run, batches_full = -(-len(part) // batch), -(-len(cond) // batch)
    sync(inpainter.device)
    start = time.perf_counter()
    with torch.inference_mode():
        inpainter.sample_slices(part, seed, 0)
    sync(inpainter.device)
    seconds = time.perf_counter() - start
    return seconds * (PAPER_STEPS / int(inpainter.infer.steps)) * (batches_full / batches_run)


def warm_up(inpainter: DiffusionInpainter, data: CaseData) -> None:
    """One 1-step sample so one-time costs (allocator, kernels) are not timed."""
    _, _, _, cond = inpainter.conditioning(data)
    steps = inpainter.infer.steps
    inpainter.infer.steps = 1
    with torch.inference_mode():
        inpainter.sample_slices(cond[: max(1, int(inpainter.infer.batch_slices) or 1)], 0, 0)
    inpainter.infer.steps = steps


def row(name: str, seconds: float, q: dict, rss: float, note: str = "") -> str:
    ssim = f"{q['ssim']:.4f}" if "ssim" in q else "n/a"
    psnr = f"{q['psnr']:.2f}" if "psnr" in q else "n/a"
    stripe = f"{q['stripe']:.3f}" if "stripe" in q else "n/a"
    return f"{name:<26} {seconds:>12.2f} {ssim:>8} {psnr:>8} {stripe:>8} {rss:>9.2f}  {note}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="weights file (default: the shipped weights)")
    ap.add_argument("--random-preset", choices=("tiny", "small", "paper"), help="use random weights of this preset")
    ap.add_argument("--case", type=Path, help="BraTS case folder (default: built from --data-root)")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--subject", default="sub-01")
    ap.add_argument("--mask-cm3", type=float, nargs=2, default=(5.0, 200.0), metavar=("LO", "HI"),
                    help="volume range of the generated mask (a small one lets the 1000-step path run fully on a CPU)")
    ap.add_argument("--parameters-file", type=Path, help="YAML for the default path (infer section)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faithful-steps", type=int, default=PAPER_STEPS, help="time this many steps and extrapolate")
    ap.add_argument("--faithful-slices", type=int, default=0, help="time this many slices and extrapolate (0 = all)")
    ap.add_argument("--skip-faithful", action="store_true")
    ap.add_argument("--repaint-compare", action="store_true", help="also run the default path with repaint on")
    args = ap.parse_args(argv)

    data = load_case_folder(args.case) if args.case else build_case(args.data_root, args.subject, args.seed, tuple(args.mask_cm3))
    if data is None:
        return 0
    tmp = tempfile.TemporaryDirectory()
    if args.random_preset:
        weights = random_weights(args.random_preset, Path(tmp.name))
        loud(f"RANDOM {args.random_preset} weights: timings are real, quality numbers are meaningless")
    else:
        weights = resolve_weights(args.weights)

    default_cfg = Config.load(args.parameters_file).override({"infer.weights": str(weights), "infer.device": args.device})
    faithful_cfg = default_cfg.override(
        {"infer.sampler": "ddpm", "infer.steps": args.faithful_steps, "infer.batch_slices": PAPER_BATCH,
         "infer.bf16": False, "infer.ensemble": 1, "infer.repaint": False, "infer.noise_correlation": 0.0,
         "infer.temperature": 1.0, "infer.smoothing_sigma": 1.075}
    )
    seed = case_seed(args.seed, data.id)
    default = DiffusionInpainter(default_cfg)
    inf = default_cfg.infer
    n_slices = int(data.mask.any(axis=(0, 1)).sum())
    print(f"case {data.id}: grid {data.voided.shape}, {n_slices} masked slices, {int(data.mask.sum())} mask voxels")
    print(f"weights {weights} | device {default.device} | model preset {default.model_cfg.model.preset} "
          f"| data prior {default.data_cfg.prior}, crop {default.data_cfg.crop_size}")
    print(f"default path: {inf.sampler} {inf.steps} steps, eta {inf.eta}, batch {inf.batch_slices or 'all'}, "
          f"ensemble {inf.ensemble}, bf16 {inf.bf16 and default.device.type == 'cuda'}, "
          f"smoothing {inf.smoothing_sigma}, repaint {inf.repaint}, noise corr. {inf.noise_correlation}, "
          f"temperature {inf.temperature}")
    print("faithful path: ddpm 1000 ancestral steps, batch 16, fp32, one sample at temperature 1, Gaussian filter 1.075")

    print(f"{'path':<26} {'s/volume':>12} {'ssim':>8} {'psnr':>8} {'stripe':>8} {'peakRSS':>9}", flush=True)
    lines = []
    show = lambda: print(lines[-1], flush=True)
    warm_up(default, data)
    t_default, out_default = time_full(default, data, seed)
    rss_default = peak_rss_gb()
    quality_default, quality_faithful = quality(data, out_default), {}
    lines.append(row("default", t_default, quality_default, rss_default))
    if default.device.type == "cuda":
        lines[-1] += f" gpu-peak {torch.cuda.max_memory_allocated(default.device) / 1024**3:.2f} GB"
    show()

    if args.repaint_compare:
        rp = DiffusionInpainter(default_cfg.override({"infer.repaint": True}))
        t_rp, out_rp = time_full(rp, data, seed)
        lines.append(row("default + repaint", t_rp, quality(data, out_rp), peak_rss_gb()))
        show()

    t_faithful = None
    if not args.skip_faithful:
        faithful = DiffusionInpainter(faithful_cfg)
        partial = args.faithful_steps != PAPER_STEPS or (0 < args.faithful_slices < n_slices)
        if partial:
            faithful.infer.steps = args.faithful_steps
            t_faithful = time_partial(faithful, data, seed, args.faithful_slices or None)
            note = f"EXTRAPOLATED from {args.faithful_steps} steps x {args.faithful_slices or n_slices} slices"
            lines.append(row("faithful ddpm-1000 b16 fp32", t_faithful, {}, peak_rss_gb(), note))
            show()
        else:
            t_faithful, out_faithful = time_full(faithful, data, seed)
            quality_faithful = quality(data, out_faithful)
            lines.append(row("faithful ddpm-1000 b16 fp32", t_faithful, quality_faithful, peak_rss_gb()))
            show()

    if t_faithful is not None:
        label = " (faithful time EXTRAPOLATED)" if partial else ""
        print(f"speed ratio faithful/default: {t_faithful / t_default:.1f}x{label}")
        if not partial and "ssim" in quality_default and "ssim" in quality_faithful:
            gap = quality_default["ssim"] - quality_faithful["ssim"]
            print(f"SSIM default - faithful: {gap:+.4f} (target: >= -0.01)")
    print(f"peak RSS after the default path: {rss_default:.2f} GB (whole process; target <= 3 GB on CPU)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
