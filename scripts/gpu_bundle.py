#!/usr/bin/env python3
"""Pack training brains small enough to travel to a GPU machine, and unpack them there.

A lent GPU machine reaches nothing outside itself and receives at most 64 MiB per call, working
tree included; the 48 training brains take 110 MB as NIfTI. `pack` stores each brain's
bounding box, clipped at its 99.9th percentile (above what the intensity map keeps, which
clips at the 99.5th) and quantised to 8 bits (steps of 1/255 of that range, about 0.1 % RMS of
the scored scale), lzma-compressed: about 1.2 MB a brain. The brains are dealt into parts of
at most `--part-mib`, one part per call (`scripts/gpu_train.sh stage`); `unpack` writes them back
as int16 NIfTI files on the original grid and affine, ready for `brainpaint prepare`.

    python scripts/gpu_bundle.py pack --data ../shared/data/healthy-t1 --out .gpu
    python scripts/gpu_bundle.py unpack --packed /tmp/brainpaint-gpu/packed --out /tmp/brainpaint-gpu/raw
"""
from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import numpy as np

SUFFIX = ".brain.npz"


def pack_volume(path: Path) -> dict:
    """The arrays of one packed brain (see module doc)."""
    import nibabel as nib

    img = nib.load(str(path))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    if vol.ndim != 3:
        raise SystemExit(f"error: {path.name}: expected a 3D volume, got shape {vol.shape}")
    brain = vol > 0
    if not brain.any():
        raise SystemExit(f"error: {path.name}: no voxel above zero")
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    top = float(np.percentile(box[box > 0], 99.9))
    q = np.round(np.clip(box, 0, top) / top * 255).astype(np.uint8)
    q[(box > 0) & (q == 0)] = 1  # the faintest brain voxels stay brain (zero is background)
    return {
        "data": np.frombuffer(lzma.compress(q.tobytes(), preset=9), dtype=np.uint8),
        "box_shape": np.array(q.shape, np.int64),
        "box_start": lo.astype(np.int64),
        "shape": np.array(vol.shape, np.int64),
        "affine": np.asarray(img.affine, np.float64),
        "top": np.float64(top),
    }


def unpack_volume(arrays) -> tuple[np.ndarray, np.ndarray]:
    """(int16 volume on the original grid, affine) of one packed brain."""
    q = np.frombuffer(lzma.decompress(arrays["data"].tobytes()), dtype=np.uint8).reshape(tuple(arrays["box_shape"]))
    vol = np.zeros(tuple(arrays["shape"]), np.int16)
    lo = arrays["box_start"]
    vol[lo[0]:lo[0] + q.shape[0], lo[1]:lo[1] + q.shape[1], lo[2]:lo[2] + q.shape[2]] = np.round(
        q.astype(np.float64) * float(arrays["top"]) / 255
    ).astype(np.int16)
    return vol, arrays["affine"]


def pack(data: Path, out: Path, val_subjects: str, part_mib: float) -> int:
    """Pack the training subjects of `prepare`'s split (`val_subjects` as `prepare` reads it)."""
    from brainpaint.errors import ConfigError
    from brainpaint.data.prepare import find_subjects, split_subjects

    found = find_subjects(data)
    if not found:
        raise SystemExit(f"error: no NIfTI files in {data}")
    try:
        val = split_subjects(found, val_subjects)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    train = [s.path for s in found if s.name not in val]
    if not train:
        raise SystemExit(f"error: {len(found)} subjects in {data}, all of them held out for validation")
    out.mkdir(parents=True, exist_ok=True)
    part, used, parts = 1, 0, {}
    for path in train:
        name = path.name.split(".nii")[0]
        arrays = pack_volume(path)
        size = sum(a.nbytes for a in arrays.values())
        if used and used + size > part_mib * 2**20:
            part, used = part + 1, 0
        folder = out / f"part{part}"
        folder.mkdir(exist_ok=True)
        np.savez(folder / f"{name}{SUFFIX}", **arrays)
        used += size
        parts.setdefault(f"part{part}", []).append(name)
        print(f"{name}: {size / 1e6:.2f} MB -> part{part}", flush=True)
    manifest = {"source": str(data), "subjects": [p.name for p in train], "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for key, names in parts.items():
        mib = sum(f.stat().st_size for f in (out / key).iterdir()) / 2**20
        print(f"{key}: {len(names)} brains, {mib:.1f} MiB")
    return len(parts)


def unpack(packed: Path, out: Path, expect: int | None) -> int:
    import nibabel as nib

    files = sorted(packed.glob(f"*{SUFFIX}"))
    if expect is not None and len(files) != expect:
        raise SystemExit(f"error: {packed} holds {len(files)} packed brains, the manifest lists {expect}: stage every part first")
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        with np.load(path) as arrays:
            vol, affine = unpack_volume(arrays)
        name = path.name[: -len(SUFFIX)]
        nib.save(nib.Nifti1Image(vol, affine), str(out / f"{name}.nii.gz"))
    print(f"unpacked {len(files)} brains into {out}")
    return len(files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--val-subjects", default="", help="held-out subjects as `brainpaint prepare --val-subjects` reads them; they stay behind")
    p.add_argument("--part-mib", type=float, default=30.0)
    u = sub.add_parser("unpack")
    u.add_argument("--packed", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--manifest", type=Path, default=None, help="check that every brain it lists is there")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.data, args.out, args.val_subjects, args.part_mib)
    else:
        expect = len(json.loads(args.manifest.read_text())["subjects"]) if args.manifest else None
        unpack(args.packed, args.out, expect)
    return 0


if __name__ == "__main__":
    sys.exit(main())
