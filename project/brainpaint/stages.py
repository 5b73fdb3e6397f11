"""Per-case stage timing: where the seconds of one case go.

A `Stages` collects wall-clock seconds by stage name (`with stages.time("harmonic"): ...`) and
counts of work done (`stages.count("windows", n)`). One is made per case; the stages of
inference are, in order, `STAGES`: reading the case, the intensity map, the harmonic fills,
the midline, the atlas registration, the conditioning (placing the atlas, cutting each slice's
network inputs), the network (with the slice windows and forward passes it ran), and writing
the prediction (and the QA report, where one is asked for). `line()` says them in one line,
`as_dict()` gives them to a report. A stage may be timed many times; its seconds add up.

It sits below every layer (like `errors`) so that the conditioning code, the predictors and
the batch runner can all time their part of the same case.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

STAGES = ("load", "intensity", "harmonic", "midline", "registration", "conditioning", "network", "write")
COUNTS = ("windows", "passes")  # slice windows the network filled, forward passes it ran


class Stages:
    """Seconds by stage and counts of one case (see the module doc)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @staticmethod
    def of(stages: Optional["Stages"]) -> "Stages":
        """`stages`, or a new one that nobody reads (callers that do not time anything)."""
        return stages if stages is not None else Stages()

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        """Add the wall seconds of the `with` block to stage `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def merge(self, other: Optional["Stages"]) -> "Stages":
        """Add the seconds and counts of `other` to these; returns self."""
        if other is not None:
            for name, seconds in other.seconds.items():
                self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            for name, n in other.counts.items():
                self.count(name, n)
        return self

    def names(self) -> list[str]:
        """The stages timed: those of `STAGES` in their order, then any other in the order timed."""
        return [s for s in STAGES if s in self.seconds] + [s for s in self.seconds if s not in STAGES]

    def line(self) -> str:
        """'load 0.41, intensity 0.12, ..., network 3.10 (180 windows, 23 passes), write 0.30 s'."""
        parts = []
        for name in self.names():
            part = f"{name} {self.seconds[name]:.2f}"
            if name == "network" and self.counts:
                part += " (" + ", ".join(f"{self.counts[c]} {c}" for c in COUNTS if c in self.counts) + ")"
            parts.append(part)
        return ", ".join(parts) + " s" if parts else "no stages timed"

    def as_dict(self) -> dict:
        """{"seconds": {stage: s}, "counts": {name: n}} with the stages in `names()` order."""
        return {"seconds": {n: round(self.seconds[n], 4) for n in self.names()}, "counts": dict(self.counts)}
