"""train_log.csv: one row per log interval and per validation, written by rank 0."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .atomic import atomic_write

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
