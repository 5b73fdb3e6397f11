"""Exponential moving average of the network's weights: what inference uses."""
from __future__ import annotations

import torch
from torch import nn

from brainpaint.errors import TrainError


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied as they are).

    Kept in float32 on the model's device, updated after every optimizer step with
    `ema = decay * ema + (1 - decay) * param`; this is what inference uses.

    With `warmup`, the decay after n updates is `min(rate, (1 + n) / (10 + n))`: early on the
    average follows the network closely, so it never holds a large share of the initial
    weights. Without it, a 0.999 average is still 37 % initialisation after 1,000 steps, and
    since the U-Net's output convolutions start at zero, that shrinks every prediction.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = True):
        self.rate = rate
        self.warmup = warmup
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._param_names = [n for n, _ in model.named_parameters()]

    def decay(self, updates_done: int) -> float:
        if not self.warmup:
            return self.rate
        return min(self.rate, (1.0 + updates_done) / (10.0 + updates_done))

    @torch.no_grad()
    def update(self, model: nn.Module, updates_done: int | None = None) -> None:
        """One EMA step; `updates_done` (the training step before this update) drives the warm-up."""
        decay = self.rate if updates_done is None else self.decay(updates_done)
        params = dict(model.named_parameters())
        ema = [self.state[n] for n in self._param_names]
        cur = [params[n].detach().float() for n in self._param_names]
        torch._foreach_lerp_(ema, cur, 1.0 - decay)
        for name, buf in model.named_buffers():
            self.state[name].copy_(buf)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) ^ set(tensors)
        if missing:
            raise TrainError(f"EMA weights do not match the network (differing keys: {sorted(missing)[:3]})")
        for k, v in tensors.items():
            self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.state.items()})
