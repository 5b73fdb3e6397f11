"""Training intensity augmentation: a gamma and smooth bias fields, as another scanner would give."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class IntensityAugmentation:
    """One draw of the training intensity augmentation: a gamma and smooth bias fields.

    A field is exp of a quadratic polynomial over the patch (5 coefficients). The target and
    the slice's own channels share one field; the mirrored channels get their own, since
    scanner shading is not left-right symmetric.
    """

    gamma: float = 1.0
    field: Optional[tuple[float, ...]] = None
    mirror_field: Optional[tuple[float, ...]] = None

    @classmethod
    def draw(cls, rng: random.Random, data_cfg) -> "IntensityAugmentation":
        gamma = math.exp(rng.gauss(0.0, data_cfg.gamma_aug)) if data_cfg.gamma_aug > 0 else 1.0
        coefficients = lambda: tuple(rng.gauss(0.0, data_cfg.bias_aug) for _ in range(5))  # noqa: E731
        field = coefficients() if data_cfg.bias_aug > 0 else None
        mirror_field = coefficients() if (data_cfg.bias_aug > 0 and data_cfg.mirror) else None
        return cls(gamma, field, mirror_field)

    @staticmethod
    def _field(coefficients, shape) -> np.ndarray:
        u = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
        v = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
        terms = (u, v, u * u, v * v, u * v)
        return np.exp(sum(np.float32(c) * term for c, term in zip(coefficients, terms))).astype(np.float32)

    def _image(self, image: np.ndarray, coefficients) -> np.ndarray:
        out = np.power(np.clip(image, 0.0, 1.0), self.gamma) if self.gamma != 1.0 else image
        if coefficients is not None:
            out = out * self._field(coefficients, image.shape)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def apply(self, cond: np.ndarray, gt: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray]:
        """Augmented copies of the conditioning and target. Only the image channels of `layout`
        (`conditioning.layout.InputLayout`) change: masks and the atlas residual, the
        population's and not this scan's, stay as they are."""
        cond = cond.copy()
        for name in layout.image_channels():
            c = layout.index(name)
            cond[c] = self._image(cond[c], self.mirror_field if name == "b~" else self.field)
        return cond, self._image(gt, self.field)
