"""train_log.csv: one row per log interval and per validation, written by rank 0."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional

from brainpaint.io.atomic import atomic_write

LOG_NAME = "train_log.csv"
LOG_FIELDS = ["step", "time_s", "loss", "mse", "vb", "lr", "it_per_s", "slices_per_s", "val_ssim", "val_psnr"]


class CsvLog:
    """Append-only CSV of training progress (rank 0 only)."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                # Rows past the checkpoint belong to steps that are trained again now.
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with atomic_write(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows([{k: r.get(k, "") for k in LOG_FIELDS} for r in rows])

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Progress:
    """Running means of the loss terms between log rows, and the throughput, for the CSV log."""

    def __init__(self, log: Optional[CsvLog], slices_per_step: int):
        self.log = log  # None on ranks other than 0
        self.slices_per_step = slices_per_step
        self.sums = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        self.since, self.t_last = 0, time.monotonic()
        self.t_start = time.monotonic()

    def add(self, terms: dict) -> None:
        self.since += 1
        for key in self.sums:  # summed on the device: no host sync per step
            if terms.get(key) is not None:
                self.sums[key] = self.sums[key] + terms[key].detach().float().mean()

    def write(self, step: int, lr: float) -> float:
        """One row with the means since the last row; returns the mean loss."""
        now = time.monotonic()
        rate = self.since / max(now - self.t_last, 1e-9)
        means = {k: float(v) / self.since for k, v in self.sums.items()}
        self.log.write(
            step=step, time_s=round(now - self.t_start, 3), loss=means["loss"], mse=means["mse"], vb=means["vb"],
            lr=lr, it_per_s=rate, slices_per_s=rate * self.slices_per_step,
        )
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.since, self.t_last = 0, now
        return means["loss"]

    def write_validation(self, step: int, ssim: float, psnr: float) -> None:
        self.log.write(step=step, time_s=round(time.monotonic() - self.t_start, 3), val_ssim=ssim, val_psnr=psnr)
