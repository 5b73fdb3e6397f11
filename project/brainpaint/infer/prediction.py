"""What every predictor returns (`Prediction`), the predictor type, and the classical one (the harmonic fill)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.io.brats import CaseData
from brainpaint.stages import Stages


@dataclass
class Prediction:
    volume: np.ndarray  # float32, input intensity scale, full grid; only voxels in the mask are used
    std: Optional[np.ndarray] = None  # float32 uncertainty map (ensembles), or None
    slices: int = 0  # number of slices processed
    # Where the fill fell back on something else (registration, solver, midline), one line each:
    # the batch run prints them in the case's line, the summary and the QA report.
    warnings: list[str] = field(default_factory=list)
    stages: Optional[Stages] = None  # where the case's seconds went (`brainpaint.stages`), if timed


Predictor = Callable[[CaseData, int], Prediction]


def harmonic_predictor(data: CaseData, seed: int) -> Prediction:
    """The classical fill (deterministic; `seed` is unused)."""
    notes: list[str] = []
    stages = Stages()
    with stages.time("harmonic"):
        volume = harmonic_fill(data.voided, data.mask, notes=notes)
    return Prediction(volume=volume, std=None, slices=int(data.mask.any(axis=(0, 1)).sum()), warnings=notes, stages=stages)
