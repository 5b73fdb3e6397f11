"""The diffusion predictor under the module name it had before `predictors/` (kept for scripts).

Nothing in the package imports this module; see `predictors`, `weights`, `noise`, `smoothing`.
"""
from .errors import InferenceSetupError
from .noise import CorrelatedNoise, derive_seed
from .predictors.diffusion import DiffusionInpainter
from .smoothing import smooth_in_mask
from .weights import DEFAULT_WEIGHTS, WEIGHTS_ENV, resolve_weights

__all__ = [
    "DEFAULT_WEIGHTS", "WEIGHTS_ENV", "CorrelatedNoise", "DiffusionInpainter", "InferenceSetupError",
    "derive_seed", "resolve_weights", "smooth_in_mask",
]
