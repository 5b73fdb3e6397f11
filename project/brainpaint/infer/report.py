"""Visual QA: one PNG per case showing the inpainted region in three orthogonal views.

Rows are the axial, coronal and sagittal planes through the centre of mass of the mask;
columns are the voided input, the output, and the output with the mask outline drawn in
red. A reviewer sees at a glance whether the fill matches the surrounding tissue in every
direction (slice-to-slice stripes show up in the coronal and sagittal rows).

Grey levels use the metric's own percentile window of the voided image, so the picture shows
what the metric compares. Pixels are stretched by the voxel spacing so views look anatomical.
The case's warnings (`Prediction.warnings`: what its fill fell back on) are written in yellow
under the panels, so a fill made on a fallback never looks like any other.
Only numpy, scipy and pillow are needed.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from brainpaint.conditioning.intensity import metric_window
from brainpaint.io.atomic import atomic_write

LESION_RGB = (255, 200, 0)  # a voided tumour's outline (yellow)
OUTLINE_RGB = (255, 0, 0)
WARNING_RGB = (255, 220, 0)
LINE_HEIGHT = 12  # pixels per line of text (pillow's default font)
VIEWS = ("axial", "coronal", "sagittal")
GAP = 4  # pixels between panels


def mask_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel nearest to the mask's centre of mass (the volume centre for an empty mask)."""
    if not mask.any():
        return tuple(s // 2 for s in mask.shape)
    com = ndimage.center_of_mass(mask)
    return tuple(int(round(c)) for c in com)


def _plane(volume: np.ndarray, view: str, centre) -> np.ndarray:
    """A 2D plane as [rows, columns] for display: superior/anterior at the top."""
    x, y, z = centre
    if view == "axial":
        plane = volume[:, :, z]  # [x, y]
    elif view == "coronal":
        plane = volume[:, y, :]  # [x, z]
    else:
        plane = volume[x, :, :]  # [y, z]
    return np.rot90(plane)  # first axis becomes columns, second axis rows with its top last


def _spacing(view: str, zooms) -> tuple[float, float]:
    """(row, column) pixel spacing of a displayed plane."""
    zx, zy, zz = zooms
    return {"axial": (zy, zx), "coronal": (zz, zx), "sagittal": (zz, zy)}[view]


def _to_grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((plane.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)


def _outline(mask2d: np.ndarray) -> np.ndarray:
    return mask2d & ~ndimage.binary_erosion(mask2d, border_value=0)


def _resize(rgb: np.ndarray, spacing: tuple[float, float]) -> Image.Image:
    """Stretch a panel so one millimetre is the same length on both axes."""
    image = Image.fromarray(rgb, mode="RGB")
    smallest = min(spacing)
    rows = max(1, int(round(rgb.shape[0] * spacing[0] / smallest)))
    cols = max(1, int(round(rgb.shape[1] * spacing[1] / smallest)))
    if (rows, cols) != rgb.shape[:2]:
        image = image.resize((cols, rows), resample=Image.NEAREST)
    return image


def render_panels(voided: np.ndarray, output: np.ndarray, mask: np.ndarray, zooms=(1.0, 1.0, 1.0)):
    """The 3x3 grid of panels as PIL images: rows = views, columns = input, output, outline."""
    mask = np.asarray(mask, dtype=bool)
    centre = mask_centre(mask)
    lo, hi = metric_window(voided)
    if hi <= lo:  # flat volume: stretch over its actual range instead
        lo, hi = float(np.min(output)), float(np.max(output))
    rows = []
    for view in VIEWS:
        grey_in = _to_grey(_plane(voided, view, centre), lo, hi)
        grey_out = _to_grey(_plane(output, view, centre), lo, hi)
        edge = _outline(_plane(mask, view, centre))
        rgb_in = np.repeat(grey_in[..., None], 3, axis=2)
        rgb_out = np.repeat(grey_out[..., None], 3, axis=2)
        rgb_edge = rgb_out.copy()
        rgb_edge[edge] = OUTLINE_RGB
        spacing = _spacing(view, zooms)
        rows.append([_resize(p, spacing) for p in (rgb_in, rgb_out, rgb_edge)])
    return rows


def compose(rows) -> Image.Image:
    """Lay out rows of panels on a black canvas, each panel centred in its cell."""
    cell_w = max(p.width for row in rows for p in row)
    heights = [max(p.height for p in row) for row in rows]
    ncols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (ncols * cell_w + (ncols - 1) * GAP, sum(heights) + (len(rows) - 1) * GAP))
    top = 0
    for row, height in zip(rows, heights):
        for col, panel in enumerate(row):
            left = col * (cell_w + GAP) + (cell_w - panel.width) // 2
            canvas.paste(panel, (left, top + (height - panel.height) // 2))
        top += height + GAP
    return canvas


def with_warnings(image: Image.Image, warnings) -> Image.Image:
    """`image` with each warning written under it ("warning: ...", wrapped to its width)."""
    width = max(20, image.width // 5)  # characters of pillow's default font per line
    lines = [row for w in warnings for row in textwrap.wrap(f"warning: {w}", width, subsequent_indent="  ")]
    if not lines:
        return image
    canvas = Image.new("RGB", (image.width, image.height + GAP + LINE_HEIGHT * len(lines)))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, image.height + GAP + LINE_HEIGHT * i), line, fill=WARNING_RGB)
    return canvas


def write_qa_report(data, output_volume: np.ndarray, png_path: Path, warnings=()) -> None:
    """Write the QA PNG of one case atomically (temporary name in the same folder, then rename),
    its `warnings` under the panels."""
    png_path = Path(png_path)
    zooms = (1.0, 1.0, 1.0)
    header = getattr(data, "header", None)
    if header is not None:
        try:
            zooms = tuple(float(z) for z in header.get_zooms()[:3])
        except (AttributeError, ValueError, TypeError):
            pass
        if len(zooms) != 3 or min(zooms) <= 0:
            zooms = (1.0, 1.0, 1.0)
    image = with_warnings(compose(render_panels(data.voided, output_volume, data.mask, zooms)), warnings)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png_path) as tmp:
        image.save(tmp, format="PNG")


def render_comparison(volumes: dict, mask: np.ndarray, window: tuple[float, float], margin: int = 24,
                      scale: int = 2, lesion: Optional[np.ndarray] = None) -> Image.Image:
    """Side-by-side panels, one row per view (axial, coronal, sagittal through the mask's
    centre) and one column per named volume, cut to the mask plus `margin` voxels and enlarged
    `scale` times; the mask outline (and a `lesion`'s, a voided tumour, in its own colour) is
    drawn on the first column only, so every other panel shows its tissue unmarked. Names are
    written above their columns."""
    mask = np.asarray(mask, dtype=bool)
    lesion = np.zeros(mask.shape, bool) if lesion is None else np.asarray(lesion, dtype=bool)
    centre = mask_centre(mask)
    idx = np.argwhere(mask) if mask.any() else np.array([centre])
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = tuple(int(c - a) for c, a in zip(centre, lo))
    rows = []
    for view in VIEWS:
        edge = _outline(_plane(mask[region], view, local))
        tumour = _outline(_plane(lesion[region], view, local))
        row = []
        for i, volume in enumerate(volumes.values()):
            grey = _to_grey(_plane(np.asarray(volume)[region], view, local), *window)
            rgb = np.repeat(grey[..., None], 3, axis=2)
            if i == 0:
                rgb[edge] = OUTLINE_RGB
                rgb[tumour] = LESION_RGB
            image = Image.fromarray(rgb, mode="RGB")
            row.append(image.resize((image.width * scale, image.height * scale), resample=Image.NEAREST))
        rows.append(row)
    grid = compose(rows)
    header = 16
    canvas = Image.new("RGB", (grid.width, grid.height + header))
    canvas.paste(grid, (0, header))
    draw = ImageDraw.Draw(canvas)
    cell = (grid.width + GAP) // len(volumes)
    for i, name in enumerate(volumes):
        draw.text((i * cell + 4, 2), str(name), fill=(255, 255, 255))
    return canvas
