"""Sampling noise of the diffusion predictor: per-draw seeds and noise shared across slices."""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (case seed, ensemble member, batch index...)."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % (2**63)


class CorrelatedNoise:
    """Diffusion noise partly shared by all slices of one volume.

    noise = sqrt(rho) * shared + sqrt(1 - rho) * independent, with `shared` one [1, 1, H, W]
    field per sampling step, identical for every slice. Each batch of slices replays the same
    shared sequence (a fresh generator with the same seed per batch), so slices in different
    batches see a consistent field: the result does not depend on how slices are batched.
    Correlated noise across neighbouring slices reduces slice-to-slice flicker ("stripes").
    `rho` is `infer.noise_correlation`, in [0, 1].
    """

    def __init__(self, rho: float, seed: int, device: torch.device):
        self.rho = rho
        self.seed = seed
        self.device = device

    def for_batch(self) -> Callable[[tuple, Optional[torch.Generator]], torch.Tensor]:
        shared_gen = torch.Generator(device=self.device).manual_seed(self.seed)
        a, b = math.sqrt(self.rho), math.sqrt(1.0 - self.rho)

        def noise_fn(shape, generator=None) -> torch.Tensor:
            shape = tuple(shape)
            shared = torch.randn((1, *shape[1:]), generator=shared_gen, device=self.device)
            if b == 0.0:
                return shared.expand(shape).clone()
            own = torch.randn(shape, generator=generator, device=self.device)
            return a * shared + b * own

        return noise_fn


class SliceNoise:
    """Sampling noise drawn slice by slice, so a volume does not depend on how it is batched.

    Every slice draws from its own generator, seeded by (case seed, ensemble member, slice
    key), the key being e.g. (window, z). With `rho` > 0 (`infer.noise_correlation`) a shared
    field is mixed in as in `CorrelatedNoise`: one [1, 1, H, W] draw per sampling step from a
    generator that every batch replays from the same seed.
    """

    def __init__(self, seed: int, member: int, rho: float, device: torch.device):
        self.seed, self.member, self.rho, self.device = seed, member, rho, device

    def for_slices(self, keys) -> Callable[[tuple, Optional[torch.Generator]], torch.Tensor]:
        """The noise function of one batch whose slices have these keys (tuples of ints)."""
        gens = [torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.member, 0, *k)) for k in keys]
        shared_gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.member, 1))
        a, b = math.sqrt(self.rho), math.sqrt(1.0 - self.rho)

        def noise_fn(shape, generator=None) -> torch.Tensor:
            shape = tuple(shape)
            shared = torch.randn((1, *shape[1:]), generator=shared_gen, device=self.device) if a > 0 else None
            if b == 0.0:
                return shared.expand(shape).clone()
            own = torch.stack([torch.randn(shape[1:], generator=g, device=self.device) for g in gens])
            return own if shared is None else a * shared + b * own

        return noise_fn
