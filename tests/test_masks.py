"""Procedural healthy masks: determinism, placement rules, volumes, output format."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import synth
from brainpaint.data import masks

# 200 to 1500 voxels on the tiny synthetic brain (about 14 000 voxels).
RANGE = (0.2, 1.5)


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    return synth.make_brain(synth.SMALL_SHAPE, seed=0) > 0


def _blob_on_grid(g: masks.GeneratedMask, shape) -> tuple[np.ndarray, int]:
    """The unclipped blob pasted on the grid, and how many of its voxels fall off the grid."""
    out = np.zeros(shape, bool)
    idx = np.argwhere(g.blob) + np.array(g.offset)
    inside = ((idx >= 0) & (idx < np.array(shape))).all(axis=1)
    out[tuple(idx[inside].T)] = True
    return out, int((~inside).sum())


def test_same_seed_same_masks_and_mask_k_independent_of_n(brain):
    a = masks.generate_masks(brain, 3, seed=7, volume_range_cm3=RANGE)
    b = masks.generate_masks(brain, 3, seed=7, volume_range_cm3=RANGE)
    c = masks.generate_masks(brain, 1, seed=7, volume_range_cm3=RANGE)
    d = masks.generate_masks(brain, 3, seed=8, volume_range_cm3=RANGE)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[0], c[0])
    assert not any(np.array_equal(x, y) for x, y in zip(a, d))
    # The masks of one call differ from each other.
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])


def test_binary_on_input_grid_one_solid_piece(brain):
    shape = (40, 52, 18)  # non-cubic, to catch axis mix-ups
    small = synth.make_brain(shape, seed=1) > 0
    for m in masks.generate_masks(small, 4, seed=3, volume_range_cm3=RANGE):
        assert m.shape == shape and m.dtype == np.bool_
        assert m.any()
        assert ndimage.label(m)[1] == 1
        np.testing.assert_array_equal(ndimage.binary_fill_holes(m), m)


def test_volumes_in_range_and_spread(brain):
    details = masks.generate_mask_details(brain, 12, seed=1, volume_range_cm3=RANGE)
    volumes = np.array([g.mask.sum() for g in details])
    assert volumes.min() >= 200 and volumes.max() <= 1500
    assert volumes.max() / volumes.min() > 2.0  # a spread, not one size
    for g in details:
        assert g.volume_voxels == g.mask.sum()
        assert g.volume_cm3 == pytest.approx(g.volume_voxels / 1000.0)


def test_voxel_volume_scales_the_range(brain):
    # 8 mm³ voxels: 0.8 to 4 cm³ is 100 to 500 voxels.
    details = masks.generate_mask_details(brain, 6, seed=2, volume_range_cm3=(0.8, 4.0), voxel_volume_mm3=8.0)
    for g in details:
        assert 100 <= g.mask.sum() <= 500
        assert g.volume_cm3 == pytest.approx(g.mask.sum() * 8.0 / 1000.0)


def test_brain_overlap_rule_unclipped(brain):
    # Large masks on a small brain: many candidates stick out, so the rule has work to do.
    details = masks.generate_mask_details(
        brain, 6, seed=4, volume_range_cm3=(1.0, 2.5), clip_to_brain=False, candidates=4
    )
    overlaps = []
    for g in details:
        inside = (g.mask & brain).sum() / g.mask.sum()
        _, off_grid = _blob_on_grid(g, brain.shape)
        # Blob voxels off the grid count as outside the brain.
        overlap = (g.mask & brain).sum() / (g.mask.sum() + off_grid)
        assert overlap >= 0.75 and inside >= overlap
        assert g.brain_overlap == pytest.approx(overlap, abs=1e-6)
        overlaps.append(overlap)
    assert min(overlaps) < 1.0  # the rule was exercised, not trivially met


def test_clipped_masks_lie_in_brain_and_blob_obeys_rule(brain):
    for g in masks.generate_mask_details(brain, 5, seed=5, volume_range_cm3=(1.0, 2.5)):
        assert not (g.mask & ~brain).any()
        blob, off_grid = _blob_on_grid(g, brain.shape)
        assert (blob & brain).sum() / (blob.sum() + off_grid) >= 0.75
        assert not (g.mask & ~blob).any()  # the mask is the blob cut to the brain


def test_avoid_is_respected_with_margin(brain):
    avoid = np.zeros_like(brain)
    avoid[:, :24, :] = brain[:, :24, :]  # a "lesion" filling half the brain
    free = masks.generate_masks(brain, 8, seed=6, volume_range_cm3=RANGE)
    assert any((m & avoid).any() for m in free)  # without `avoid` masks do land there
    kept = masks.generate_masks(brain, 8, seed=6, volume_range_cm3=RANGE, avoid=avoid, avoid_margin=2)
    grown = ndimage.binary_dilation(avoid, iterations=2)
    for m in kept:
        assert not (m & grown).any()


def test_impossible_requests_fail_clearly(brain):
    with pytest.raises(masks.MaskPlacementError, match="fewer than the smallest mask"):
        masks.generate_masks(brain, 1, seed=0, volume_range_cm3=(100.0, 200.0))
    with pytest.raises(masks.MaskPlacementError, match="free of the lesion"):
        masks.generate_masks(brain, 1, seed=0, volume_range_cm3=RANGE, avoid=brain)
    with pytest.raises(ValueError, match="shape"):
        masks.generate_masks(brain, 1, seed=0, avoid=np.zeros((3, 3, 3), bool))


def test_uniform_placement_reaches_nearer_the_edge_and_keeps_the_rules(brain):
    central = masks.generate_mask_details(brain, 16, seed=3, volume_range_cm3=RANGE)
    explicit = masks.generate_mask_details(brain, 16, seed=3, volume_range_cm3=RANGE, placement="central")
    uniform = masks.generate_mask_details(brain, 16, seed=3, volume_range_cm3=RANGE, placement="uniform")
    for a, b in zip(central, explicit):  # the default is central
        np.testing.assert_array_equal(a.mask, b.mask)
    depth = ndimage.distance_transform_edt(brain)  # voxels from the brain's edge

    def mean_depth(found):
        return float(np.mean([depth[g.mask].mean() for g in found]))

    assert mean_depth(uniform) < mean_depth(central) - 0.5
    assert np.mean([g.brain_overlap for g in uniform]) < np.mean([g.brain_overlap for g in central])
    for g in uniform:
        assert g.brain_overlap >= masks.MIN_BRAIN_OVERLAP and not (g.mask & ~brain).any()
        assert int(RANGE[0] * 1000) <= g.volume_voxels <= int(RANGE[1] * 1000)
    with pytest.raises(ValueError, match="unknown placement 'edge'"):
        masks.generate_mask_details(brain, 1, seed=3, volume_range_cm3=RANGE, placement="edge")
