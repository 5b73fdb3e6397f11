"""One configuration object for CLI, MLCube and tests.

Every setting has a default here; a YAML file overrides any subset of it, section by
section (`model`, `diffusion`, `data`, `train`, `infer`, `evaluate`). Unknown keys are an
error, so a typo in a parameters file never passes silently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .atomic import write_text
from .errors import ConfigError


@dataclass
class ModelConfig:
    # Named architecture preset (see brainpaint.unet.PRESETS): "paper", "small", "tiny".
    preset: str = "small"
    # Optional overrides of single preset fields (None keeps the preset's value).
    base_channels: Optional[int] = None
    channel_mult: Optional[list[int]] = None
    num_res_blocks: Optional[int] = None
    attention_downsample: Optional[list[int]] = None
    num_heads: Optional[int] = None
    dropout: Optional[float] = None
    # Neighbouring voided slices (and their masks) given as extra input (2.5D): 0 = plain 2D.
    context_slices: int = 0


@dataclass
class DiffusionConfig:
    steps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True  # output [eps, v] and train with the hybrid loss
    lambda_vlb: float = 1e-3  # weight of the VB term in the hybrid loss (improved DDPM)


@dataclass
class DataConfig:
    # Network slice size: the 240x240 grid is cropped to 224x224 (background only).
    slice_size: int = 224
    # Train/infer on square crops around the mask instead of whole slices (None = whole slices).
    crop_size: Optional[int] = None
    # Conditioning prior inside the mask: "none" (voided, the paper) or "harmonic"
    # (the model learns the residual over a 3D harmonic fill).
    prior: str = "none"
    flip_prob: float = 0.5
    # Extra procedurally generated healthy masks per training brain (0 = only mask-healthy).
    extra_masks_per_volume: int = 0
    num_workers: int = 0
    cache_volumes: int = 16  # decoded volumes kept per loader worker


@dataclass
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    ema_rate: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_rate, (1+n)/(10+n)) after n updates
    grad_clip: Optional[float] = 1.0
    max_steps: int = 100_000
    max_minutes: Optional[float] = None  # stop (with a checkpoint) after this wall time
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    val_every: int = 2000
    val_slices: int = 4
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"  # "auto" (this rank's GPU when available, else CPU), "cpu", "cuda:N"
    val_steps: int = 20  # DDIM steps when sampling the validation slices
    # Warm start: an exported weights file whose network is the one configured here; a fresh
    # run (no checkpoint to resume) starts its model and EMA from it, with a new optimizer.
    init_weights: Optional[str] = None


@dataclass
class InferConfig:
    sampler: str = "ddim"  # "ddpm" (ancestral, any respacing), "ddim" or "dpm2m" (2nd-order ODE solver)
    steps: int = 50  # 1000 with sampler=ddpm is the paper-faithful path
    eta: float = 0.0
    ensemble: int = 1  # samples averaged per case
    batch_slices: int = 16  # slices per network batch; 0 = all masked slices of a volume at once
    crop_margin: int = 16  # voxels around the mask kept in the in-plane crop (models trained with data.crop_size)
    smoothing_sigma: float = 1.075  # 0 disables the Gaussian post-filter
    smoothing_border: int = 2  # voxels around the mask that the filter may touch
    repaint: bool = False  # RePaint-style known-region x_t mixing during sampling
    noise_correlation: float = 0.0  # 0..1 share of noise shared across neighbouring slices
    temperature: float = 1.0  # scale of the sampler's noise; 0 with ddim = deterministic mean-seeking path
    bf16: bool = True  # autocast on CUDA only
    seed: int = 0
    weights: Optional[str] = None  # safetensors file; None = the workspace's shipped weights
    method: str = "diffusion"  # "diffusion" or "harmonic" (classical fill, no network)
    device: str = "auto"


@dataclass
class EvaluateConfig:
    stripe_index: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        cfg = cls()
        if not data:
            return cfg
        if not isinstance(data, dict):
            raise ConfigError("parameters must be a mapping of sections")
        for section, values in data.items():
            if section not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"unknown parameters section '{section}'")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' must be a mapping")
            sub = getattr(cfg, section)
            known = {f.name for f in dataclasses.fields(sub)}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(f"unknown parameter '{section}.{key}'")
                setattr(sub, key, value)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> "Config":
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read parameters file {path}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"parameters file {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Return a copy with `{"infer.steps": 10, ...}` applied."""
        data = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"override '{key}' must look like section.name")
            data.setdefault(section, {})[name] = value
        return Config.from_dict(data)
