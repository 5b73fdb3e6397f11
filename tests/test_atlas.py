"""The population atlas: box alignment, the residual over its harmonic fill, one brain per subject."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import synth
from brainpaint.conditioning import atlas as atlas_module
from brainpaint.conditioning.atlas import (
    ATLAS_SHAPE, Placement, atlas_residual, brain_box, case_atlas, from_canonical, register, to_canonical,
)
from brainpaint.data.atlas_build import atlas_from_cases, build_atlas
from brainpaint.io.brats import discover_cases, to_ras


def _ramp_brain(shape, box) -> np.ndarray:
    """Zero background; inside `box` an intensity that rises linearly along x across the box."""
    vol = np.zeros(shape, np.float32)
    n = box[0].stop - box[0].start
    vol[box] = np.linspace(100.0, 1000.0, n, dtype=np.float32)[:, None, None]
    return vol


def test_brains_of_other_sizes_and_places_meet_on_the_canonical_box():
    small = (slice(10, 40), slice(8, 44), slice(5, 30))
    large = (slice(2, 62), slice(0, 50), slice(12, 40))
    a, b = _ramp_brain((64, 56, 44), small), _ramp_brain((64, 56, 44), large)
    assert brain_box(a != 0) == small and brain_box(b != 0) == large
    ca, cb = to_canonical(a, small), to_canonical(b, large)
    assert ca.shape == ATLAS_SHAPE
    np.testing.assert_allclose(ca, cb, atol=1e-3 * 1000)
    # the atlas is the mean of the brains, each on its own metric scale
    atlas = build_atlas([a, b])
    assert atlas.shape == ATLAS_SHAPE and 0.0 <= atlas.min() and atlas.max() <= 1.0
    assert atlas[-1].mean() > 0.9 and atlas[0].mean() < 0.2  # bright at the high-x side of every brain
    # and goes back onto any box
    back = from_canonical(atlas, large, b.shape)
    assert brain_box(back != 0) == large and not back[:2].any()


def test_no_brain_is_an_error():
    with pytest.raises(ValueError, match="no brain"):
        build_atlas([np.zeros((8, 8, 8), np.float32)])
    assert brain_box(np.zeros((4, 4, 4), bool)) is None


def _boxed_brain(box, centre, radius, shape=(48, 48, 32)) -> tuple[np.ndarray, np.ndarray]:
    """(brain filling `box`, ball mask at `centre`) on `shape`."""
    brain = np.zeros(shape, bool)
    brain[box] = True
    return brain, synth.make_mask(shape, centre=centre, radius=radius).astype(bool)


def test_the_residual_of_a_harmonic_atlas_is_zero_and_of_a_dark_core_negative():
    shape = (48, 48, 32)
    box = (slice(4, 44), slice(4, 44), slice(2, 30))
    brain, mask = _boxed_brain(box, centre=(24, 24, 16), radius=6, shape=shape)
    # a linear ramp is harmonic: its harmonic fill is itself, so the atlas adds nothing
    ramp = np.broadcast_to(np.linspace(0.2, 0.8, ATLAS_SHAPE[0], dtype=np.float32)[:, None, None], ATLAS_SHAPE)
    b = from_canonical(ramp, box, shape)
    residual = atlas_residual(ramp, b, mask, brain)
    assert residual.dtype == np.float32 and not residual[~mask].any()
    assert np.abs(residual[mask]).max() < 2e-3
    # a dark core where the mask lies: the residual says "darker than the border suggests"
    core = np.full(ATLAS_SHAPE, 0.8, np.float32)
    c = [n // 2 for n in ATLAS_SHAPE]
    core[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, c[2] - 8 : c[2] + 8] = 0.3
    b = from_canonical(core, box, shape)
    residual = atlas_residual(core, b, mask, brain)
    assert residual[24, 24, 16] < -0.3 and not residual[~mask].any()


def test_the_residual_takes_the_case_intensity_scale_from_the_known_voxels():
    shape = (48, 48, 32)
    box = (slice(4, 44), slice(6, 42), slice(2, 30))
    brain, mask = _boxed_brain(box, centre=(22, 26, 15), radius=5, shape=shape)
    rng = np.random.default_rng(0)
    atlas = (0.5 + 0.2 * rng.standard_normal(ATLAS_SHAPE)).astype(np.float32)
    b = from_canonical(atlas, box, shape)
    same = atlas_residual(atlas, b, mask, brain)
    dimmer = atlas_residual(atlas, np.where(brain, 0.5 * b + 0.1, 0), mask, brain)
    assert np.abs(same[mask]).max() > 0.05
    np.testing.assert_allclose(dimmer, 0.5 * same, atol=1e-4)


def test_an_atlas_counts_every_subject_once(tmp_path):
    synth.write_case(tmp_path, "BraTS-SYN-00001-000", seed=0)
    synth.write_case(tmp_path, "BraTS-SYN-00001-001", seed=0, centre=(20, 20, 10))
    synth.write_case(tmp_path, "BraTS-SYN-00002-000", seed=1)
    cases, errors = discover_cases(tmp_path, labels=True)
    assert len(cases) == 3 and not errors
    said = []
    atlas = atlas_from_cases(cases, log=said.append)
    # the synthetic cases are stored like BraTS (LPS): the atlas holds them turned to RAS
    lps = synth.default_affine()
    one_each = build_atlas([to_ras(synth.make_brain(seed=s).round(), lps) for s in (0, 1)])
    np.testing.assert_allclose(atlas, one_each, atol=1e-6)
    assert said == ["atlas: mean of 2 brain(s) on a 120x144x120 grid"]


def test_the_atlas_information_benchmark_scores_both_fills_or_skips_loudly(tmp_path, capsys):
    bench = synth.load_benchmark("atlas_information")

    for i in range(2):
        synth.write_case(tmp_path / "train", f"BraTS-SYN-0000{i}-000", seed=i)
    synth.write_case(tmp_path / "val", "BraTS-SYN-00009-000", seed=9, radius=6)
    assert bench.main(["--data", str(tmp_path / "val"), "--atlas-from", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| case | harmonic SSIM") and out[2].startswith("| BraTS-SYN-00009-000 | 0.")
    assert out[3].startswith("| **mean** |") and len(out) == 4

    plain = synth.tiny_weights(tmp_path / "plain.safetensors")
    with pytest.raises(SystemExit, match="holds no atlas"):
        bench.main(["--data", str(tmp_path / "val"), "--weights", str(plain)])
    assert bench.main(["--data", str(tmp_path / "absent"), "--weights", str(plain)]) == 0
    assert "SKIPPED" in capsys.readouterr().err


# --------------------------------------------------------------------------- affine fit
def _lumpy_brain(shape=(60, 72, 60), seed=0) -> np.ndarray:
    """An ellipsoid brain with smooth blobs of other intensity: structure a rotation moves."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = ((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2) < 1.0
    blobs = ndimage.gaussian_filter(rng.standard_normal(shape), 4.0)
    return ((600.0 + 4000.0 * blobs) * inside).clip(0, None).astype(np.float32)


def _rotated(volume: np.ndarray, degrees: float) -> np.ndarray:
    """`volume` turned by `degrees` about the z axis through its centre (linear, zero outside)."""
    return ndimage.rotate(volume, degrees, axes=(0, 1), reshape=False, order=1).clip(0, None)


def _corr(a, b, where) -> float:
    return float(np.corrcoef(a[where], b[where])[0, 1])


def test_the_affine_fit_finds_a_tilted_brain_where_the_box_fit_misses_it():
    brain = _lumpy_brain()
    atlas = build_atlas([brain])  # one brain: its box atlas is the brain itself
    tilted = _rotated(brain, 10.0)
    known = tilted > 0
    mask = np.zeros(brain.shape, bool)
    box_fit = case_atlas(atlas, tilted, mask, known, "box")
    affine_fit = case_atlas(atlas, tilted, mask, known, "affine")
    assert _corr(affine_fit, tilted, known) > 0.9 > _corr(box_fit, tilted, known) + 0.1
    placement = register(atlas, tilted, mask, known)
    angle = np.degrees(np.arctan2(placement.A[1, 0], placement.A[0, 0]))
    assert abs(abs(angle) - 10.0) < 2.0  # the tilt, in one direction or the other of the map
    points = np.random.default_rng(0).uniform(0, 50, (20, 3))
    np.testing.assert_allclose(placement.to_case(placement.to_atlas(points)), points, atol=1e-6)
    # the residual of the registered atlas is what the `affine` fit gives the network
    mask[25:35, 30:42, 25:35] = True
    b = np.where(mask, 0, tilted)
    assert np.abs(atlas_residual(atlas, b, mask, known, "affine") - atlas_residual(atlas, b, mask, known, "box")).max() > 0.01
    with pytest.raises(ValueError, match="atlas fit must be one of"):
        case_atlas(atlas, tilted, mask, known, "elastic")


@pytest.mark.slow
def test_an_atlas_of_registered_brains_is_sharper_than_the_box_mean():
    brain = _lumpy_brain(seed=1)
    tilts = [_rotated(brain, d) for d in (-12.0, 0.0, 12.0)]
    box_mean, registered = build_atlas(tilts), build_atlas(tilts, fit="affine", log=lambda m: None)
    assert registered.shape == ATLAS_SHAPE and registered.dtype == np.float32
    no_mask = np.zeros(brain.shape, bool)

    def fit(atlas):  # how well the atlas, registered onto each brain, matches it
        return np.mean([_corr(case_atlas(atlas, t, no_mask, t > 0, "affine"), t, t > 0) for t in tilts])

    assert fit(registered) > fit(box_mean) + 0.02 and fit(registered) > 0.95


def test_the_atlas_leaves_tumour_brains_out(tmp_path):
    """Cases with a non-empty mask-unhealthy (tumour brains) add nothing to the atlas."""
    synth.write_case(tmp_path, "BraTS-SYN-00001-000", seed=1, radius=4, labels=True)
    synth.write_case(tmp_path, "BraTS-GLI-00002-000", seed=2, radius=4, labels=True)
    tumour = tmp_path / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-mask-unhealthy.nii.gz"
    synth.save(synth.make_mask(radius=3).astype(np.uint8), tumour)
    cases = discover_cases(tmp_path, labels=True)[0]
    said = []
    both = atlas_from_cases(cases, log=said.append)
    alone = atlas_from_cases([c for c in cases if c.id.startswith("BraTS-SYN")])
    np.testing.assert_array_equal(both, alone)
    assert any("BraTS-GLI-00002-000 holds a tumour" in line for line in said)


def test_registration_finds_a_shifted_and_scaled_brain_and_says_it_converged():
    brain = _lumpy_brain(seed=2)
    atlas = build_atlas([brain])  # one brain: its box atlas is the brain itself
    known = brain > 0
    box = brain_box(known)
    # Its structure 3 voxels along x, -2 along y, 1 along z and 8 % larger along y, about the
    # centre, seen through the unmoved brain's outline: the box fit cannot see the change.
    centre = np.array([(s.start + s.stop - 1) / 2.0 for s in box])
    A, shift = np.diag([1.0, 1.0 / 1.08, 1.0]), np.array([3.0, -2.0, 1.0])
    moved = ndimage.affine_transform(brain, A, offset=centre - A @ (centre + shift), order=1) * known
    placement = register(atlas, moved, np.zeros(brain.shape, bool), known)
    assert placement.converged and placement.iterations > 0
    # where the case's voxels land in the atlas: where the unmoved brain's voxels did
    points = np.argwhere(known)[::50].astype(np.float64)
    truth = Placement(box).to_atlas((points - centre - shift) @ A.T + centre)  # moved[o] = brain[that]
    assert np.abs(Placement(box).to_atlas(points) - truth).max(axis=1).mean() > 2.0  # atlas voxels
    assert np.abs(placement.to_atlas(points) - truth).max(axis=1).mean() < 0.5
    fitted, boxed = (case_atlas(atlas, moved, np.zeros(brain.shape, bool), known, fit) for fit in ("affine", "box"))
    assert _corr(fitted, moved, known) > 0.97 > _corr(boxed, moved, known) + 0.05


def test_registration_that_runs_out_of_iterations_says_so(monkeypatch):
    brain = _lumpy_brain(seed=4)
    atlas = build_atlas([brain])
    tilted = _rotated(brain, 8.0)
    monkeypatch.setattr(atlas_module, "REGISTER_MAXITER", 1)
    placement = register(atlas, tilted, np.zeros(brain.shape, bool), tilted > 0)
    assert placement is not None and not placement.converged and placement.iterations <= len(atlas_module.REGISTER_LEVELS)
    assert Placement(brain_box(brain > 0)).converged  # the box fit has nothing to converge


def test_the_atlas_is_placed_only_where_it_is_read_with_the_same_values():
    brain = _lumpy_brain(seed=5)
    atlas = build_atlas([brain])
    tilted = _rotated(brain, 6.0)
    mask = np.zeros(brain.shape, bool)
    mask[20:32, 30:44, 24:36] = True
    placement = register(atlas, tilted, mask, tilted > 0)
    full = atlas_module.place(atlas, placement, brain.shape)
    region = (slice(19, 33), slice(29, 45), slice(23, 37))
    np.testing.assert_allclose(atlas_module.place(atlas, placement, brain.shape, region), full[region], atol=1e-6)
    points = np.argwhere(tilted > 0)[::97]
    np.testing.assert_allclose(atlas_module.place_at(atlas, placement, points, brain.shape), full[tuple(points.T)], atol=1e-6)
    box = Placement(brain_box(tilted > 0))
    np.testing.assert_array_equal(atlas_module.place(atlas, box, brain.shape, region), atlas_module.place(atlas, box, brain.shape)[region])
