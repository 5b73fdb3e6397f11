"""scripts/gpu_bundle.py: brains packed for a GPU machine come back on their grid, in parts."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import synth

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bundle)


def _write_subjects(folder: Path, n: int) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    vols = []
    affine = synth.default_affine()
    affine[:3, 3] = [-20.0, 7.5, 3.0]
    for i in range(n):
        vol = np.round(synth.make_brain(seed=i, scale=1500.0)).astype(np.int16)
        vol[0, 0, 0] = 30000  # a bright outlier: clipped at the 99.9th percentile
        vol[vol.shape[0] // 2, vol.shape[1] // 2, vol.shape[2] // 2] = 1  # fainter than a quantisation step
        synth.save(vol, folder / f"sub-{i + 1:02d}_T1w.nii.gz", affine=affine, dtype=np.int16)
        vols.append(vol)
    return vols


def test_pack_and_unpack_restore_grid_affine_background_and_intensities(tmp_path):
    vols = _write_subjects(tmp_path / "raw", 4)
    n_parts = gpu_bundle.pack(tmp_path / "raw", tmp_path / "bundle", val_subjects="1", part_mib=1e-6)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    # the last subject stays behind (the validation split); a tiny part size puts one brain per part
    assert manifest["subjects"] == ["sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz", "sub-03_T1w.nii.gz"]
    assert n_parts == 3 and sorted(manifest["parts"]) == ["part1", "part2", "part3"]

    packed = tmp_path / "packed"
    packed.mkdir()
    for part in manifest["parts"]:
        for f in (tmp_path / "bundle" / part).iterdir():
            f.rename(packed / f.name)
    assert gpu_bundle.unpack(packed, tmp_path / "out", expect=3) == 3

    src = nib.load(str(tmp_path / "raw" / "sub-02_T1w.nii.gz"))
    img = nib.load(str(tmp_path / "out" / "sub-02_T1w.nii.gz"))
    got, vol = np.asarray(img.dataobj), vols[1]
    assert got.shape == vol.shape and got.dtype == np.int16
    np.testing.assert_allclose(img.affine, src.affine)
    assert np.array_equal(got == 0, vol <= 0)  # background stays background, brain stays brain
    top = np.percentile(vol[vol > 0].astype(float), 99.9)
    inside = (vol > top / 255) & (vol <= top)
    assert np.abs(got[inside].astype(float) - vol[inside]).max() <= top / 255 / 2 + 1
    centre = tuple(n // 2 for n in vol.shape)
    assert 0 < got[centre] <= top / 255 + 1  # the faint voxel is one step, not background
    assert got[0, 0, 0] == pytest.approx(top, abs=1)  # the outlier is clipped


def test_unpack_refuses_an_incomplete_set_naming_the_counts(tmp_path):
    _write_subjects(tmp_path / "raw", 2)
    gpu_bundle.pack(tmp_path / "raw", tmp_path / "bundle", val_subjects="none", part_mib=30)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_bundle.py"), "unpack", "--packed", str(tmp_path / "bundle"),
         "--out", str(tmp_path / "out"), "--manifest", str(tmp_path / "bundle" / "manifest.json")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "holds 0 packed brains, the manifest lists 2: stage every part first" in proc.stderr
