"""Training checkpoints: one folder per step, written atomically, the newest few kept.

    <run>/checkpoints/step_XXXXXXXX/model.safetensors   raw weights  } metadata: config (model/
    <run>/checkpoints/step_XXXXXXXX/ema.safetensors     EMA weights  } diffusion/data YAML), step
    <run>/checkpoints/step_XXXXXXXX/state.pt            optimizer, step, RNG states, full config

A checkpoint folder is built under a temporary name and renamed into place
(`atomic.atomic_folder`), so a run killed at any moment leaves only complete checkpoints.
`state.pt` holds plain tensors and lists only, so it loads with `weights_only=True`; its
`rng` entry is the RNG state of rank 0, `rng_ranks` (when present) that of every rank.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from brainpaint.config.settings import MODEL_SECTIONS, Config, model_config_yaml
from brainpaint.errors import TrainError
from brainpaint.io.atomic import atomic_folder

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.pt")
# Settings that change only how training samples are drawn or weighted, not what the network
# computes: a run may resume, or start from weights, with other values.
RESUMABLE_KEYS = {
    f"data.{k}"
    for k in ("flip_prob", "extra_masks_per_volume", "num_workers", "cache_volumes", "cache_dir", "gamma_aug", "bias_aug")
} | {f"diffusion.{k}" for k in ("loss_weighting", "min_snr_gamma", "terminal_fraction")}


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies, as safetensors wants them."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(STEP_PREFIX) and entry.name[len(STEP_PREFIX) :].isdigit():
            if all((entry / f).is_file() for f in CHECKPOINT_FILES):
                found.append(entry)
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(STEP_PREFIX) :])


def newest_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint folder, else the newest checkpoint of the run `path`."""
    path = Path(path)
    if (path / "ema.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise TrainError(f"no checkpoint found in {path}")
    return found[-1]


def save_checkpoint(
    out_dir: Path, step: int, model: nn.Module, ema, optimizer, cfg: Config, keep_last: int, rng: Optional[list] = None,
    cpu_seconds: float = 0.0,
) -> Path:
    """Write step_XXXXXXXX/ atomically and prune all but the newest `keep_last` checkpoints.

    `rng` is the list of every rank's RNG state (`rng_state()`); this process's alone by default.
    `cpu_seconds` is the run's training CPU time so far (`budget.Budget`).
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    if final.exists():
        return final
    rng = rng or [rng_state()]
    with atomic_folder(final, replace=False) as tmp:
        meta = {"config": model_config_yaml(cfg), "step": str(step), "cpu_seconds": f"{cpu_seconds:.1f}"}
        save_file(cpu_tensors(model.state_dict()), str(tmp / "model.safetensors"), metadata=meta)
        save_file(cpu_tensors(ema.state), str(tmp / "ema.safetensors"), metadata=meta)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng[0], "rng_ranks": rng, "config": cfg.to_dict(),
                 "cpu_seconds": float(cpu_seconds)}
        torch.save(state, tmp / "state.pt")
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def rng_state() -> dict:
    """This process's RNG states as plain tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_aside(run_dir: Path) -> Optional[Path]:
    """Move a run's checkpoints out of the way of a fresh run (`--no-resume`); their new place.

    They are deleted (`drop_aside`) once the fresh run has saved its own first checkpoint, and
    put back (`put_back`) if it ends before that.
    """
    run_dir = Path(run_dir)
    if not list_checkpoints(run_dir):
        return None
    aside = run_dir / f"{CHECKPOINTS}.previous"
    shutil.rmtree(aside, ignore_errors=True)
    (run_dir / CHECKPOINTS).rename(aside)
    return aside


def drop_aside(aside: Optional[Path]) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def put_back(run_dir: Path, aside: Optional[Path]) -> None:
    if aside is not None and aside.is_dir() and not list_checkpoints(run_dir):
        shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
        aside.rename(Path(run_dir) / CHECKPOINTS)


def check_same_model(
    saved: dict, cfg: Config, where: Path, hint: str = "use another output folder or --no-resume", skip: tuple = ()
) -> None:
    """Resuming with another network or data transform would silently train something else."""
    current = cfg.to_dict()
    # Settings newer than the saved file take their defaults (what the file computed).
    defaults = Config().to_dict()
    for section in MODEL_SECTIONS:
        for key, value in current[section].items():
            if f"{section}.{key}" in RESUMABLE_KEYS or f"{section}.{key}" in skip:
                continue
            old = (saved.get(section) or {}).get(key, defaults[section][key])
            if old != value and not (isinstance(old, (list, tuple)) and list(old) == list(value or [])):
                raise TrainError(
                    f"checkpoint {where} was trained with {section}.{key}={old!r}, the parameters say {value!r}; {hint}"
                )
