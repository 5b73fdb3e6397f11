"""Samples/s of the training data loader alone (no network), on real-size volumes.

Uses a BraTS-layout folder given with --data; without it, builds a few cases from the healthy
T1 collection (../shared/data/healthy-t1, via `brainpaint prepare`) in a temporary folder.
When neither is available it says so loudly and exits without measuring.

Reported: index time (reading the masks), cost of decoding one (volume, mask) with its
inputs (the part the per-worker cache saves), then samples/s of the DataLoader over the
endless TrainStream for each worker count, after a warm-up batch.

    python benchmarks/bench_loader.py --subjects 4 --workers 0 2 --batches 30
    python benchmarks/bench_loader.py --data /path/to/BraTS/train --crop-size 64 --prior harmonic
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HEALTHY = Path(__file__).resolve().parents[2] / "shared" / "data" / "healthy-t1"


def build_cases(subjects: int, work: Path) -> Path | None:
    from brainpaint.data.prepare import run_prepare

    files = sorted(HEALTHY.glob("sub-*_T1w.nii.gz"))[:subjects] if HEALTHY.is_dir() else []
    if not files:
        return None
    src = work / "t1"
    src.mkdir()
    for f in files:
        (src / f.name).symlink_to(f)
    if run_prepare(src, work / "cases", masks_per_subject=1, val_subjects="none", seed=0) != 0:
        raise SystemExit("preparing cases from the healthy T1s failed")
    return work / "cases" / "train"


def measure(data: Path, args) -> None:
    import torch
    from torch.utils.data import DataLoader

    from brainpaint.config.settings import Config
    from brainpaint.data.slices import SliceDataset
    from brainpaint.data.stream import TrainStream

    cfg = Config.from_dict(
        {
            "model": {"context_slices": args.context},
            "data": {"crop_size": args.crop_size, "prior": args.prior, "cache_volumes": args.cache},
        }
    )
    t0 = time.perf_counter()
    ds = SliceDataset(data, cfg)
    t_index = time.perf_counter() - t0
    print(f"data: {data} -- {len(ds.cases)} cases, {len(ds)} slices; index built in {t_index:.2f} s")
    for err in ds.errors:
        print(f"  rejected: {err}")

    t0 = time.perf_counter()
    ds.prepared(0)
    t_decode = time.perf_counter() - t0
    print(f"decode of one volume + mask (prior={args.prior}): {t_decode:.2f} s (cached per worker afterwards)")

    print(f"{'workers':>7} {'batch':>5} {'samples/s':>10} {'batches/s':>10}")
    for workers in args.workers:
        loader = DataLoader(
            TrainStream(SliceDataset(data, cfg), seed=0),
            batch_size=args.batch,
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        next(it)  # warm-up: workers start, first volumes decode
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        seconds = time.perf_counter() - t0
        assert batch["x0"].shape[0] == args.batch
        print(f"{workers:7d} {args.batch:5d} {args.batches * args.batch / seconds:10.1f} {args.batches / seconds:10.2f}")
        del it, loader
    print(f"(torch threads: {torch.get_num_threads()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="BraTS-layout training folder (default: build from healthy T1s)")
    parser.add_argument("--subjects", type=int, default=4, help="healthy T1s to build cases from")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--crop-size", type=int, default=None)
    parser.add_argument("--prior", default="none", choices=["none", "harmonic"])
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--cache", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        data = args.data or build_cases(args.subjects, Path(tmp))
        if data is None:
            print("=" * 72)
            print(f"SKIPPED: no --data given and no healthy T1 volumes at {HEALTHY}")
            print("=" * 72)
            sys.exit(0)
        measure(data, args)


if __name__ == "__main__":
    main()
