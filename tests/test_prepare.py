"""Data-set builder: conforming to the BraTS grid, layout, split, manifest, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

import synth
from brainpaint.data import masks
from brainpaint.data import prepare
from brainpaint.cli import app

GRID = (240, 240, 155)
RANGE = (1.0, 5.0)  # cm³; small masks keep the test quick


def _oblique_affine() -> np.ndarray:
    """Non-RAS (axes permuted and flipped), anisotropic 2.0/2.5/3.0 mm voxels, slightly rotated."""
    perm = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # -> P I R order
    angle = np.deg2rad(4.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ perm @ np.diag([2.0, 2.5, 3.0])
    aff[:3, 3] = [-30.0, 50.0, 20.0]
    return aff


def _world_centroid(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(data > 0)
    return (affine[:3, :3] @ idx.mean(axis=0)) + affine[:3, 3]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = root / "in"
    src.mkdir()
    # sub-01: already RAS 1 mm, but on a small grid (needs padding only).
    on_grid = np.round(synth.make_brain((60, 70, 50), seed=1)).astype(np.int16)
    aff1 = np.eye(4)
    aff1[:3, 3] = [-30.0, -35.0, -20.0]
    synth.save(on_grid, src / "sub-01_T1w.nii.gz", affine=aff1, dtype=np.int16)
    # sub-02: non-RAS, anisotropic, oblique, float intensities.
    oblique = synth.make_brain((36, 24, 30), seed=2)
    synth.save(oblique, src / "sub-02_T1w.nii.gz", affine=_oblique_affine(), dtype=np.float32)
    # sub-03: a truncated gzip stream.
    good = (src / "sub-01_T1w.nii.gz").read_bytes()
    (src / "sub-03_T1w.nii.gz").write_bytes(good[: len(good) // 2])
    (src / "notes.txt").write_text("not an image")
    out = root / "out"
    code = prepare.run_prepare(src, out, masks_per_subject=2, val_subjects="sub-02", seed=5, volume_range_cm3=RANGE)
    return {"src": src, "out": out, "code": code, "on_grid": on_grid, "aff1": aff1, "oblique": oblique}


def _load(path: Path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


@pytest.mark.slow
def test_exit_code_and_failure_recorded(built):
    assert built["code"] == 1  # sub-03 failed
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    assert [f["source"] for f in manifest["failed"]] == ["sub-03_T1w.nii.gz"]
    assert "\n" not in manifest["failed"][0]["error"]
    assert "cannot read NIfTI" in manifest["failed"][0]["error"]


def test_error_line_printed(tmp_path, capfd):
    (tmp_path / "sub-07_T1w.nii.gz").write_bytes(b"\x1f\x8b garbage")
    code = prepare.run_prepare(tmp_path, tmp_path / "out", val_subjects="none")
    err_lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("error:")]
    assert code == 1
    assert len(err_lines) == 1 and "sub-07_T1w.nii.gz" in err_lines[0]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name != "manifest.json"]


def test_layout_split_and_no_leftovers(built):
    out = built["out"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["BraTS-SYN-00001-000", "BraTS-SYN-00001-001"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["BraTS-SYN-00002-000", "BraTS-SYN-00002-001"]
    for case in [*(out / "train").iterdir(), *(out / "val").iterdir()]:
        cid = case.name
        names = sorted(p.name for p in case.iterdir())
        suffixes = ["mask-healthy", "mask-unhealthy", "mask", "t1n-voided", "t1n"]
        assert names == sorted(f"{cid}-{s}.nii.gz" for s in suffixes)
    assert not [p for p in out.rglob(".*")]  # no temporary files or folders


@pytest.mark.slow
def test_case_contents(built):
    for case in [*(built["out"] / "train").iterdir(), *(built["out"] / "val").iterdir()]:
        cid = case.name
        t1_img, t1 = _load(case / f"{cid}-t1n.nii.gz")
        v_img, voided = _load(case / f"{cid}-t1n-voided.nii.gz")
        _, mask = _load(case / f"{cid}-mask.nii.gz")
        _, healthy = _load(case / f"{cid}-mask-healthy.nii.gz")
        _, unhealthy = _load(case / f"{cid}-mask-unhealthy.nii.gz")
        assert t1.shape == GRID and t1.dtype == np.int16 and voided.dtype == np.int16
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        np.testing.assert_array_equal(mask, healthy)
        assert not unhealthy.any()
        np.testing.assert_array_equal(voided, np.where(mask > 0, 0, t1))
        assert (t1[mask > 0] > 0).mean() > 0.95  # the mask lies in tissue
        np.testing.assert_allclose(t1_img.affine[:3, :3], np.eye(3), atol=1e-6)  # RAS, 1 mm
        np.testing.assert_allclose(v_img.affine, t1_img.affine)


def test_on_grid_input_keeps_voxels_and_position(built):
    img, t1 = _load(built["out"] / "train" / "BraTS-SYN-00001-000" / "BraTS-SYN-00001-000-t1n.nii.gz")
    start = np.rint(np.linalg.inv(built["aff1"]) @ img.affine[:, 3])[:3].astype(int)
    src = built["on_grid"]
    # Output voxel j is input voxel j + start; every input voxel lands on the grid exactly.
    window = t1[-start[0]: -start[0] + 60, -start[1]: -start[1] + 70, -start[2]: -start[2] + 50]
    np.testing.assert_array_equal(window, src)
    assert t1.sum(dtype=np.int64) == src.sum(dtype=np.int64)
    # The brain is centred on the grid (within a voxel).
    idx = np.argwhere(t1 > 0)
    centre = (idx.min(axis=0) + idx.max(axis=0) + 1) / 2.0
    assert np.all(np.abs(centre - np.array(GRID) / 2.0) <= 1.0)


def test_resampled_input_keeps_world_position_and_intensity(built):
    img, t1 = _load(built["out"] / "val" / "BraTS-SYN-00002-000" / "BraTS-SYN-00002-000-t1n.nii.gz")
    src = built["oblique"]
    expected = _world_centroid(src, _oblique_affine())
    assert np.linalg.norm(_world_centroid(t1, img.affine) - expected) < 1.5  # mm
    # Linear resampling preserves the intensity integral (15 mm³ voxels -> 1 mm³ voxels).
    assert t1.sum(dtype=np.int64) == pytest.approx(src.sum(dtype=np.float64) * 15.0, rel=0.03)
    # Float intensities (max ~ 1000) keep their scale.
    assert 0.9 * src.max() <= t1.max() <= src.max() + 0.5


def test_manifest_records_cases(built):
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    assert manifest["val_subjects"] == ["sub-02"] and manifest["seed"] == 5
    by_id = {c["id"]: c for c in manifest["cases"]}
    assert sorted(by_id) == [f"BraTS-SYN-0000{s}-00{k}" for s in (1, 2) for k in (0, 1)]
    for cid, case in by_id.items():
        split = "val" if case["subject"] == "sub-02" else "train"
        assert case["split"] == split
        assert case["source"] == f"{case['subject']}_T1w.nii.gz"
        assert case["seed"] == prepare.subject_seed(5, int(case["subject"][-2:]))
        _, mask = _load(built["out"] / split / cid / f"{cid}-mask.nii.gz")
        assert case["mask_volume_cm3"] == pytest.approx(mask.sum() / 1000.0, abs=1e-3)
        assert RANGE[0] <= case["mask_volume_cm3"] <= RANGE[1]
    assert by_id["BraTS-SYN-00002-000"]["resampled"] is True
    assert by_id["BraTS-SYN-00001-000"]["resampled"] is False


def test_manifest_seed_reproduces_mask(built):
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["id"] == "BraTS-SYN-00001-001")
    folder = built["out"] / "train" / case["id"]
    _, t1 = _load(folder / f"{case['id']}-t1n.nii.gz")
    _, mask = _load(folder / f"{case['id']}-mask.nii.gz")
    from scipy import ndimage

    again = masks.generate_masks(ndimage.binary_fill_holes(t1 > 0), 2, case["seed"], volume_range_cm3=RANGE)[1]
    np.testing.assert_array_equal(again, mask > 0)


def _subjects(names):
    return [prepare.Subject(n, Path(f"{n}_T1w.nii.gz"), i + 1) for i, n in enumerate(names)]


def test_split_rules():
    subjects = _subjects([f"sub-{i:02d}" for i in range(1, 57)])
    assert prepare.split_subjects(subjects, "") == {f"sub-{i}" for i in range(49, 57)}
    assert prepare.split_subjects(subjects, "2") == {"sub-55", "sub-56"}
    assert prepare.split_subjects(subjects, "none") == set()
    assert prepare.split_subjects(subjects, "sub-03, sub-10_T1w") == {"sub-03", "sub-10"}
    with pytest.raises(ValueError, match="sub-99"):
        prepare.split_subjects(subjects, "sub-03,sub-99")
    assert prepare.split_subjects(_subjects(["a", "b"]), "") == {"b"}


def test_subject_numbers(tmp_path):
    for name in ["sub-9_T1w.nii.gz", "sub-10_T1w.nii", "sub-49_T1w.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    found = prepare.find_subjects(tmp_path)
    assert [(s.name, s.number) for s in found] == [("sub-9", 9), ("sub-10", 10), ("sub-49", 49)]
    assert prepare.case_id(49, 3) == "BraTS-SYN-00049-003"
    (tmp_path / "sub-009_T1w.nii.gz").write_bytes(b"")  # 9 twice: fall back to positions
    assert [s.number for s in prepare.find_subjects(tmp_path)] == [1, 2, 3, 4]


def test_cli_rejects_unknown_val_subject(tmp_path):
    (tmp_path / "sub-01_T1w.nii.gz").write_bytes(b"")
    result = CliRunner().invoke(
        app, ["prepare", "--input-path", str(tmp_path), "--output-path", str(tmp_path / "o"), "--val-subjects", "sub-5"]
    )
    assert result.exit_code == 2
    assert "sub-5" in result.output and not (tmp_path / "o").exists()


def test_placement_is_a_checked_setting_recorded_in_the_manifest(tmp_path):
    (tmp_path / "src").mkdir()
    synth.save(synth.make_brain(synth.SMALL_SHAPE, seed=1), tmp_path / "src" / "sub-01_T1w.nii.gz", dtype=np.int16)
    result = CliRunner().invoke(
        app, ["prepare", "--input-path", str(tmp_path / "src"), "--output-path", str(tmp_path / "o"), "--placement", "edge"]
    )
    assert result.exit_code == 2 and "prepare.placement" in result.output and not (tmp_path / "o").exists()
    code = prepare.run_prepare(
        tmp_path / "src", tmp_path / "u", val_subjects="none", volume_range_cm3=RANGE, placement="uniform"
    )
    assert code == 0
    assert json.loads((tmp_path / "u" / "manifest.json").read_text())["placement"] == "uniform"


# --------------------------------------------------------------------------- tumour brains
def _tumour_brain(folder: Path, name: str, seed: int, lps: bool = True) -> np.ndarray:
    """`<folder>/<name>/<name>_t1.nii.gz` and `_seg.nii.gz` on the BraTS grid (stored LPS like BraTS)."""
    brain = np.zeros(GRID, np.float32)
    brain[60:180, 50:190, 20:130] = 800.0 + 50.0 * np.random.default_rng(seed).random((120, 140, 110))
    seg = np.zeros(GRID, np.uint8)
    seg[70:95, 70:100, 40:70] = 2  # an oedema block with a core
    seg[78:88, 80:90, 50:60] = 4
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if lps else np.eye(4)
    (folder / name).mkdir(parents=True)
    synth.save(brain, folder / name / f"{name}_t1.nii.gz", affine=affine, dtype=np.int16)
    synth.save(seg, folder / name / f"{name}_seg.nii.gz", affine=affine, dtype=np.uint8)
    return seg


def test_tumour_brains_become_brats_2023_cases(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    seg = _tumour_brain(src, "Brats18_2013_7_1", 0)
    _tumour_brain(src, "Brats18_TCIA01_9_1", 1)
    code = prepare.run_prepare(src, out, val_subjects="Brats18_TCIA01_9_1", image_suffix="_t1", lesion_suffix="_seg",
                               lesion_margin=2, volume_range_cm3=(2.0, 8.0))
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["subject"]: c["split"] for c in manifest["cases"]} == {"Brats18_2013_7_1": "train", "Brats18_TCIA01_9_1": "val"}
    cid = next(c["id"] for c in manifest["cases"] if c["split"] == "train")
    assert cid.startswith("BraTS-GLI-")  # never clashes with the healthy BraTS-SYN cases
    read = {role: nib.load(str(out / "train" / cid / f"{cid}-{suffix}")) for role, suffix in (
        ("t1n", "t1n.nii.gz"), ("voided", "t1n-voided.nii.gz"), ("mask", "mask.nii.gz"),
        ("healthy", "mask-healthy.nii.gz"), ("unhealthy", "mask-unhealthy.nii.gz"))}
    # The case keeps the input's grid and its LPS storage.
    assert nib.aff2axcodes(read["t1n"].affine) == ("L", "P", "S") and read["t1n"].shape == GRID
    arrays = {role: np.asarray(img.dataobj) for role, img in read.items()}
    tumour, healthy, union = (arrays[r].astype(bool) for r in ("unhealthy", "healthy", "mask"))
    np.testing.assert_array_equal(tumour, ndimage.binary_dilation(seg > 0, iterations=2))  # the grown tumour
    assert healthy.any() and not (healthy & ndimage.binary_dilation(tumour, iterations=2)).any()  # clear of it
    np.testing.assert_array_equal(union, healthy | tumour)
    assert not arrays["voided"][union].any()
    np.testing.assert_array_equal(arrays["voided"][~union], arrays["t1n"][~union])


def test_a_tumour_brain_without_its_lesion_file_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "in"
    _tumour_brain(src, "Brats18_2013_7_1", 0)
    (src / "Brats18_2013_7_1" / "Brats18_2013_7_1_seg.nii.gz").unlink()
    code = prepare.run_prepare(src, tmp_path / "out", image_suffix="_t1", lesion_suffix="_seg")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Brats18_2013_7_1_t1.nii.gz" in err[0] and "_seg" in err[0]
    assert not (tmp_path / "out").exists()
