"""One typed configuration for CLI, MLCube and tests, validated once when it is made.

Every setting has a default here; a YAML file overrides any subset of it, section by section
(`model`, `diffusion`, `data`, `train`, `infer`, `evaluate`, `prepare`). Each section is a
dataclass whose fields declare their type and, where it matters, their range or choices.
Building a section (from a file, `Config.from_dict`, `override` or directly in code) coerces
every value to its declared type (`1e-4` written in YAML is a string, `16.0` an integral
float) and checks it; the first problem is a ConfigError naming `section.key` and what is
wrong. Unknown sections and keys are errors too, so a typo never passes silently. The rest of
the package reads settings as they are: an `int` setting is an int.

A file may start from another with a top-level `extends: <file>` and list only what it changes
(`configs/x0_mirror_ft.yaml` extends `configs/x0_mirror.yaml`).

`Config.explicit` holds the `section.key` names that a file or an override set, so a consumer
can tell a chosen value from a default (inference warns when the weights file overrides one).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from brainpaint.config.presets import PRESETS, resolve_architecture
from brainpaint.errors import ConfigError
from brainpaint.io.atomic import write_text

BETA_SCHEDULES = ("linear", "cosine")
PRIORS = ("none", "harmonic")
PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
LR_SCHEDULES = ("constant", "linear", "cosine")
METHODS = ("diffusion", "harmonic")
# The samplers of `diffusion.samplers` (tests/test_layers.py checks that the names match).
SAMPLER_NAMES = ("ddpm", "ddim", "dpm2m")
# Slice planes a network is trained on and fills in (`geometry.PLANE_AXES`), "+"-joined.
PLANE_SETS = ("axial", "coronal", "axial+coronal")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# Sections that describe what a weights file computes (recorded in its metadata).
MODEL_SECTIONS = ("model", "diffusion", "data")


def setting(default: Any = None, *, ge=None, gt=None, le=None, choices=None):
    """A dataclass field with its checks: `ge`/`gt`/`le` bounds, or the allowed `choices`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "choices": choices})


# --------------------------------------------------------------------------- coercion and checks
def _integer(value, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key} must be an integer, got {value!r}")


def _number(value, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    else:
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _boolean(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _string(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # e.g. `val_subjects: 8`
        return str(value)
    raise ConfigError(f"{key} must be a string, got {value!r}")


def _integers(value, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list of integers, got {value!r}")
    return [_integer(v, key) for v in value]


_COERCE = {int: _integer, float: _number, bool: _boolean, str: _string, list[int]: _integers}


def _coerce(value, kind, key: str):
    """`value` as the declared type `kind` (Optional[X] also takes None)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    if value is None:
        raise ConfigError(f"{key} must be set (null is not allowed)")
    return _COERCE[kind](value, key)


def _check(value, checks: dict, key: str) -> None:
    """The range and choice checks of one setting (on each element of a list)."""
    if value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        choices = checks.get("choices")
        if choices is not None and item not in choices:
            raise ConfigError(f"unknown {key} '{item}' (expected one of {', '.join(choices)})")
        ge, gt, le = checks.get("ge"), checks.get("gt"), checks.get("le")
        if ge is not None and le is not None and not ge <= item <= le:
            raise ConfigError(f"{key} must be in [{ge}, {le}], got {item}")
        if ge is not None and item < ge:
            raise ConfigError(f"{key} must be >= {ge}, got {item}")
        if gt is not None and item <= gt:
            raise ConfigError(f"{key} must be > {gt}, got {item}")
        if le is not None and item > le:
            raise ConfigError(f"{key} must be <= {le}, got {item}")


class _Section:
    """Coerces and checks every field when the section is built."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.NAME}.{f.name}"
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            _check(value, f.metadata, key)
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields of the section."""


def _device(value: str, key: str) -> str:
    value = value.strip().lower()
    if not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got '{value}'")
    return value


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig(_Section):
    NAME: ClassVar[str] = "model"
    # Named architecture preset (see brainpaint.architecture.PRESETS): "paper", "small", "tiny".
    preset: str = setting("small", choices=tuple(PRESETS))
    # Optional overrides of single preset fields (None keeps the preset's value).
    base_channels: Optional[int] = setting(None, ge=1)
    channel_mult: Optional[list[int]] = setting(None, ge=1)
    num_res_blocks: Optional[int] = setting(None, ge=1)
    attention_downsample: Optional[list[int]] = setting(None, ge=1)
    num_heads: Optional[int] = setting(None, ge=1)
    dropout: Optional[float] = setting(None, ge=0, le=1)
    # Neighbouring voided slices (and their masks) given as extra input (2.5D): 0 = plain 2D.
    context_slices: int = setting(0, ge=0)
    # More (ResBlock, attention) pairs at the lowest resolution, after the preset's middle block:
    # depth where it is cheap. Each starts as the identity, so trained weights without them
    # warm-start a network with them (`train.init_weights`).
    extra_middle_blocks: int = setting(0, ge=0)
    # The population atlas's residual over its harmonic fill as one more input channel
    # (brainpaint.atlas); the atlas, built from the training brains, is kept in the weights.
    atlas: bool = False

    def validate(self) -> None:
        if self.channel_mult is not None and not self.channel_mult:
            raise ConfigError("model.channel_mult must list at least one level")
        arch = resolve_architecture(self)
        # The middle block and every level named in attention_downsample attend over channels.
        widths = {arch["base_channels"] * arch["channel_mult"][-1]}
        widths |= {arch["base_channels"] * m for level, m in enumerate(arch["channel_mult"])
                   if 2**level in arch["attention_downsample"]}
        bad = sorted(w for w in widths if w % arch["num_heads"])
        if bad:
            raise ConfigError(
                f"model.num_heads ({arch['num_heads']}) must divide the channels of every attention layer ({bad[0]})"
            )


@dataclass
class DiffusionConfig(_Section):
    NAME: ClassVar[str] = "diffusion"
    steps: int = setting(1000, ge=1)
    beta_schedule: str = setting("linear", choices=BETA_SCHEDULES)
    beta_start: float = setting(1e-4, gt=0)
    beta_end: float = setting(0.02, gt=0)
    learn_sigma: bool = True  # output [eps, v] and train with the hybrid loss
    lambda_vlb: float = setting(1e-3, ge=0)  # weight of the VB term in the hybrid loss (improved DDPM)
    # What the network's first output channel predicts: "eps" (the noise, the paper), "x0" (the
    # clean target) or "v" (alpha eps - sigma x0, with alpha^2 = abar and sigma^2 = 1 - abar).
    prediction: str = setting("eps", choices=PREDICTIONS)
    # Weight of each training timestep's prediction MSE: "uniform" (the plain MSE of the
    # prediction type) or "min_snr" (Hang et al. 2023: the x0-space MSE times min(SNR, gamma)).
    loss_weighting: str = setting("uniform", choices=LOSS_WEIGHTINGS)
    min_snr_gamma: float = setting(5.0, gt=0)
    # Share of training samples drawn at the last timestep (pure noise), where the x0 prediction
    # is the conditional mean that one-step sampling returns; the rest are uniform.
    terminal_fraction: float = setting(0.0, ge=0, le=1)

    def validate(self) -> None:
        if self.beta_schedule == "linear" and max(self.beta_start, self.beta_end) * 1000.0 / self.steps > 1:
            raise ConfigError(
                f"diffusion.beta_end scaled to {self.steps} steps exceeds 1 (linear betas are scaled by 1000 / steps)"
            )


@dataclass
class DataConfig(_Section):
    NAME: ClassVar[str] = "data"
    # Network slice size: the 240x240 grid is cropped to 224x224 (background only).
    slice_size: int = setting(224, ge=1)
    # Train/infer on square crops around the mask instead of whole slices (None = whole slices).
    crop_size: Optional[int] = setting(None, ge=1)
    # Conditioning prior inside the mask: "none" (voided, the paper) or "harmonic"
    # (the model learns the residual over a 3D harmonic fill).
    prior: str = setting("none", choices=PRIORS)
    # With model.atlas and the harmonic prior: the fill inside the mask is the harmonic fill plus
    # this share of the atlas residual (brainpaint.atlas), the population's guess of the structure
    # a harmonic fill misses; the network then learns the residual over that fill. 0: the plain
    # harmonic fill.
    atlas_gain: float = setting(0.0, ge=0)
    # How the atlas is placed on each brain (brainpaint.atlas): "box" (scaled onto the brain's
    # bounding box) or "affine" (then registered to the known voxels; the atlas itself is built
    # from registered brains). Weights keep the fit they were trained with.
    atlas_fit: str = setting("box", choices=("box", "affine"))
    flip_prob: float = setting(0.5, ge=0, le=1)
    # Extra procedurally generated healthy masks per training brain (0 = only mask-healthy).
    extra_masks_per_volume: int = setting(0, ge=0)
    # Left-right mirrored conditioning: the other hemisphere, reflected about the midline found
    # by `geometry.midline_shift`, as two extra input channels (mirrored b and mirrored mask).
    mirror: bool = False
    # Intensity augmentation of training slices: std of log(gamma) of a random gamma curve, and
    # the amplitude of a smooth random multiplicative (bias) field; 0 disables either.
    gamma_aug: float = setting(0.0, ge=0)
    bias_aug: float = setting(0.0, ge=0)
    # Slice planes of the training pairs: "axial" (the paper), "coronal", or both.
    planes: str = setting("axial", choices=PLANE_SETS)
    num_workers: int = setting(0, ge=0)
    cache_volumes: int = setting(16, ge=1)  # decoded volumes kept per loader worker
    # Folder for the harmonic fills and midlines of training volumes, computed once and reused
    # by every run and resume (None: computed at every decode). Not part of a weights file.
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig(_Section):
    NAME: ClassVar[str] = "train"
    lr: float = setting(1e-4, gt=0)
    weight_decay: float = setting(0.0, ge=0)
    batch_size: int = setting(8, ge=1)
    ema_rate: float = setting(0.9999, ge=0, le=1)
    ema_warmup: bool = True  # decay min(ema_rate, (1+n)/(10+n)) after n updates
    grad_clip: Optional[float] = setting(1.0, ge=0)  # 0 or null: no clipping
    max_steps: int = setting(100_000, ge=0)
    max_minutes: Optional[float] = setting(None, ge=0)  # stop (with a checkpoint) after this wall time
    # Stop after this much CPU time of the training process (all threads; counted across resumes).
    max_cpu_minutes: Optional[float] = setting(None, gt=0)
    # Learning-rate schedule over the run's budget (the larger share used of max_steps and
    # max_cpu_minutes): "constant", "linear" (decay to 0) or "cosine"; after `warmup_steps`
    # steps of linear warm-up.
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES)
    warmup_steps: int = setting(0, ge=0)
    # Also write the EMA weights to exports/step_XXXXXXXX.safetensors every N steps (0: never).
    export_every: int = setting(0, ge=0)
    save_every: int = setting(1000, ge=1)
    keep_last: int = setting(3, ge=1)
    log_every: int = setting(50, ge=1)
    val_every: int = setting(2000, ge=0)  # 0: no validation
    val_slices: int = setting(4, ge=0)
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"  # "auto" (this rank's GPU when available, else CPU), "cpu", "cuda:N"
    val_steps: int = setting(20, ge=1)  # DDIM steps when sampling the validation slices
    # Warm start: an exported weights file whose network is the one configured here; a fresh
    # run (no checkpoint to resume) starts its model and EMA from it, with a new optimizer.
    init_weights: Optional[str] = None

    def validate(self) -> None:
        self.device = _device(self.device, "train.device")


@dataclass
class InferConfig(_Section):
    NAME: ClassVar[str] = "infer"
    # "ddpm" (ancestral, any respacing), "ddim" or "dpm2m" (2nd-order ODE solver)
    sampler: str = setting("ddim", choices=SAMPLER_NAMES)
    # One DDIM step from x_T = 0: the conditional mean of x0/v-prediction weights, 1000x fewer
    # network calls than the paper's path (sampler=ddpm, steps=1000). Weights that predict eps
    # run 16 steps unless this is set (predictors/diffusion.py).
    steps: int = setting(1, ge=1)
    eta: float = setting(0.0, ge=0)
    ensemble: int = setting(1, ge=1)  # samples averaged per case (only useful with temperature > 0)
    # Slices per network batch; 0 = all masked slices of a volume at once. 8 is the fastest and
    # leanest on CPU (64: 1.3x the time per volume, 3x the peak memory; README, CPU inference).
    batch_slices: int = setting(8, ge=0)
    crop_margin: int = setting(16, ge=0)  # voxels around the mask kept in the in-plane crop (crop models)
    # Crop models: cover the mask with windows of exactly the training crop size, blended where
    # they overlap (True), or use one box grown to hold the whole mask (False).
    tile: bool = True
    # Gaussian post-filter of the fill (0 = off). The paper's 1.075 smooths the stripes of sampled
    # fills; on the one-step conditional mean it costs 0.003 SSIM and 0.2 dB (docs/MODEL_STUDY.md).
    smoothing_sigma: float = setting(0.0, ge=0)
    # Voxels of known tissue around the mask that the post-filter reads (None = all of it; smoothing.py).
    smoothing_border: Optional[int] = setting(None, ge=0)
    # Slice planes filled and averaged: "axial", "coronal" or "axial+coronal"; None = the
    # planes the weights were trained on (their `data.planes`).
    planes: Optional[str] = setting(None, choices=PLANE_SETS)
    repaint: bool = False  # RePaint-style known-region x_t mixing during sampling
    noise_correlation: float = setting(0.0, ge=0, le=1)  # share of noise shared across neighbouring slices
    # Scale of the sampler's noise. 0 starts the deterministic DDIM path at x_T = 0: one fill near
    # the conditional mean, which the challenge metrics reward; 1 draws samples (ensembles, std maps).
    temperature: float = setting(0.0, ge=0)
    # Average each slice's fill with the fill of the left-right mirrored slice, mirrored back
    # (the training flip, `data.flip_prob`, at test time). Off: twice the network calls for
    # -0.02 to +0.02 dB and +-0.0001 SSIM on the healthy, tumour and BraTS-size validation
    # cases (docs/RESULTS.md, CPU speed), not worth its time.
    flip_average: bool = False
    # bf16 autocast of the network on CUDA and on CPUs that compute bf16 natively (AVX512-BF16,
    # AMX): on the CPU a fifth less time, scores within 0.0002 SSIM / 0.015 dB of float32
    # (docs/RESULTS.md, CPU speed). Other CPUs run float32.
    bf16: bool = True
    seed: int = 0
    weights: Optional[str] = None  # safetensors file; None = the workspace's shipped weights
    method: str = setting("diffusion", choices=METHODS)  # or "harmonic" (classical fill, no network)
    device: str = "auto"

    def validate(self) -> None:
        self.device = _device(self.device, "infer.device")


@dataclass
class EvaluateConfig(_Section):
    NAME: ClassVar[str] = "evaluate"
    stripe_index: bool = True


@dataclass
class PrepareConfig(_Section):
    NAME: ClassVar[str] = "prepare"
    masks_per_subject: int = setting(1, ge=1)  # cases (masks) per subject
    # Validation subjects: names (sub-49,sub-50), a count N (the last N), "none", or "" (the last seventh).
    val_subjects: str = ""
    seed: int = 0
    # Mask centres: "central" (the best brain overlap of 12 candidates, as the BraTS organisers
    # placed theirs) or "uniform" (any valid position: more cortex and insula; masks.py).
    placement: str = setting("central", choices=("central", "uniform"))


SECTIONS = {
    cls.NAME: cls
    for cls in (ModelConfig, DiffusionConfig, DataConfig, TrainConfig, InferConfig, EvaluateConfig, PrepareConfig)
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        self.explicit: frozenset[str] = frozenset()
        if self.data.atlas_gain and not (self.model.atlas and self.data.prior == "harmonic"):
            raise ConfigError("data.atlas_gain needs model.atlas: true and data.prior: harmonic (it adds to the harmonic fill)")
        if self.train.val_every and self.train.val_steps > self.diffusion.steps:
            raise ConfigError(
                f"train.val_steps must be <= diffusion.steps ({self.diffusion.steps}), got {self.train.val_steps}"
            )

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Config":
        """Build and validate a configuration from `{section: {key: value}}` (any subset)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("parameters must be a mapping of sections")
        sections, explicit = {}, set()
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown parameters section '{section}'")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' must be a mapping")
            known = {f.name for f in dataclasses.fields(SECTIONS[section])}
            for key in values:
                if key not in known:
                    raise ConfigError(f"unknown parameter '{section}.{key}'")
            sections[section] = SECTIONS[section](**values)
            explicit |= {f"{section}.{key}" for key in values}
        cfg = cls(**sections)
        cfg.explicit = frozenset(explicit)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> "Config":
        """Read a parameters file. A file may start from another one with a top-level
        `extends: <file>` (relative to its own folder): it then only lists what it changes,
        section by section, over the file it extends (which may extend another in turn)."""
        if path is None:
            return cls()
        return cls.from_dict(read_parameters(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Return a validated copy with `{"infer.steps": 10, ...}` applied (marked explicit)."""
        data = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"override '{key}' must look like section.name")
            data.setdefault(section, {})[name] = value
        cfg = Config.from_dict(data)
        cfg.explicit = self.explicit | frozenset(dotted)
        return cfg


EXTENDS = "extends"


def merge_parameters(base: dict, over: dict) -> dict:
    """`over` laid over `base`: sections merge key by key, any other value replaces."""
    out = copy.deepcopy(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_parameters(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_parameters(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The `{section: {key: value}}` of a parameters file, with its `extends:` chain resolved."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read parameters file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameters file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or EXTENDS not in data:
        return data
    data = dict(data)
    parent = data.pop(EXTENDS)
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"parameters file {path}: '{EXTENDS}' must name another parameters file")
    parent_path = (path.parent / parent).resolve()
    chain = _chain + (path.resolve(),)
    if parent_path in chain:
        raise ConfigError(f"parameters file {path}: '{EXTENDS}: {parent}' makes a cycle")
    return merge_parameters(read_parameters(parent_path, chain) or {}, data)


def model_config_yaml(cfg: Config) -> str:
    """YAML of the sections a weights file needs to be rebuilt and used (`MODEL_SECTIONS`).

    The resolved architecture is recorded, not only the preset name, so a weights file keeps
    loading even if a preset's definition changes later.
    """
    data = cfg.to_dict()
    arch = resolve_architecture(cfg.model)
    for key in data["model"]:
        if key in arch:
            value = arch[key]
            data["model"][key] = list(value) if isinstance(value, tuple) else value
    data["data"].pop("cache_dir", None)  # where a training run kept its cache, not what it computes
    return yaml.safe_dump({k: data[k] for k in MODEL_SECTIONS}, sort_keys=False)
