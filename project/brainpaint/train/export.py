"""Training's side of weights files: export a run's EMA, warm-start a run from a weights file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from brainpaint.conditioning.layout import InputLayout
from brainpaint.config.settings import Config, model_config_yaml
from brainpaint.errors import TrainError, one_line
from brainpaint.io.atomic import atomic_write
from brainpaint.model.unet import INPUT_CONV, widen_input_conv
from brainpaint.model.weights import WEIGHTS_FILE_ERRORS, read_metadata
from brainpaint.train.checkpoints import STEP_PREFIX, check_same_model, checkpoint_step, cpu_tensors, newest_checkpoint


def export_weights(checkpoint_or_run_dir, out_file) -> Path:
    """Write the EMA weights of a checkpoint (or a run's newest) as a self-describing weights file.
    Every problem (no such run, no checkpoint, an unreadable one, an unwritable output) is a
    one-line TrainError."""
    source, out_file = Path(checkpoint_or_run_dir), Path(out_file)
    if not source.is_dir():
        raise TrainError(f"{source} is not a folder: give a training run's output folder or one of its checkpoints")
    ckpt = newest_checkpoint(source)
    ema = ckpt / "ema.safetensors"
    try:
        meta = read_metadata(ema)
        tensors = load_file(str(ema))
        if "config" in meta:
            meta["config"] = model_config_yaml(Config.from_dict(yaml.safe_load(meta["config"])))
    except WEIGHTS_FILE_ERRORS as exc:
        raise TrainError(f"cannot read {ema}: {one_line(exc)}") from exc
    if ckpt.name[len(STEP_PREFIX):].isdigit():  # a checkpoint folder copied under another name has no step
        meta.setdefault("step", str(checkpoint_step(ckpt)))
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_file) as tmp:
            save_file(cpu_tensors(tensors), str(tmp), metadata=meta)
    except OSError as exc:
        raise TrainError(f"cannot write {out_file}: {exc.strerror or one_line(exc)}") from exc
    return out_file


def export_ema(ema, cfg: Config, step: int, out_file, cpu_seconds: float = 0.0) -> Path:
    """Write a running EMA (`ema.EMA`) as a weights file, like `export_weights` without a checkpoint."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": model_config_yaml(cfg), "step": str(step), "cpu_seconds": f"{cpu_seconds:.1f}"}
    with atomic_write(out_file) as tmp:
        save_file(cpu_tensors(ema.state), str(tmp), metadata=meta)
    return out_file


def warm_start(model: nn.Module, ema, cfg: Config, weights: Path, device: torch.device) -> None:
    """Load an exported weights file into a fresh run's model and EMA (`train.init_weights`).

    The file must hold the network `cfg` describes; a 2D network may start a 2.5D one (more
    context slices) and any network the atlas channel (`model.atlas`): their new input
    channels start at zero weight (`unet.widen_input_conv`), and the atlas buffer the file
    lacks (or holds for another `data.atlas_fit`) stays zero for the trainer to build. A network may also gain middle blocks
    (`model.extra_middle_blocks`), which start as the identity.
    """
    if not weights.is_file():
        raise TrainError(f"train.init_weights: weights file not found: {weights}")
    meta = read_metadata(weights)
    if "config" not in meta:
        raise TrainError(f"train.init_weights: {weights} has no 'config' metadata; not a brainpaint weights file")
    # Weights files record the resolved architecture: compare with the resolved configuration.
    resolved = Config.from_dict(yaml.safe_load(model_config_yaml(cfg)))
    saved = yaml.safe_load(meta["config"]) or {}
    hint = "train a network like it or drop train.init_weights"
    # The ways a network may grow from its file (and what it would lose going the other way).
    growable = {"context_slices": "input channels", "extra_middle_blocks": "middle blocks", "atlas": "the atlas channel"}
    # The atlas gain and fit change only the inputs the network reads: a fine-tune adapts to
    # others (an atlas of another fit is built anew, below).
    skip = tuple(f"model.{key}" for key in growable) + ("data.atlas_gain", "data.atlas_fit")
    check_same_model(saved, resolved, weights, hint=hint, skip=skip)
    before = {key: int((saved.get("model") or {}).get(key, 0) or 0) for key in growable}
    for key, what in growable.items():
        if before[key] > getattr(cfg.model, key):
            raise TrainError(
                f"train.init_weights: {weights} was trained with model.{key}={saved['model'][key]}, "
                f"the parameters say {getattr(cfg.model, key)}; a network cannot drop {what}, {hint}"
            )
    tensors = load_file(str(weights), device=str(device))
    if (saved.get("data") or {}).get("atlas_fit", "box") != cfg.data.atlas_fit:
        tensors.pop("atlas", None)  # built from registered brains or box-scaled ones: not the same atlas
    layout = InputLayout.of(cfg).names
    saved_layout = InputLayout.of(Config.from_dict(saved)).names
    if saved_layout != layout:
        tensors[INPUT_CONV] = widen_input_conv(tensors[INPUT_CONV], saved_layout, layout)
    # Middle blocks the file lacks keep this network's initialisation: they start as the
    # identity; an atlas buffer it lacks stays zero (the trainer builds the atlas).
    fresh = model.state_dict()
    grown = ("middle_block.", "atlas")
    tensors.update({k: v.detach().clone() for k, v in fresh.items() if k not in tensors and k.startswith(grown)})
    model.load_state_dict(tensors)
    ema.load(tensors)


def hold_atlas(model: nn.Module, ema, build) -> np.ndarray:
    """The atlas buffer of a `model.atlas` network as an array: the one of the checkpoint or
    weights it started from, else `build()` (`atlas.atlas_from_cases`), copied into the model
    and its EMA so that checkpoints and exports carry it."""
    held = model.atlas
    if not bool(held.abs().sum()):
        held.copy_(torch.from_numpy(build()).to(held.device))
        ema.state["atlas"] = held.detach().clone().float()
    return held.detach().float().cpu().numpy()
