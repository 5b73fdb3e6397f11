"""Sampling noise of the diffusion predictor: per-draw seeds and one noise stream per slice."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (case seed, ensemble member, batch index...)."""
    state = np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % (2**63)


class SliceNoise:
    """Sampling noise drawn slice by slice, so a volume does not depend on how it is batched.

    Every slice draws from its own generator, seeded by (case seed, ensemble member, slice
    key), the key being e.g. (window, z).
    """

    def __init__(self, seed: int, member: int, device: torch.device):
        self.seed, self.member, self.device = seed, member, device

    def for_slices(self, keys) -> Callable[[tuple, Optional[torch.Generator]], torch.Tensor]:
        """The noise function of one batch whose slices have these keys (tuples of ints)."""
        gens = [torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, self.member, 0, *k)) for k in keys]

        def noise_fn(shape, generator=None) -> torch.Tensor:
            return torch.stack([torch.randn(tuple(shape)[1:], generator=g, device=self.device) for g in gens])

        return noise_fn
