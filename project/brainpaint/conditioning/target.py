"""The diffusion target: ground truth <-> diffusion space, one rule for training, preview and inference."""
from __future__ import annotations


def encode_target(gt_norm, b, prior: str):
    """Ground truth in [0, 1] -> diffusion space x0 (numpy arrays or torch tensors).

    "none": the whole slice mapped to [-1, 1] (the paper). "harmonic": twice the residual
    over the fill, which is zero outside the mask because there `b` equals the ground truth.
    """
    if prior == "none":
        return 2 * gt_norm - 1
    return 2 * (gt_norm - b)


def decode_sample(x0, b, prior: str):
    """Inverse of `encode_target`: diffusion-space sample -> normalised image clipped to [0, 1]."""
    if prior == "none":
        out = (x0 + 1) / 2
    else:
        out = b + x0 / 2
    return out.clip(0, 1)


def clip_bound(prior: str) -> float:
    """Bound of the predicted x0 while sampling: the whole slice in [-1, 1] ("none"), or twice a
    residual over the fill in [-2, 2] ("harmonic"). One rule for inference and validation."""
    return 1.0 if prior == "none" else 2.0
