"""Intensity mapping: the network's [0, 1] scale is the official metric's scale."""
from __future__ import annotations

import numpy as np
import torch
from inpainting.challenge_metrics_2023 import _normalize_with_percentiles

import synth
from brainpaint.io.brats import cast_to_dtype
from brainpaint.conditioning.intensity import IntensityMap


def _voided():
    brain = np.round(synth.make_brain(scale=1200.0))
    return (brain * (1 - synth.make_mask(radius=6))).astype(np.float32)


def test_fit_uses_the_metric_percentiles_of_all_voxels():
    voided = _voided()
    imap = IntensityMap.fit(voided)
    lo, hi = np.percentile(voided, [0.5, 99.5])
    assert imap.lo == max(float(lo), 0.0) == 0.0  # background makes p0.5 zero
    assert imap.hi == float(hi)
    assert imap.hi < voided.max()  # the top 0.5 % is clipped, as by the metric


def test_lower_bound_is_never_negative_and_positive_when_no_background():
    shifted = _voided() - 500.0
    assert IntensityMap.fit(shifted).lo == 0.0
    tissue = np.linspace(100.0, 200.0, 1000, dtype=np.float32)
    imap = IntensityMap.fit(tissue)
    assert imap.lo == float(np.percentile(tissue, [0.5, 99.5])[0]) > 100.0  # as the metric computes it


def test_normalize_clips_and_round_trips():
    imap = IntensityMap(lo=10.0, hi=110.0)
    x = np.array([-5.0, 10.0, 35.0, 60.0, 110.0, 500.0], dtype=np.float32)
    y = imap.normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-7)
    inside = x[(x >= 10) & (x <= 110)]
    np.testing.assert_allclose(imap.denormalize(imap.normalize(inside)), inside, rtol=1e-6)
    ys = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(imap.normalize(imap.denormalize(ys)), ys, atol=1e-6)


def test_network_output_is_what_the_official_metric_sees():
    """A network output y, mapped back and written as int16, is normalised by the metric to y
    (up to int16 rounding); with a float dtype it is y to float precision."""
    voided = _voided()
    imap = IntensityMap.fit(voided)
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, voided.shape).astype(np.float32)
    reference = torch.from_numpy(voided)[None]
    for dtype, tol in ((np.float32, 1e-5), (np.int16, 0.5 / imap.scale + 1e-6)):
        written = cast_to_dtype(imap.denormalize(y), dtype)
        seen = _normalize_with_percentiles(torch.from_numpy(written.astype(np.float32))[None], reference)
        np.testing.assert_allclose(seen[0].numpy(), y, atol=tol)


def test_degenerate_volume_still_invertible():
    flat = np.zeros((10, 10, 10), np.float32)
    imap = IntensityMap.fit(flat)
    assert imap.hi > imap.lo
    sparse = flat.copy()
    sparse[0, 0, 0] = 300.0  # 0.1 % of voxels: p99.5 is 0
    assert IntensityMap.fit(sparse) == IntensityMap(0.0, 300.0)
