"""Weights files: a run's EMA parameters as safetensors, self-describing through their metadata.

Metadata `config` is the YAML of the model, diffusion and data sections the weights were
trained with (the resolved architecture, see `config.model_config_yaml`), `step` the training
step. `load_model` rebuilds the network from that metadata alone, which is how inference and
warm starts (`train.export.warm_start`) use a weights file; `train.export` writes them.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from brainpaint.conditioning.layout import network_channels
from brainpaint.config.settings import Config
from brainpaint.model.unet import build_unet


# What loading a weights file that is not what it should be raises: a broken or foreign file
# (SafetensorError, YAML or config errors), parameters that do not fit the network
# (RuntimeError of `load_state_dict`), a file that cannot be read (OSError).
WEIGHTS_FILE_ERRORS = (SafetensorError, yaml.YAMLError, ValueError, RuntimeError, OSError)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def weights_config(path: Path) -> Config:
    """The configuration recorded in a weights file (ValueError when it has none)."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{Path(path).name} has no 'config' metadata; not a brainpaint weights file")
    return Config.from_dict(yaml.safe_load(meta["config"]))


def load_model(weights_path, device="cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network from a weights file's metadata and load its (EMA) parameters."""
    weights_path = Path(weights_path)
    cfg = weights_config(weights_path)
    model = build_unet(cfg.model, *network_channels(cfg))
    model.load_state_dict(load_file(str(weights_path)))
    model.to(torch.device(device)).eval()
    return model, cfg
