"""Tiny synthetic BraTS-layout cases for tests (no real data needed).

`make_brain` draws a smooth ellipsoidal "brain" with a few tissue-like intensity bands;
`write_case` writes one case folder in the BraTS 2023 inpainting layout.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SMALL_SHAPE = (48, 48, 20)


def make_brain(shape=SMALL_SHAPE, seed: int = 0, scale: float = 1000.0) -> np.ndarray:
    """A float32 volume: zero background, textured ellipsoid inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.9) ** 2)
    inside = r < 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    texture = texture / (np.abs(texture).max() + 1e-8)
    vol = (0.55 + 0.25 * np.cos(6 * r) + 0.15 * texture) * inside
    return (np.clip(vol, 0, None) * scale).astype(np.float32)


def make_mask(shape=SMALL_SHAPE, centre=None, radius: float = 5.0) -> np.ndarray:
    """A binary ball (uint8)."""
    centre = np.array(centre if centre is not None else [s // 2 for s in shape])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    return (dist <= radius).astype(np.uint8)


def default_affine() -> np.ndarray:
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[:3, 3] = [0.0, 239.0, 0.0]
    return aff


def save(array: np.ndarray, path: Path, affine=None, dtype=None) -> Path:
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), default_affine() if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def write_case(
    root: Path,
    case_id: str = "BraTS-GLI-00001-000",
    shape=SMALL_SHAPE,
    seed: int = 0,
    labels: bool = True,
    dtype=np.int16,
    affine=None,
    radius: float = 5.0,
    centre=None,
) -> Path:
    """Write `<root>/<case_id>/` with voided image and mask (plus t1n and masks when labels)."""
    folder = Path(root) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    brain = make_brain(shape, seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        brain = np.round(brain)
    mask = make_mask(shape, centre=centre, radius=radius)
    voided = brain * (1 - mask)
    save(voided, folder / f"{case_id}-t1n-voided.nii.gz", affine, dtype)
    save(mask, folder / f"{case_id}-mask.nii.gz", affine, np.uint8)
    if labels:
        save(brain, folder / f"{case_id}-t1n.nii.gz", affine, dtype)
        save(mask, folder / f"{case_id}-mask-healthy.nii.gz", affine, np.uint8)
        save(np.zeros(shape, np.uint8), folder / f"{case_id}-mask-unhealthy.nii.gz", affine, np.uint8)
    return folder


def load_benchmark(name: str):
    """The module of `benchmarks/<name>.py` (the benchmark scripts are no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_weights(path, *, slice_size: int = 48, crop_size=None, prior: str = "none", context_slices: int = 0,
                 seed: int = 0, mirror: bool = False, prediction: str = "eps",
                 atlas=None, atlas_fit: str = "box") -> Path:
    """A randomly initialised `tiny` U-Net in the weights-file format (self-describing metadata),
    so it loads exactly like trained weights: whole `slice_size` slices, or `crop_size` crops.
    `atlas` (an `atlas.ATLAS_SHAPE` array) makes a network with the atlas channel holding it."""
    import torch  # only the tests that need a network pay for torch
    from safetensors.torch import save_file

    from brainpaint.config.settings import Config, model_config_yaml
    from brainpaint.model.unet import build_unet
    from brainpaint.conditioning.layout import network_channels

    cfg = Config.from_dict(
        {
            "model": {"preset": "tiny", "context_slices": context_slices, "atlas": atlas is not None},
            "diffusion": {"prediction": prediction},
            "data": {"slice_size": slice_size, "crop_size": crop_size, "prior": prior, "mirror": mirror,
                     "atlas_fit": atlas_fit},
        }
    )
    torch.manual_seed(seed)
    model = build_unet(cfg.model, *network_channels(cfg))
    with torch.no_grad():  # zero-initialised output layers would make the network ignore x_t
        for p in model.parameters():
            if not p.detach().abs().sum():
                p.normal_(0.0, 0.05)
        if atlas is not None:
            model.atlas.copy_(torch.as_tensor(np.asarray(atlas, np.float32)))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"config": model_config_yaml(cfg)})
    return Path(path)
