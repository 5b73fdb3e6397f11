"""Diffusion predictor for one volume: all masked slices sampled in batches, then ensembled.

`DiffusionInpainter(cfg)` is the predictor `batch.run_infer` calls once per case:
`inpainter(data, seed) -> Prediction`. It is built once per run (weights, network, diffusion)
and is stateless between cases, so one bad case cannot affect the next.

Per case:
1. `dataset.volume_inputs` normalises the voided volume with the metric's own percentile map
   (so the network's [0, 1] is the metric's [0, 1]) and builds the prior-filled `b` channel.
2. An in-plane box is chosen once per volume (whole slices, or a crop around the mask) so every
   slice of the volume has the same size and they can be stacked into batches.
3. Every axial slice that contains mask voxels is conditioned and denoised; slices go through
   the network `infer.batch_slices` at a time (not one by one), under `torch.inference_mode`
   and, on CUDA, bf16 autocast.
4. `infer.ensemble` independent samples are averaged (the challenge metrics reward the
   conditional mean); their standard deviation is returned as an uncertainty map.
5. An optional Gaussian post-filter smooths the in-mask result, then the volume is mapped back
   to the input intensity scale. `batch.py` restores every known voxel bit-exactly.

The same weights serve both samplers: `ddpm` with 1000 steps is the paper-faithful ancestral
path; `ddim` (or respaced `ddpm`) with few steps is the fast default.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from scipy import ndimage

from . import geometry
from .config import Config
from .devices import select_device
from .errors import InferenceSetupError

# Where the shipped weights live (repo checkout and MLCube workspace alike); overridable by
# `infer.weights` / `--weights`, or the BRAINPAINT_WEIGHTS environment variable.
WEIGHTS_ENV = "BRAINPAINT_WEIGHTS"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "workspace" / "additional_files" / "model.safetensors"


# --------------------------------------------------------------------------- set-up helpers
def resolve_weights(setting: Optional[str | os.PathLike]) -> Path:
    """The weights file to load: the explicit setting, else $BRAINPAINT_WEIGHTS, else the default.

    A folder is accepted when it holds `model.safetensors` or exactly one `*.safetensors` file,
    so `--weights workspace/additional_files` works as well as the file itself.
    """
    if setting:
        path = Path(setting)
    elif os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV])
    else:
        path = DEFAULT_WEIGHTS
    if path.is_dir():
        preferred = path / "model.safetensors"
        found = [preferred] if preferred.is_file() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise InferenceSetupError(
                f"weights folder {path} must hold model.safetensors or exactly one *.safetensors file"
            )
        path = found[0]
    if not path.is_file():
        raise InferenceSetupError(
            f"weights file not found: {path} (set infer.weights, --weights or ${WEIGHTS_ENV})"
        )
    return path


def resolve_device(setting: str) -> torch.device:
    """The inference device (`devices.select_device`), saying so when `auto` falls back to the CPU."""
    return select_device(setting, announce=True)


def size_multiple(model_cfg) -> int:
    """In-plane sizes the U-Net accepts are multiples of 2**(levels-1)."""
    from .unet import resolve_architecture

    return 2 ** (len(resolve_architecture(model_cfg)["channel_mult"]) - 1)


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
    """

    def __init__(self, rho: float, seed: int, device: torch.device):
        self.rho = float(rho)
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


# --------------------------------------------------------------------------- the predictor
class DiffusionInpainter:
    """Predictor `(data: CaseData, seed: int) -> Prediction` backed by a trained diffusion model.

    The network, diffusion schedule and data transform (prior, crop size, slice size, context
    slices) come from the weights file's own metadata, so a weights file always runs with the
    settings it was trained with; the sampling settings come from `cfg.infer`.
    """

    def __init__(self, cfg: Config):
        from . import diffusion as diffusion_mod
        from .train import load_model

        self.cfg = cfg
        self.infer = cfg.infer
        self.device = resolve_device(self.infer.device)
        self.weights = resolve_weights(self.infer.weights)
        try:
            self.model, self.model_cfg = load_model(self.weights, self.device)
        except InferenceSetupError:
            raise
        except Exception as exc:  # corrupt file, wrong metadata: one clear line
            raise InferenceSetupError(f"cannot load weights {self.weights}: {exc}") from exc
        self.model.eval()
        self.diffusion = diffusion_mod.GaussianDiffusion(self.model_cfg.diffusion)
        self.data_cfg = self.model_cfg.data
        self.context = self.model_cfg.model.context_slices
        self.multiple = size_multiple(self.model_cfg.model)

    # ------------------------------------------------------------------ geometry
    def slice_box(self, data) -> tuple[slice, slice]:
        """One in-plane box for the whole volume, so all slices stack into batches.

        Whole-slice models get the `data.slice_size` window holding the brain; crop models a
        box around the mask grown by `infer.crop_margin`. Where the grid is smaller than the
        network patch (or not a multiple of the U-Net's downsampling factor), the box is
        extended past the high end of the grid; `slice_conditioning` fills that part with
        zeros (background), as `geometry.crop` pads training patches, and `geometry.paste` ignores it.
        """
        mask = np.asarray(data.mask, dtype=bool)
        if self.data_cfg.crop_size is None:
            size = self.data_cfg.slice_size
            brain = (np.asarray(data.voided) != 0) | mask
            box = geometry.full_slice_box(brain, size=size, case_id=data.id)
        else:
            size = self.data_cfg.crop_size
            box = geometry.mask_box(
                mask, min_size=size, multiple=self.multiple, margin=self.infer.crop_margin, shape=mask.shape
            )
        h, w = geometry.patch_shape(box, size=size, multiple=self.multiple)
        return slice(box[0].start, box[0].start + h), slice(box[1].start, box[1].start + w)

    # ------------------------------------------------------------------ sampling
    def _autocast_dtype(self) -> Optional[torch.dtype]:
        """bf16 for the network on CUDA (the diffusion arithmetic stays float32); never on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" and self.infer.bf16 else None

    def sample_slices(self, cond: np.ndarray, seed: int, member: int) -> np.ndarray:
        """Denoise a stack of conditioned slices [N, C, H, W] -> x0 [N, H, W] (diffusion space)."""
        from .dataset import encode_target

        inf = self.infer
        n = cond.shape[0]
        batch = inf.batch_slices or n
        rho = inf.noise_correlation
        shared = CorrelatedNoise(rho, derive_seed(seed, member, 1), self.device) if rho > 0 else None
        prior = self.data_cfg.prior
        out = np.empty((n,) + cond.shape[2:], dtype=np.float32)
        for index, start in enumerate(range(0, n, batch)):
            chunk = torch.from_numpy(np.ascontiguousarray(cond[start : start + batch])).to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(derive_seed(seed, member, 0, index))
            known = known_mask = None
            if inf.repaint:
                b, m = chunk[:, 0:1], chunk[:, 1:2]
                known = encode_target(b, b, prior)
                known_mask = 1.0 - m
            x0 = self.diffusion.sample(
                self.model,
                chunk,
                sampler=inf.sampler,
                steps=inf.steps,
                eta=inf.eta,
                generator=generator,
                noise_fn=shared.for_batch() if shared is not None else None,
                known=known,
                known_mask=known_mask,
                # x0 is the whole slice in [-1, 1] ("none") or twice a residual in [-2, 2].
                clip_denoised=True if prior == "none" else 2.0,
                progress=False,
                autocast=self._autocast_dtype(),
                temperature=inf.temperature,
            )
            out[start : start + len(chunk)] = x0.float().reshape(len(chunk), *cond.shape[2:]).cpu().numpy()
        return out

    # ------------------------------------------------------------------ one case
    def conditioning(self, data):
        """(slice indices, VolumeInputs, box, conditioning [N, C, H, W]) of every masked slice."""
        from .brats_io import CaseError
        from .dataset import slice_conditioning, volume_inputs

        mask = np.asarray(data.mask, dtype=bool)
        zs = [int(z) for z in np.flatnonzero(mask.any(axis=(0, 1)))]
        if not zs:
            raise CaseError(data.id, "mask is empty: nothing to inpaint")
        vin = volume_inputs(data.voided, mask, self.data_cfg)
        box = self.slice_box(data)
        cond = np.stack([slice_conditioning(vin, z, box, self.context) for z in zs]).astype(np.float32, copy=False)
        return zs, vin, box, cond

    @torch.inference_mode()
    def __call__(self, data, seed: int):
        from .batch import Prediction
        from .dataset import decode_sample

        mask = np.asarray(data.mask, dtype=bool)
        zs, vin, box, cond = self.conditioning(data)
        b_crops = cond[:, 0]

        # Normalised volume: known voxels from the voided image; each member fills the mask.
        base = vin.imap.normalize(data.voided)
        members = np.empty((self.infer.ensemble, int(mask.sum())), dtype=np.float32)
        for k in range(members.shape[0]):
            x0 = self.sample_slices(cond, seed, k)
            filled = base.copy()
            images = decode_sample(x0, b_crops, self.data_cfg.prior)
            for i, z in enumerate(zs):
                geometry.paste(np.asarray(images[i], dtype=np.float32), box, filled[:, :, z], where=mask[:, :, z])
            members[k] = filled[mask]

        mean = base.copy()
        mean[mask] = members.mean(axis=0)
        mean = smooth_in_mask(mean, mask, self.infer.smoothing_sigma, self.infer.smoothing_border)
        volume = np.array(data.voided, dtype=np.float32, copy=True)
        volume[mask] = vin.imap.denormalize(np.clip(mean[mask], 0.0, 1.0))
        std = None
        if members.shape[0] > 1:
            std = np.zeros(mask.shape, dtype=np.float32)
            std[mask] = members.std(axis=0) * np.float32(vin.imap.hi - vin.imap.lo)
        return Prediction(volume=volume, std=std, slices=len(zs))


def smooth_in_mask(volume: np.ndarray, mask: np.ndarray, sigma: float, border: int) -> np.ndarray:
    """Gaussian-filter `volume` and keep the filtered values only inside the mask dilated by `border`.

    Sampled slices are independent 2D draws; a light 3D filter (sigma 1.075 in the paper)
    removes slice-to-slice flicker and pulls the fill towards the conditional mean. Outside the
    region the volume is untouched. Only the bounding box of the region (plus the kernel radius)
    is filtered, which gives the same values as filtering the whole volume at a fraction of
    the cost.
    """
    if sigma <= 0:
        return volume
    region = ndimage.binary_dilation(mask, iterations=border) if border > 0 else mask
    if not region.any():
        return volume
    radius = int(4.0 * sigma + 0.5)  # scipy's kernel radius for truncate=4
    idx = np.argwhere(region)
    lo = np.maximum(idx.min(0) - radius, 0)
    hi = np.minimum(idx.max(0) + radius + 1, volume.shape)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    filtered = ndimage.gaussian_filter(volume[sub].astype(np.float32), sigma=sigma, truncate=4.0)
    out = volume.copy()
    view = out[sub]
    view[region[sub]] = filtered[region[sub]]
    return out
