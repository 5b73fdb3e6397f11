"""Harmonic fill: exact on harmonic data, unchanged outside the mask, bounded by the boundary."""
from __future__ import annotations

import numpy as np
import pytest

import synth
from scipy.sparse.linalg import spsolve

from brainpaint.conditioning import harmonic
from brainpaint.conditioning.harmonic import harmonic_fill, laplacian_system


def _ball(shape, centre, radius):
    return synth.make_mask(shape, centre=centre, radius=radius).astype(bool)


def test_linear_field_is_reproduced_exactly():
    """A linear function is discretely harmonic, so the fill must recover it."""
    shape = (30, 28, 20)
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    field = 3.0 * x - 2.0 * y + 5.0 * z + 100.0
    mask = _ball(shape, (15, 14, 10), 6)
    voided = np.where(mask, 0.0, field)
    filled = harmonic_fill(voided, mask)
    assert filled.dtype == np.float32
    np.testing.assert_allclose(filled[mask], field[mask], atol=1e-3)


def test_outside_unchanged_and_maximum_principle():
    brain = synth.make_brain()
    mask = _ball(brain.shape, (24, 24, 10), 6)
    voided = brain * ~mask
    filled = harmonic_fill(voided, mask)
    assert filled[~mask].tobytes() == voided.astype(np.float32)[~mask].tobytes()
    ring = np.zeros_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            ring |= np.roll(mask, step, axis=axis)
    ring &= ~mask
    assert filled[mask].min() >= voided[ring].min() - 1e-3
    assert filled[mask].max() <= voided[ring].max() + 1e-3
    assert np.all(filled[mask] > 0)  # a hole inside tissue is filled with tissue-like values


def test_each_filled_voxel_is_the_mean_of_its_neighbours():
    brain = synth.make_brain(seed=3)
    mask = _ball(brain.shape, (20, 26, 9), 5)
    filled = harmonic_fill(brain * ~mask, mask).astype(np.float64)
    padded = np.pad(filled, 1, mode="edge")  # interior mask: padding is never a neighbour
    neighbours = sum(
        np.roll(padded, s, axis=a)[1:-1, 1:-1, 1:-1] for a in range(3) for s in (-1, 1)
    )
    np.testing.assert_allclose(filled[mask], neighbours[mask] / 6.0, atol=1e-2)


def test_constant_boundary_gives_constant_fill_even_at_the_grid_edge():
    vol = np.full((12, 12, 6), 42.0, np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[0:5, 3:9, 0:6] = True  # touches three grid faces
    vol[mask] = 0.0
    np.testing.assert_allclose(harmonic_fill(vol, mask)[mask], 42.0, atol=1e-3)


def test_zero_background_is_a_boundary_value():
    vol = np.zeros((20, 20, 20), np.float32)
    vol[:10] = 100.0
    mask = np.zeros(vol.shape, bool)
    mask[8:12, 8:12, 8:12] = True
    vol[mask] = 0.0
    filled = harmonic_fill(vol, mask)
    profile = filled[8:12, 10, 10]
    assert np.all(np.diff(profile) < 0) and 0 < profile.min() and profile.max() < 100


def test_empty_mask_and_errors():
    vol = synth.make_brain()
    np.testing.assert_array_equal(harmonic_fill(vol, np.zeros(vol.shape, bool)), vol)
    with pytest.raises(ValueError, match="differ in shape"):
        harmonic_fill(vol, np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="whole volume"):
        harmonic_fill(vol, np.ones(vol.shape, bool))


def test_the_fill_solves_only_the_box_around_the_mask_with_the_values_of_the_whole_grid():
    """`harmonic_fill` builds the system of the mask's box grown by one voxel: the same system,
    so the same values, as the whole grid's (also where the mask reaches the grid's edge)."""
    rng = np.random.default_rng(3)
    volume = rng.uniform(10, 200, (30, 26, 22)).astype(np.float32)
    for box in [(slice(8, 17), slice(5, 14), slice(9, 20)), (slice(0, 7), slice(18, 26), slice(0, 22))]:
        mask = np.zeros(volume.shape, bool)
        mask[box] = rng.random(mask[box].shape) > 0.2
        A, b, flat = laplacian_system(volume, mask)  # the whole grid's system, solved directly
        whole = spsolve(A.tocsc(), b)
        np.testing.assert_allclose(harmonic_fill(volume, mask)[mask], whole, rtol=1e-5)
    assert harmonic.mask_support(mask) == (slice(0, 8), slice(17, 26), slice(0, 22))  # clipped at the grid's edges
