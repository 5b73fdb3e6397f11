"""QA report PNG: layout, views through the mask centre, outline only where the mask edge is."""
from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from brainpaint.io.brats import CaseData
from brainpaint.infer.report import GAP, OUTLINE_RGB, mask_centre, write_qa_report

import synth

SHAPE = synth.SMALL_SHAPE  # (48, 48, 20)


def _case(zooms=(1.0, 1.0, 1.0), centre=(20, 26, 9)):
    brain = synth.make_brain(SHAPE, seed=3)
    mask = synth.make_mask(SHAPE, centre=centre, radius=4).astype(bool)
    voided = brain * ~mask
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_zooms(zooms)
    data = CaseData(
        id="BraTS-GLI-00009-000",
        voided=voided.astype(np.float32),
        mask=mask,
        affine=synth.default_affine(),
        header=header,
        dtype=np.dtype(np.int16),
    )
    output = voided.copy()
    output[mask] = 700.0  # a flat, clearly visible fill
    return data, output


def _is_red(rgb: np.ndarray) -> np.ndarray:
    return np.all(rgb == np.array(OUTLINE_RGB, dtype=np.uint8), axis=-1)


def test_layout_and_outline(tmp_path):
    data, output = _case()
    png = tmp_path / "qa" / "case.png"
    write_qa_report(data, output, png)

    image = np.asarray(Image.open(png))
    # Rows: axial (48 rows), coronal (20), sagittal (20); cells are 48 wide.
    assert image.shape == (48 + 20 + 20 + 2 * GAP, 3 * 48 + 2 * GAP, 3)
    assert sorted(p.name for p in png.parent.iterdir()) == ["case.png"]  # no temporary left

    cx, cy, cz = mask_centre(data.mask)
    assert (cx, cy, cz) == (20, 26, 9)
    red = _is_red(image)
    col = lambda c: slice(c * (48 + GAP), c * (48 + GAP) + 48)
    axial = slice(0, 48)
    # The outline appears only in the third column ...
    assert not red[:, col(0)].any() and not red[:, col(1)].any()
    # ... and, in the axial row, has exactly as many pixels as the mask edge of slice cz.
    plane = data.mask[:, :, cz]
    edge = plane & ~ndimage.binary_erosion(plane, border_value=0)
    assert red[axial, col(2)].sum() == edge.sum()
    # The displayed axial plane is rot90 of vol[:, :, z]: the edge lands at the same pixels.
    assert np.array_equal(red[axial, col(2)], np.rot90(edge))


def test_input_shows_void_and_output_shows_fill(tmp_path):
    data, output = _case()
    png = tmp_path / "case.png"
    write_qa_report(data, output, png)
    image = np.asarray(Image.open(png)).astype(int)
    cz = mask_centre(data.mask)[2]
    inside = np.rot90(data.mask[:, :, cz])
    axial_in = image[0:48, 0:48, 0]
    axial_out = image[0:48, 48 + GAP : 2 * 48 + GAP, 0]
    assert np.all(axial_in[inside] == 0)  # voided input is black in the hole
    assert np.all(axial_out[inside] > 100)  # the fill is visible in the output
    assert np.array_equal(axial_in[~inside], axial_out[~inside])  # identical elsewhere


def test_anisotropic_spacing_stretches_panels(tmp_path):
    data, output = _case(zooms=(1.0, 1.0, 2.0))
    png = tmp_path / "case.png"
    write_qa_report(data, output, png)
    height = Image.open(png).height
    # Coronal and sagittal planes are 20 slices of 2 mm -> 40 pixel rows each.
    assert height == 48 + 40 + 40 + 2 * GAP


def test_overwrites_existing_png(tmp_path):
    data, output = _case()
    png = tmp_path / "case.png"
    png.write_bytes(b"stale")
    write_qa_report(data, output, png)
    assert Image.open(png).format == "PNG"


def test_comparison_has_a_column_per_volume_and_outlines_only_the_first():
    from brainpaint.infer.report import render_comparison

    brain = synth.make_brain(SHAPE, seed=3)
    mask = synth.make_mask(SHAPE, centre=(20, 26, 9), radius=4).astype(bool)
    volumes = {"voided": brain * ~mask, "a": brain, "b": np.zeros_like(brain)}
    image = np.asarray(render_comparison(volumes, mask, (0.0, float(brain.max())), margin=5, scale=2))
    side = 2 * (2 * 4 + 1 + 2 * 5)  # mask extent plus margins, enlarged twice
    assert image.shape[1] == 3 * side + 2 * GAP
    red = np.all(image == OUTLINE_RGB, axis=2)
    columns = [red[:, i * (side + GAP): i * (side + GAP) + side] for i in range(3)]
    assert columns[0].any() and not columns[1].any() and not columns[2].any()
    third = image[16:16 + side, 2 * (side + GAP): 2 * (side + GAP) + side]
    assert third.max() == 0  # the all-zero volume is black
