"""What a U-Net looks like, without building one: presets, overrides, channel counts.

Kept free of torch so that the configuration can check `model.*` settings (and the command
line start) without loading the network code; `model.unet` builds the network from it.
"""
from __future__ import annotations

from typing import Any

# Architecture fields of each preset. `attention_downsample` lists the downsampling factors
# (1 = full resolution) whose blocks get self attention; `norm_groups` is the GroupNorm group
# count (reduced to the largest divisor of a layer's channel count when it does not divide it).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_downsample=(16,),
        num_heads=1,
        dropout=0.0,
        norm_groups=32,
    ),
    # Narrow at full resolution (where CPU time goes) and wide at depth (where parameters
    # are cheap): ~3.9 M parameters, ~68 GFLOP per training step of 16 crops of 64x64.
    "small": dict(
        base_channels=16,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=2,
        attention_downsample=(8,),
        num_heads=4,
        dropout=0.0,
        norm_groups=8,
    ),
    "tiny": dict(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_downsample=(2,),
        num_heads=1,
        dropout=0.0,
        norm_groups=8,
    ),
}

# ModelConfig fields that override the preset when not None.
_OVERRIDABLE = ("base_channels", "channel_mult", "num_res_blocks", "attention_downsample", "num_heads", "dropout")


def resolve_architecture(model_cfg) -> dict[str, Any]:
    """The preset named by ``model_cfg.preset`` with the config's non-None overrides applied."""
    arch = dict(PRESETS[model_cfg.preset])
    for name in _OVERRIDABLE:
        value = getattr(model_cfg, name, None)
        if value is not None:
            arch[name] = value
    arch["extra_middle_blocks"] = int(model_cfg.extra_middle_blocks)
    arch["channel_mult"] = tuple(int(m) for m in arch["channel_mult"])
    arch["attention_downsample"] = tuple(int(d) for d in arch["attention_downsample"])
    return arch


def size_multiple(model_cfg) -> int:
    """In-plane sizes the U-Net of ``model_cfg`` accepts are multiples of 2**(levels-1)."""
    return 2 ** (len(resolve_architecture(model_cfg)["channel_mult"]) - 1)
