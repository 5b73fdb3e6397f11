"""In-plane boxes: only background is cut; crops and pads invert exactly."""
from __future__ import annotations

import numpy as np
import pytest

from brainpaint.errors import CaseError
from brainpaint.conditioning.geometry import (
    box_size, crop, full_slice_box, mask_box, paste, patch_shape, slices_per_window, window_boxes,
)


def _brain(x0, x1, y0, y1, shape=(240, 240, 4)):
    vol = np.zeros(shape, np.float32)
    vol[x0:x1, y0:y1, 1] = 1.0
    return vol


def test_centred_crop_when_the_brain_fits():
    assert full_slice_box(_brain(30, 210, 20, 220)) == (slice(8, 232), slice(8, 232))


def test_window_shifts_to_keep_an_off_centre_brain():
    sx, sy = full_slice_box(_brain(0, 200, 35, 239))
    assert (sx, sy) == (slice(0, 224), slice(15, 239))


def test_brain_touching_the_grid_edge_within_size_is_kept():
    sx, sy = full_slice_box(_brain(16, 240, 0, 224))
    assert (sx, sy) == (slice(16, 240), slice(0, 224))


def test_brain_too_wide_is_reported_not_cut():
    with pytest.raises(CaseError) as info:
        full_slice_box(_brain(5, 235, 30, 200), size=224, case_id="BraTS-GLI-00009-000")
    msg = str(info.value)
    assert msg.startswith("BraTS-GLI-00009-000: brain touches the crop border")
    assert "230 voxels along x" in msg


def test_mask_voxels_count_as_brain():
    brain = _brain(10, 230, 40, 200)  # 220 wide: fits
    union = brain.astype(bool)
    union[2, 100, 1] = True  # mask reaching further out: 228 wide
    with pytest.raises(CaseError, match="brain touches the crop border"):
        full_slice_box(union, case_id="c")


def test_small_grid_is_padded():
    vol = np.zeros((48, 40, 5), np.float32)
    vol[5:40, 5:35] = 1
    box = full_slice_box(vol, size=64)
    assert box == (slice(0, 48), slice(0, 40))
    shape = patch_shape(box, size=64)
    assert shape == (64, 64)
    patch = crop(vol, box, shape)
    assert patch.shape == (64, 64, 5) and patch[48:].sum() == 0 and patch[:, 40:].sum() == 0
    back = paste(patch, box, np.zeros_like(vol))
    np.testing.assert_array_equal(back, vol)


def test_crop_paste_round_trip_on_full_grid():
    rng = np.random.default_rng(0)
    vol = rng.random((240, 240, 3)).astype(np.float32)
    box = (slice(8, 232), slice(8, 232))
    patch = crop(vol, box)
    assert patch.shape == (224, 224, 3)
    out = np.zeros_like(vol)
    paste(patch, box, out)
    np.testing.assert_array_equal(out[box], vol[box])
    assert out[:8].sum() == 0


def test_mask_box_contains_mask_with_margin_and_rounds_up():
    mask = np.zeros((240, 240, 10), bool)
    mask[100:130, 50:61, 3] = True  # 30 x 11
    mask[105:110, 55:58, 7] = True
    box = mask_box(mask, min_size=32, multiple=16, margin=8, shape=mask.shape)
    w, h = box_size(box)
    assert w == h == 48  # 30 + 2*8 = 46 -> 48
    assert box[0].start <= 100 - 8 and box[0].stop >= 130 + 8
    assert box[1].start <= 50 and box[1].stop >= 61


def test_mask_box_min_size_and_grid_edge():
    mask = np.zeros((240, 240, 4), bool)
    mask[0:3, 236:240, 2] = True
    box = mask_box(mask, min_size=64, multiple=16, margin=4, shape=mask.shape)
    assert box == (slice(0, 64), slice(176, 240))


def test_mask_box_on_a_small_grid_covers_it_and_pads():
    mask = np.zeros((48, 48, 4), bool)
    mask[20:30, 20:30, 1] = True
    box = mask_box(mask, min_size=64, multiple=16, margin=4, shape=mask.shape)
    assert box == (slice(0, 48), slice(0, 48))
    assert patch_shape(box, size=64, multiple=16) == (64, 64)


def test_crop_zero_pads_outside_the_grid_on_every_side_and_paste_writes_only_the_grid_part():
    image = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    box = (slice(-1, 3), slice(2, 6))
    out = crop(image, box)
    assert out.shape == (4, 4) and out.dtype == np.float32
    assert not out[0].any() and not out[:, 2:].any()
    np.testing.assert_array_equal(out[1:, :2], image[:, 2:])
    back = paste(out * 10, box, np.zeros_like(image))
    np.testing.assert_array_equal(back[:, 2:], 10 * image[:, 2:])
    assert not back[:, :2].any()
    where = np.zeros(image.shape, bool)
    where[1, 3] = True
    only = paste(out * 10, box, image.copy(), where=where)
    assert only[1, 3] == 10 * image[1, 3] and np.array_equal(np.delete(only.ravel(), 7), np.delete(image.ravel(), 7))
    assert not crop(image, (slice(5, 8), slice(0, 2))).any()  # wholly off the grid


def test_crop_and_paste_of_a_3d_box_reaching_past_the_grid():
    volume = np.random.default_rng(1).random((5, 6, 7)) > 0.5
    box = (slice(-2, 3), slice(4, 9), slice(1, 6))
    patch = crop(volume, box)
    assert patch.shape == (5, 5, 5) and patch.dtype == bool
    np.testing.assert_array_equal(patch[2:, :2], volume[:3, 4:, 1:6])
    assert not patch[:2].any() and not patch[:, 2:].any()
    back = paste(patch, box, np.zeros_like(volume))
    np.testing.assert_array_equal(back[:3, 4:, 1:6], volume[:3, 4:, 1:6])
    assert back.sum() == volume[:3, 4:, 1:6].sum()


def test_each_slice_is_filled_by_the_fewest_windows_whose_cores_hold_its_mask():
    mask = np.zeros((240, 240, 6), bool)
    mask[40:70, 40:70, 0] = True  # one corner of the union: one window
    mask[150:180, 150:180, 1] = True  # the opposite corner: another
    mask[40:180, 100:110, 2] = True  # a long bar along x: two windows
    mask[40:180, 40:180, 4] = True  # all of it: all four
    boxes = window_boxes(mask, 128, margin=16)
    assert len(boxes) == 4
    per_window = slices_per_window(mask, boxes, margin=16)
    chosen = {z: [i for i, zs in enumerate(per_window) if z in zs] for z in range(6)}
    assert [len(chosen[z]) for z in range(6)] == [1, 1, 2, 0, 4, 0]
    for z in (0, 1, 2, 4):  # every mask voxel at least 16 voxels inside a window that fills its slice
        points = np.argwhere(mask[:, :, z])
        inside = [np.all([(points[:, k] >= boxes[i][k].start + 16) & (points[:, k] < boxes[i][k].stop - 16)
                          for k in range(2)], axis=0) for i in chosen[z]]
        assert np.logical_or.reduce(inside).all()
    # margins wider than the windows' overlap: voxels in no core are filled by every window holding them
    wide = slices_per_window(mask, boxes, margin=60)
    assert all(4 in zs for zs in wide)
    assert slices_per_window(mask, boxes[:1], margin=16) == [[0, 1, 2, 4]]  # one window: wherever it holds mask
