"""Validation during training: a few fixed slices sampled from the EMA weights, scored and shown.

Every `train.val_every` steps rank 0 samples `train.val_slices` fixed slices exactly as
inference samples slices (`diffusion.sampling.sample_slices` with the run's `infer` settings,
by default the shipped sampler: one DDIM step from x_T = 0 at temperature 0, averaged with the
mirrored slice's fill), so the scores in `train_log.csv` are those of the fills users get. It
writes a PNG grid (b | m | sample | ground truth, one row per slice) to
`<run>/validation/step_XXXXXXXX.png` and returns in-mask SSIM and PSNR for `train_log.csv`.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from brainpaint.conditioning.layout import InputLayout
from brainpaint.conditioning.target import decode_sample
from brainpaint.config.settings import Config
from brainpaint.diffusion.sampling import run_settings, sample_slices
from brainpaint.errors import TrainError
from brainpaint.io.atomic import atomic_write
from brainpaint.train.checkpoints import STEP_PREFIX


def masked_ssim_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """In-mask SSIM and PSNR of 2D slices in [0, 1], shaped [B, 1, H, W].

    Modelled on the official metric, per slice: both images are zeroed outside the mask, the
    SSIM map of the whole slice is averaged over the mask voxels, and PSNR uses the mask voxels
    with the fixed data range 1 (the official `psnr_01`).
    """
    inside = mask.float().cpu() > 0.5
    pred, target = pred.float().cpu() * inside, target.float().cpu() * inside
    _, ssim_map = structural_similarity_index_measure(pred, target, data_range=1.0, return_full_image=True)
    ssim = float(ssim_map[inside].mean())
    mse = float(((pred - target)[inside] ** 2).mean())
    psnr = 10.0 * math.log10(1.0 / max(mse, 1e-12))
    return ssim, psnr


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # Volumes are [x, y]: show y upwards, x left-right, as viewers display axial slices.
    return (np.clip(image, 0, 1).T[::-1] * 255 + 0.5).astype(np.uint8)


def write_grid_png(rows: list[list[np.ndarray]], path: Path) -> None:
    """One row per slice: b | m | sample | ground truth, written atomically with pillow."""
    pad = 2
    h, w = rows[0][0].shape[1], rows[0][0].shape[0]
    grid = np.zeros((len(rows) * (h + pad) - pad, len(rows[0]) * (w + pad) - pad), np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = _to_uint8(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(grid).save(tmp)


class Validator:
    """Samples a few fixed slices from the EMA weights as inference would, and scores them."""

    def __init__(self, dataset, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.layout = InputLayout.of(cfg)
        # What inference runs: the `infer` settings, with more steps for eps-prediction weights.
        self.settings = run_settings(cfg.infer, cfg.diffusion.prediction, "infer.steps" in cfg.explicit)
        if self.settings.steps > cfg.diffusion.steps:
            raise TrainError(f"infer.steps ({self.settings.steps}), which validation samples with as inference does, "
                             f"must be <= diffusion.steps ({cfg.diffusion.steps})")
        samples = [dataset.sample(pair, random.Random(0), augment=False) for pair in self.pick(dataset, cfg.train.val_slices)]
        self.cond = torch.stack([s["cond"] for s in samples]) if samples else None
        self.x0 = torch.stack([s["x0"] for s in samples]) if samples else None

    @staticmethod
    def pick(dataset, n: int) -> list[tuple[int, int]]:
        """`n` fixed pairs spread over the volumes, central mask slices first (edge slices of a
        mask hold only a few voxels and say little)."""
        by_unit: dict[int, list[tuple[int, int]]] = {}
        for pair in dataset.pairs:
            by_unit.setdefault(pair[0], []).append(pair)
        # Per unit: its slices ordered by distance from the unit's central slice.
        ordered = [sorted(p, key=lambda q: abs(q[1] - p[len(p) // 2][1])) for p in by_unit.values()]
        picks: list[tuple[int, int]] = []
        depth = 0
        while len(picks) < n and any(depth < len(o) for o in ordered):
            level = [o[depth] for o in ordered if depth < len(o)]
            take = min(n - len(picks), len(level))
            picks += [level[i] for i in np.linspace(0, len(level) - 1, take).round().astype(int)]
            depth += 1
        return picks

    @torch.no_grad()
    def run(self, model: nn.Module, diffusion, step: int, out_dir: Path) -> Optional[tuple[float, float]]:
        if self.cond is None:
            return None
        prior = self.cfg.data.prior
        x0 = sample_slices(diffusion, model, self.cond.numpy(), self.settings, prior, self.device, seed=0)
        b = self.cond[:, [self.layout.index("b")]]
        sample = decode_sample(torch.from_numpy(x0)[:, None], b, prior)
        truth = decode_sample(self.x0, b, prior)
        mask = self.cond[:, [self.layout.index("m")]]
        ssim, psnr = masked_ssim_psnr(sample, truth, mask)
        # Show the sample as inference writes it: generated inside the mask, known tissue outside.
        shown = mask * sample + (1 - mask) * truth
        rows = [[b[i, 0].numpy(), mask[i, 0].numpy(), shown[i, 0].numpy(), truth[i, 0].numpy()] for i in range(len(b))]
        write_grid_png(rows, Path(out_dir) / "validation" / f"{STEP_PREFIX}{step:08d}.png")
        return ssim, psnr
