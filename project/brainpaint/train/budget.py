"""A training run's budget: steps and CPU time, and the learning rate that follows it.

`train.max_cpu_minutes` stops a run once its training process has used that much CPU time (all
threads, counted across resumes: the checkpoint keeps the total), so runs with costlier steps
take fewer of them: the fair way to compare recipes on a shared machine, where wall time
depends on everything else running. The share of the budget used, the larger of step /
max_steps and CPU time / max_cpu_minutes, drives `train.lr_schedule`: "constant", "linear"
(decay to 0 at the end of the budget, the budget-aware schedule of Li et al. 2020) or
"cosine", after `train.warmup_steps` steps of linear warm-up.
"""
from __future__ import annotations

import math
import time


class Budget:
    """CPU time used by a run (`cpu_before` from earlier invocations) and its schedule."""

    def __init__(self, tc, cpu_before: float = 0.0):
        self.tc = tc
        self.cpu_before = float(cpu_before)
        self._start = time.process_time()

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self._start

    def progress(self, step: int) -> float:
        """Share of the budget used, in [0, 1]."""
        shares = [step / max(1, self.tc.max_steps)]
        if self.tc.max_cpu_minutes:
            shares.append(self.cpu_seconds() / (60.0 * self.tc.max_cpu_minutes))
        return min(1.0, max(shares))

    def lr_factor(self, step: int) -> float:
        """Multiplier of `train.lr` for the step about to be taken (`step` taken so far)."""
        tc = self.tc
        warm = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else 1.0
        p = self.progress(step)
        decay = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}.get(tc.lr_schedule, 1.0)
        return warm * decay

    def set_lr(self, optimizer, step: int) -> None:
        factor = self.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = self.tc.lr * factor

    def cpu_spent(self) -> bool:
        return self.tc.max_cpu_minutes is not None and self.cpu_seconds() >= 60.0 * self.tc.max_cpu_minutes
