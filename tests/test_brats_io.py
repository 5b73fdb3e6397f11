"""Data contract: discovery, validation of every kind of bad input, atomic NIfTI writing."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

import synth
from brainpaint.errors import CaseError
from brainpaint.io.brats import cast_to_dtype, discover_cases, from_ras, load_case, prediction_name, to_ras, write_nifti_atomic

CID = "BraTS-GLI-00001-000"


def _load_one(root, labels=False):
    cases, errors = discover_cases(root, labels=labels)
    assert not errors, errors
    return load_case(cases[0], labels=labels)


def _error(root, labels=False) -> str:
    """The one-line message of the single failing case under `root`."""
    cases, errors = discover_cases(root, labels=labels)
    if errors:
        assert len(errors) == 1 and not cases
        message = str(errors[0])
    else:
        with pytest.raises(CaseError) as info:
            load_case(cases[0], labels=labels)
        message = str(info.value)
    assert "\n" not in message
    return message


def test_case_error_is_one_line_naming_the_case():
    err = CaseError("case-7", "something\nbroke   here")
    assert str(err) == "case-7: something broke here"
    assert err.case_id == "case-7"


def test_prediction_name():
    assert prediction_name(CID) == f"{CID}-t1n-inference.nii.gz"


def test_discover_sorted_any_id_and_bad_folders_do_not_hide_good_ones(tmp_path):
    synth.write_case(tmp_path, "zeta", labels=False)
    synth.write_case(tmp_path, "alpha", labels=True)
    bad = synth.write_case(tmp_path, "mid", labels=False)
    (bad / "mid-mask.nii.gz").unlink()
    (tmp_path / "README.txt").write_text("not a case")
    cases, errors = discover_cases(tmp_path)
    assert [c.id for c in cases] == ["alpha", "zeta"]
    assert set(cases[0].files) == {"voided", "mask", "t1n", "mask_healthy", "mask_unhealthy"}
    assert set(cases[1].files) == {"voided", "mask"}
    assert [str(e) for e in errors] == ["mid: missing file mid-mask.nii.gz"]


def test_labels_required_for_training_and_evaluation(tmp_path):
    synth.write_case(tmp_path, CID, labels=False)
    assert discover_cases(tmp_path, labels=False)[0]
    msg = _error(tmp_path, labels=True)
    assert msg == f"{CID}: missing file {CID}-t1n.nii.gz, {CID}-mask-healthy.nii.gz"


def test_missing_voided(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    (folder / f"{CID}-t1n-voided.nii.gz").unlink()
    assert _error(tmp_path) == f"{CID}: missing file {CID}-t1n-voided.nii.gz"


def test_extra_file(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    (folder / f"{CID}-t2w.nii.gz").write_bytes(b"")
    msg = _error(tmp_path)
    assert msg.startswith(f"{CID}: unexpected file '{CID}-t2w.nii.gz'")


def test_misnamed_file_from_another_case(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    other = "BraTS-GLI-00002-000"
    (folder / f"{CID}-mask.nii.gz").rename(folder / f"{other}-mask.nii.gz")
    msg = _error(tmp_path)
    assert msg.startswith(f"{CID}: unexpected file '{other}-mask.nii.gz'")


def test_uncompressed_nii_is_misnamed(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    img = nib.load(str(folder / f"{CID}-mask.nii.gz"))
    nib.save(img, str(folder / f"{CID}-mask.nii"))
    (folder / f"{CID}-mask.nii.gz").unlink()
    assert f"unexpected file '{CID}-mask.nii'" in _error(tmp_path)


def test_load_good_case(tmp_path):
    synth.write_case(tmp_path, CID, labels=True, dtype=np.int16)
    data = _load_one(tmp_path, labels=True)
    assert data.id == CID
    assert data.voided.dtype == np.float32 and data.voided.shape == synth.SMALL_SHAPE
    assert data.mask.dtype == np.bool_ and data.mask.sum() == synth.make_mask().sum()
    assert data.dtype == np.int16 and data.voided_disk.dtype == np.int16
    np.testing.assert_array_equal(data.affine, synth.default_affine())
    expected = np.round(synth.make_brain())
    np.testing.assert_array_equal(data.t1n, expected)
    np.testing.assert_array_equal(data.voided, expected * (1 - synth.make_mask()))
    np.testing.assert_array_equal(data.mask_healthy, synth.make_mask().astype(bool))


def test_shape_mismatch(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    synth.save(np.zeros((48, 48, 21), np.uint8), folder / f"{CID}-mask.nii.gz", dtype=np.uint8)
    msg = _error(tmp_path)
    assert msg == f"{CID}: shape mismatch: {CID}-mask.nii.gz (48, 48, 21) vs {CID}-t1n-voided.nii.gz (48, 48, 20)"


def test_label_shape_mismatch(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=True)
    synth.save(np.zeros((40, 48, 20), np.int16), folder / f"{CID}-t1n.nii.gz", dtype=np.int16)
    assert "shape mismatch" in _error(tmp_path, labels=True)


def test_mask_not_binary(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    mask = synth.make_mask() * 2
    synth.save(mask, folder / f"{CID}-mask.nii.gz", dtype=np.uint8)
    assert _error(tmp_path) == f"{CID}: {CID}-mask.nii.gz is not binary (values other than 0/1: 2)"


def test_empty_mask(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    synth.save(np.zeros(synth.SMALL_SHAPE), folder / f"{CID}-mask.nii.gz", dtype=np.uint8)
    assert _error(tmp_path) == f"{CID}: {CID}-mask.nii.gz is empty"


def test_a_mask_over_the_whole_volume_is_an_error(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    synth.save(np.ones(synth.SMALL_SHAPE), folder / f"{CID}-mask.nii.gz", dtype=np.uint8)
    assert _error(tmp_path) == f"{CID}: {CID}-mask.nii.gz covers the whole volume: there is no known tissue to fill from"


def test_empty_healthy_mask(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=True)
    synth.save(np.zeros(synth.SMALL_SHAPE), folder / f"{CID}-mask-healthy.nii.gz", dtype=np.uint8)
    assert _error(tmp_path, labels=True) == f"{CID}: {CID}-mask-healthy.nii.gz is empty"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_voxels(tmp_path, bad):
    folder = synth.write_case(tmp_path, CID, labels=False, dtype=np.float32)
    vol = synth.make_brain()
    vol[3, 4, 5] = bad
    vol[6, 7, 8] = bad
    synth.save(vol, folder / f"{CID}-t1n-voided.nii.gz", dtype=np.float32)
    assert _error(tmp_path) == f"{CID}: {CID}-t1n-voided.nii.gz has 2 NaN/Inf voxels"


def test_nan_in_ground_truth(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=True, dtype=np.float32)
    vol = synth.make_brain()
    vol[10, 10, 10] = np.nan
    synth.save(vol, folder / f"{CID}-t1n.nii.gz", dtype=np.float32)
    assert _error(tmp_path, labels=True) == f"{CID}: {CID}-t1n.nii.gz has 1 NaN/Inf voxels"


def test_truncated_gzip(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    path = folder / f"{CID}-t1n-voided.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    msg = _error(tmp_path)
    assert msg.startswith(f"{CID}: cannot read {CID}-t1n-voided.nii.gz:")


def test_corrupt_gzip(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    path = folder / f"{CID}-mask.nii.gz"
    blob = bytearray(path.read_bytes())
    blob[20:200] = os.urandom(180)
    path.write_bytes(bytes(blob))
    assert _error(tmp_path).startswith(f"{CID}: cannot read {CID}-mask.nii.gz:")


def test_not_a_nifti(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    (folder / f"{CID}-mask.nii.gz").write_bytes(gzip.compress(b"hello, not an image"))
    assert _error(tmp_path).startswith(f"{CID}: cannot read {CID}-mask.nii.gz:")


def test_4d_image(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    vol = np.stack([synth.make_brain()] * 2, axis=-1)
    synth.save(vol, folder / f"{CID}-t1n-voided.nii.gz", dtype=np.int16)
    assert _error(tmp_path) == f"{CID}: {CID}-t1n-voided.nii.gz is 4D with shape (48, 48, 20, 2); expected a 3D image"


def test_non_1mm_spacing_warns_and_proceeds(tmp_path, capsys):
    aff = np.diag([1.2, 1.2, 2.0, 1.0])
    synth.write_case(tmp_path, CID, labels=False, affine=aff)
    data = _load_one(tmp_path)
    assert data.voided.shape == synth.SMALL_SHAPE
    err = capsys.readouterr().err
    assert f"warning: {CID}: {CID}-t1n-voided.nii.gz has voxel spacing (1.2, 1.2, 2) mm, not 1 mm" in err


def test_1mm_spacing_is_silent(tmp_path, capsys):
    synth.write_case(tmp_path, CID, labels=False)
    _load_one(tmp_path)
    assert capsys.readouterr().err == ""


def test_absurd_spacing_is_an_error(tmp_path):
    synth.write_case(tmp_path, CID, labels=False, affine=np.diag([1.0, 1.0, 50.0, 1.0]))
    assert "impossible voxel spacing" in _error(tmp_path)


def test_affine_mismatch(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    aff = synth.default_affine()
    aff[0, 3] += 0.5
    synth.save(synth.make_mask(), folder / f"{CID}-mask.nii.gz", affine=aff, dtype=np.uint8)
    assert _error(tmp_path) == f"{CID}: affine mismatch: {CID}-mask.nii.gz differs from {CID}-t1n-voided.nii.gz by up to 0.5"


def test_affine_within_tolerance_is_accepted(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    aff = synth.default_affine()
    aff[0, 3] += 5e-5
    synth.save(synth.make_mask(), folder / f"{CID}-mask.nii.gz", affine=aff, dtype=np.uint8)
    assert _load_one(tmp_path).mask.any()


def test_scaled_voided_is_rejected(tmp_path):
    folder = synth.write_case(tmp_path, CID, labels=False)
    img = nib.Nifti1Image(np.round(synth.make_brain()).astype(np.int16), synth.default_affine())
    img.header.set_slope_inter(2.0, 0.0)
    nib.save(img, str(folder / f"{CID}-t1n-voided.nii.gz"))
    assert "intensity scaling" in _error(tmp_path)


# --------------------------------------------------------------------------- writing
def test_cast_to_dtype_rounds_and_clips():
    values = np.array([-1e6, -2.5, -0.4, 0.6, 1.5, 40000.0], dtype=np.float32)
    np.testing.assert_array_equal(cast_to_dtype(values, np.int16), [-32768, -2, 0, 1, 2, 32767])
    np.testing.assert_array_equal(cast_to_dtype(values, np.uint8), [0, 0, 0, 1, 2, 255])
    assert cast_to_dtype(np.array([1e300]), np.float32)[0] == np.finfo(np.float32).max


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_write_nifti_atomic_round_trip(tmp_path, dtype):
    synth.write_case(tmp_path / "in", CID, labels=False, dtype=dtype)
    data = _load_one(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    array = data.voided_disk.copy()
    array[0, 0, 0] = 7
    path = write_nifti_atomic(array, data.header, data.affine, out / prediction_name(CID), data.dtype)
    assert sorted(p.name for p in out.iterdir()) == [prediction_name(CID)]
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), array)
    assert np.asanyarray(img.dataobj).dtype == np.dtype(dtype)
    np.testing.assert_allclose(img.affine, data.affine, atol=1e-6)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(data.affine)
    with gzip.open(path) as fh:  # really gzip-compressed
        fh.read(10)


def test_write_nifti_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    synth.write_case(tmp_path / "in", CID, labels=False)
    data = _load_one(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_nifti_atomic(data.voided, data.header, data.affine, out / prediction_name(CID), np.int16)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("affine", [np.diag([-1.0, -1.0, 1.0, 1.0]), np.array([[0, 0, -1, 9], [1, 0, 0, 0], [0, -1, 0, 7], [0, 0, 0, 1.0]])])
def test_volumes_turn_to_ras_axes_and_back(affine):
    rng = np.random.default_rng(0)
    volume = rng.random((6, 7, 8)).astype(np.float32)
    ras = to_ras(volume, affine)
    assert ras.shape == ((6, 7, 8) if affine[0, 0] else (8, 6, 7))  # R, A, S from array axes 2, 0, 1
    np.testing.assert_array_equal(from_ras(ras, affine), volume)
    # an LPS volume's anterior end is its array's low y end: a RAS volume's high y end lands there
    if np.allclose(affine, np.diag([-1.0, -1.0, 1.0, 1.0])):
        ramp = np.broadcast_to(np.arange(7, dtype=np.float32)[None, :, None], (6, 7, 8))
        assert from_ras(ramp, affine)[0, 0, 0] == 6 and from_ras(ramp, affine)[0, 6, 0] == 0


def test_a_case_in_ras_axes_keeps_every_voxel_and_its_world_position(tmp_path):
    synth.write_case(tmp_path, CID, labels=True)  # stored LPS, as BraTS stores its files
    data = _load_one(tmp_path, labels=True)
    ras = data.in_ras()
    assert nib.aff2axcodes(data.affine) == ("L", "P", "S") and nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    for name in ("voided", "mask", "t1n", "mask_healthy", "voided_disk"):
        before, after = getattr(data, name), getattr(ras, name)
        np.testing.assert_array_equal(after, before[::-1, ::-1, :])
        np.testing.assert_array_equal(from_ras(after, data.affine), before)
        assert after.dtype == before.dtype
    # voxel (i, j, k) of the turned grid is at the world position of the stored voxel it came from
    i, j, k = 3, 5, 7
    sx, sy = data.voided.shape[0] - 1 - i, data.voided.shape[1] - 1 - j
    np.testing.assert_allclose(ras.affine @ [i, j, k, 1], data.affine @ [sx, sy, k, 1])
    assert ras.in_ras() is ras  # a RAS case is used as it is


def test_the_validation_tables_lps_storage_keeps_every_voxel_at_its_world_position(tmp_path):
    """benchmarks/validation_table.py --store lps: a RAS-stored case stored as BraTS stores."""
    bench = synth.load_benchmark("validation_table")
    synth.write_case(tmp_path, CID, labels=True, affine=np.eye(4))
    ras = _load_one(tmp_path, labels=True)
    lps = bench.stored_lps(ras)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    for name in ("voided", "mask", "t1n", "mask_healthy", "voided_disk"):
        np.testing.assert_array_equal(getattr(lps, name), getattr(ras, name)[::-1, ::-1, :])
    np.testing.assert_allclose(lps.affine @ [0, 0, 4, 1], ras.affine @ [ras.voided.shape[0] - 1, ras.voided.shape[1] - 1, 4, 1])
    np.testing.assert_array_equal(lps.in_ras().voided, ras.voided)
