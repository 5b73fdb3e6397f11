"""Training loop: AdamW, EMA weights, bf16/compile/channels_last, DDP, atomic checkpoints.

A run lives in one output folder:

    <out>/checkpoints/step_XXXXXXXX/{model.safetensors, ema.safetensors, state.pt}
    <out>/train_log.csv            one row per log interval (and per validation)
    <out>/validation/step_XXXXXXXX.png   b | m | EMA sample | ground truth, one row per slice
    <out>/model.safetensors        the exported EMA weights (what inference loads)
    <out>/train_summary.json       final step, world size, per-rank weight digests

Checkpoints are written into a hidden temporary folder and renamed into place, so a run
killed at any moment leaves only complete checkpoints; `resume` continues from the newest
one at the same step with the same EMA, optimizer and RNG states. Under torchrun
(RANK/WORLD_SIZE/LOCAL_RANK in the environment) every rank trains on its own shard of the
slices through DistributedDataParallel (NCCL on GPU, gloo on CPU); only rank 0 writes.
`train.batch_size` is the batch of one rank.

Inference uses the EMA weights: `export_weights` writes them with the model, diffusion and
data sections of the configuration as safetensors metadata, and `load_model` rebuilds the
network from that metadata alone.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ConfigError
from .devices import select_device
from .errors import TrainError

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step_"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ["step", "time_s", "loss", "mse", "vb", "lr", "it_per_s", "slices_per_s", "val_ssim", "val_psnr"]
WEIGHTS_NAME = "model.safetensors"
# Sections of the configuration that define what a weights file computes.
MODEL_SECTIONS = ("model", "diffusion", "data")


# --------------------------------------------------------------------------- small helpers
def model_config_yaml(cfg: Config) -> str:
    """YAML of the sections a weights file needs to be rebuilt and used."""
    from .unet import resolve_architecture

    data = cfg.to_dict()
    # Record the resolved architecture, not only the preset name, so a weights file keeps
    # loading even if a preset's definition changes later.
    arch = resolve_architecture(cfg.model)
    for key in data["model"]:
        if key in arch:
            value = arch[key]
            data["model"][key] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump({k: data[k] for k in MODEL_SECTIONS}, sort_keys=False)


def _cpu_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_cpu_state(tensors), str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name order): equal digests = identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class DistEnv:
    """Rank layout from the torchrun environment (a single process when absent)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            torch.distributed.init_process_group(backend=backend, **kwargs)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank (so all stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_strings(self, value: str) -> list[str]:
        if not self.enabled:
            return [value]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


# --------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's parameters (buffers are copied as they are).

    Kept in float32 on the model's device, updated after every optimizer step with
    `ema = decay * ema + (1 - decay) * param`; this is what inference uses.

    With `warmup`, the decay after n updates is `min(rate, (1 + n) / (10 + n))`: early on the
    average follows the network closely, so it never holds a large share of the initial
    weights. Without it, a 0.999 average is still 37 % initialisation after 1,000 steps, and
    since the U-Net's output convolutions start at zero, that shrinks every prediction.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = True):
        self.rate = float(rate)
        self.warmup = bool(warmup)
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._param_names = [n for n, _ in model.named_parameters()]

    def decay(self, updates_done: int) -> float:
        if not self.warmup:
            return self.rate
        return min(self.rate, (1.0 + updates_done) / (10.0 + updates_done))

    @torch.no_grad()
    def update(self, model: nn.Module, updates_done: int | None = None) -> None:
        """One EMA step; `updates_done` (the training step before this update) drives the warm-up."""
        decay = self.rate if updates_done is None else self.decay(int(updates_done))
        params = dict(model.named_parameters())
        ema = [self.state[n] for n in self._param_names]
        cur = [params[n].detach().float() for n in self._param_names]
        torch._foreach_lerp_(ema, cur, 1.0 - decay)
        for name, buf in model.named_buffers():
            self.state[name].copy_(buf)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) ^ set(tensors)
        if missing:
            raise TrainError(f"EMA weights do not match the network (differing keys: {sorted(missing)[:3]})")
        for k, v in tensors.items():
            self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.state.items()})


# --------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_or_ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (temporary folders are ignored)."""
    root = Path(run_or_ckpt_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if entry.is_dir() and entry.name.startswith(STEP_PREFIX) and entry.name[len(STEP_PREFIX) :].isdigit():
            if all((entry / f).is_file() for f in ("model.safetensors", "ema.safetensors", "state.pt")):
                found.append(entry)
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(STEP_PREFIX) :])


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, ema: EMA, optimizer, cfg: Config, keep_last: int) -> Path:
    """Write step_XXXXXXXX/ into a temporary folder, rename it into place, prune old ones."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    if final.exists():
        return final
    tmp = root / f".tmp-{STEP_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        meta = {"config": model_config_yaml(cfg), "step": str(step)}
        save_file(_cpu_state(model.state_dict()), str(tmp / "model.safetensors"), metadata=meta)
        save_file(_cpu_state(ema.state), str(tmp / "ema.safetensors"), metadata=meta)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(),
            "config": cfg.to_dict(),
        }
        torch.save(state, tmp / "state.pt")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out_dir)[: -max(1, int(keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_state() -> dict:
    """RNG states as plain tensors/lists, so state.pt loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Data settings that change only how samples are drawn, not what the network computes.
_RESUMABLE_DATA_KEYS = {"flip_prob", "extra_masks_per_volume", "num_workers", "cache_volumes"}


def _check_same_model(
    saved: dict, cfg: Config, where: Path, hint: str = "use another output folder or --no-resume", skip: tuple = ()
) -> None:
    """Resuming with another network or data transform would silently train something else."""
    current = cfg.to_dict()
    for section in MODEL_SECTIONS:
        for key, value in current[section].items():
            if (section == "data" and key in _RESUMABLE_DATA_KEYS) or f"{section}.{key}" in skip:
                continue
            old = saved.get(section, {}).get(key)
            if old != value and not (isinstance(old, (list, tuple)) and list(old) == list(value or [])):
                raise TrainError(
                    f"checkpoint {where} was trained with {section}.{key}={old!r}, the parameters say {value!r}; {hint}"
                )


def _warm_start(raw: nn.Module, ema: "EMA", cfg: Config, weights: Path, device: torch.device) -> None:
    """Load an exported weights file into the model and the EMA (same network required)."""
    if not weights.is_file():
        raise TrainError(f"train.init_weights: weights file not found: {weights}")
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise TrainError(f"train.init_weights: {weights} has no 'config' metadata; not a brainpaint weights file")
    # Weights files record the resolved architecture: compare with the resolved configuration.
    resolved = Config.from_dict(yaml.safe_load(model_config_yaml(cfg)))
    saved = yaml.safe_load(meta["config"]) or {}
    hint = "train a network like it or drop train.init_weights"
    _check_same_model(saved, resolved, weights, hint=hint, skip=("model.context_slices",))
    saved_context = int(saved.get("model", {}).get("context_slices", 0) or 0)
    context = int(cfg.model.context_slices)
    if saved_context > context:
        raise TrainError(
            f"train.init_weights: {weights} was trained with model.context_slices={saved_context}, "
            f"the parameters say {context}; a network cannot drop input channels, {hint}"
        )
    tensors = load_file(str(weights), device=str(device))
    if saved_context < context:
        from .unet import INPUT_CONV, network_channels, widen_input_conv

        tensors[INPUT_CONV] = widen_input_conv(tensors[INPUT_CONV], network_channels(cfg)[0])
    raw.load_state_dict(tensors)
    ema.load(tensors)


# --------------------------------------------------------------------------- weights files
def _resolve_checkpoint(path: Path) -> Path:
    path = Path(path)
    if (path / "ema.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise TrainError(f"no checkpoint found in {path}")
    return found[-1]


def export_weights(checkpoint_or_run_dir, out_file) -> Path:
    """Write the EMA weights of a checkpoint (or a run's newest) as a self-describing weights file."""
    ckpt = _resolve_checkpoint(Path(checkpoint_or_run_dir))
    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(ckpt / "ema.safetensors"))
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    meta.setdefault("step", str(checkpoint_step(ckpt)))
    if "config" in meta:
        meta["config"] = model_config_yaml(Config.from_dict(yaml.safe_load(meta["config"])))
    _atomic_save_file(tensors, out_file, meta)
    return out_file


def load_model(weights_path, device="cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network from a weights file's metadata and load its (EMA) parameters."""
    from .unet import build_unet, network_channels

    weights_path = Path(weights_path)
    with safe_open(str(weights_path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{weights_path.name} has no 'config' metadata; not a brainpaint weights file")
    cfg = Config.from_dict(yaml.safe_load(meta["config"]))
    model = build_unet(cfg.model, *network_channels(cfg))
    model.load_state_dict(load_file(str(weights_path)))
    model.to(torch.device(device)).eval()
    return model, cfg


# --------------------------------------------------------------------------- logging and validation
class CsvLog:
    """Append-only CSV of training progress (rank 0 only)."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        rows = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                # Rows past the checkpoint belong to steps that are trained again now.
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows([{k: r.get(k, "") for k in LOG_FIELDS} for r in rows])
        os.replace(tmp, path)

    def write(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def masked_ssim_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """In-mask SSIM and PSNR of 2D slices in [0, 1], shaped [B, 1, H, W].

    Modelled on the official metric, per slice: both images are zeroed outside the mask, the
    SSIM map of the whole slice is averaged over the mask voxels, and PSNR uses the mask voxels
    with the fixed data range 1 (the official `psnr_01`).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    inside = mask.float().cpu() > 0.5
    pred, target = pred.float().cpu() * inside, target.float().cpu() * inside
    _, ssim_map = structural_similarity_index_measure(pred, target, data_range=1.0, return_full_image=True)
    ssim = float(ssim_map[inside].mean())
    mse = float(((pred - target)[inside] ** 2).mean())
    psnr = 10.0 * math.log10(1.0 / max(mse, 1e-12))
    return ssim, psnr


def _to_uint8(image: np.ndarray) -> np.ndarray:
    # Volumes are [x, y]: show y upwards, x left-right, as viewers display axial slices.
    return (np.clip(image, 0, 1).T[::-1] * 255 + 0.5).astype(np.uint8)


def write_grid_png(rows: list[list[np.ndarray]], path: Path) -> None:
    """One row per slice: b | m | sample | ground truth, written atomically with pillow."""
    from PIL import Image

    pad = 2
    h, w = rows[0][0].shape[1], rows[0][0].shape[0]
    grid = np.zeros((len(rows) * (h + pad) - pad, len(rows[0]) * (w + pad) - pad), np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = _to_uint8(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


class Validator:
    """Samples a few fixed slices with a short DDIM from the EMA weights and scores them."""

    def __init__(self, dataset, cfg: Config, device: torch.device):
        from .dataset import decode_sample

        self.cfg = cfg
        self.device = device
        self.decode = decode_sample
        samples = [dataset.sample(pair, random.Random(0), augment=False) for pair in self.pick(dataset, int(cfg.train.val_slices))]
        self.cond = torch.stack([s["cond"] for s in samples]) if samples else None
        self.x0 = torch.stack([s["x0"] for s in samples]) if samples else None

    @staticmethod
    def pick(dataset, n: int) -> list[tuple[int, int]]:
        """`n` fixed pairs spread over the volumes, central mask slices first (edge slices of a
        mask hold only a few voxels and say little)."""
        by_unit: dict[int, list[tuple[int, int]]] = {}
        for pair in dataset.pairs:
            by_unit.setdefault(pair[0], []).append(pair)
        # Per unit: its slices ordered by distance from the unit's central slice.
        ordered = [sorted(p, key=lambda q: abs(q[1] - p[len(p) // 2][1])) for p in by_unit.values()]
        picks: list[tuple[int, int]] = []
        depth = 0
        while len(picks) < n and any(depth < len(o) for o in ordered):
            level = [o[depth] for o in ordered if depth < len(o)]
            take = min(n - len(picks), len(level))
            picks += [level[i] for i in np.linspace(0, len(level) - 1, take).round().astype(int)]
            depth += 1
        return picks

    @torch.no_grad()
    def run(self, model: nn.Module, diffusion, step: int, out_dir: Path) -> Optional[tuple[float, float]]:
        if self.cond is None:
            return None
        prior = self.cfg.data.prior
        cond = self.cond.to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        x0 = diffusion.sample(
            model,
            cond,
            sampler="ddim",
            steps=int(self.cfg.train.val_steps),
            generator=generator,
            clip_denoised=(prior == "none"),
            autocast=torch.bfloat16 if (self.device.type == "cuda" and self.cfg.train.bf16) else None,
        )
        b = self.cond[:, 0:1]
        sample = self.decode(x0.float().cpu(), b, prior)
        truth = self.decode(self.x0, b, prior)
        mask = self.cond[:, 1:2]
        ssim, psnr = masked_ssim_psnr(sample, truth, mask)
        # Show the sample as inference writes it: generated inside the mask, known tissue outside.
        shown = mask * sample + (1 - mask) * truth
        rows = [[b[i, 0].numpy(), mask[i, 0].numpy(), shown[i, 0].numpy(), truth[i, 0].numpy()] for i in range(len(b))]
        write_grid_png(rows, Path(out_dir) / "validation" / f"{STEP_PREFIX}{step:08d}.png")
        return ssim, psnr


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the run
class _StopSignal:
    """SIGTERM (a scheduler's pre-emption) asks for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _make_loader(dataset, cfg: Config, dist: DistEnv, seed: int, device: torch.device):
    from torch.utils.data import DataLoader

    from .dataset import TrainStream

    stream = TrainStream(dataset, seed=seed, rank=dist.rank, world_size=dist.world_size)
    workers = int(cfg.data.num_workers)
    return DataLoader(
        stream,
        batch_size=int(cfg.train.batch_size),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
    )


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the main process.

    Schedulers (SLURM, Kubernetes, `kill -- -PGID`) signal the whole process group; a worker
    dying of that signal would crash the main process before it writes its final checkpoint.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_train(cfg: Config, data_dir, out_dir, val_dir=None, resume: bool = True) -> int:
    """Train, checkpoint and export; returns the process exit code (0 ok, 1 failed or a case was rejected)."""
    dist = DistEnv()
    try:
        return _run(cfg, Path(data_dir), Path(out_dir), Path(val_dir) if val_dir else None, resume, dist)
    except (TrainError, ConfigError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _run(cfg: Config, data_dir: Path, out_dir: Path, val_dir: Optional[Path], resume: bool, dist: DistEnv) -> int:
    from .dataset import SliceDataset
    from .diffusion import GaussianDiffusion
    from .unet import build_unet, network_channels

    tc = cfg.train
    device = select_device(tc.device, dist.local_rank)
    dist.init(device)
    say = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else (lambda msg: None)

    dataset = SliceDataset(data_dir, cfg, augment=True, seed=tc.seed, log=say)
    for err in dataset.errors:
        say(f"warning: skipping case {err}")
    if not len(dataset):
        raise TrainError(f"no training slices in {data_dir}: no usable case with a non-empty mask-healthy")
    say(f"training data: {len(dataset.cases)} cases, {len(dataset.units)} volumes/masks, {len(dataset)} slices")
    val_set = dataset
    if val_dir is not None:
        val_set = SliceDataset(val_dir, cfg, augment=False, seed=tc.seed, log=say)
        for err in val_set.errors:
            say(f"warning: skipping validation case {err}")

    _seed_all(tc.seed)  # identical initial weights on every rank
    raw = build_unet(cfg.model, *network_channels(cfg)).to(device)
    if tc.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion(cfg.diffusion)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=float(tc.lr), weight_decay=float(tc.weight_decay))
    ema = EMA(raw, tc.ema_rate, warmup=tc.ema_warmup)

    step = 0
    ckpts = list_checkpoints(out_dir) if resume else []
    if not resume and list_checkpoints(out_dir) and dist.is_main:
        say(f"warning: not resuming: removing the old checkpoints in {out_dir / CHECKPOINTS}")
        shutil.rmtree(out_dir / CHECKPOINTS)
    dist.barrier()
    if ckpts:
        ckpt = ckpts[-1]
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        _check_same_model(state.get("config", {}), cfg, ckpt)
        raw.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        ema.load(load_file(str(ckpt / "ema.safetensors"), device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if dist.world_size == 1:
            _set_rng_state(state["rng"])
        say(f"resuming from {ckpt} at step {step}")
    elif tc.init_weights:
        _warm_start(raw, ema, cfg, Path(tc.init_weights), device)
        say(f"starting from the weights in {tc.init_weights} (model and EMA; new optimizer, step 0)")
    if not ckpts or dist.world_size > 1:
        _seed_all(tc.seed * 1000003 + dist.rank * 7919 + step)  # each rank draws its own noise

    model: nn.Module = raw
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        model = torch.compile(model)

    log = None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "parameters.yaml")
        log = CsvLog(out_dir / LOG_NAME, resume_step=step)
    validator = Validator(val_set, cfg, device) if dist.is_main and int(tc.val_every) > 0 else None
    ema_model = None

    loader = _make_loader(dataset, cfg, dist, seed=tc.seed * 1000003 + step, device=device)
    batches = iter(loader)
    max_steps = int(tc.max_steps)
    deadline = time.monotonic() + 60.0 * float(tc.max_minutes) if tc.max_minutes else None
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, desc="train", file=sys.stderr)
    sums = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    since, t_last = 0, time.monotonic()
    t_start = time.monotonic()
    with _StopSignal() as stop:
        while step < max_steps:
            batch = next(batches)
            x0 = batch["x0"].to(device, non_blocking=True)
            cond = batch["cond"].to(device, non_blocking=True)
            if tc.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
                cond = cond.contiguous(memory_format=torch.channels_last)
            model.train()
            with _autocast(device, tc.bf16):
                terms = diffusion.training_losses(model, x0, cond)
            loss = terms["loss"].float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), float(tc.grad_clip))
            optimizer.step()
            ema.update(raw, step)
            step += 1
            since += 1
            for key in sums:  # summed on the device: no host sync per step
                if terms.get(key) is not None:
                    sums[key] = sums[key] + terms[key].detach().float().mean()
            bar.update(1)

            if dist.is_main and (step % max(1, int(tc.log_every)) == 0 or step == max_steps):
                now = time.monotonic()
                rate = since / max(now - t_last, 1e-9)
                means = {k: float(v) / since for k, v in sums.items()}
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                log.write(
                    step=step,
                    time_s=round(now - t_start, 3),
                    loss=means["loss"],
                    mse=means["mse"],
                    vb=means["vb"],
                    lr=optimizer.param_groups[0]["lr"],
                    it_per_s=rate,
                    slices_per_s=rate * int(tc.batch_size) * dist.world_size,
                )
                sums = dict.fromkeys(sums, 0.0)
                since, t_last = 0, now
            if validator is not None and step % int(tc.val_every) == 0:
                if ema_model is None:
                    ema_model = copy.deepcopy(raw).eval()
                ema.copy_to(ema_model)
                scores = validator.run(ema_model, diffusion, step, out_dir)
                if scores:
                    log.write(step=step, time_s=round(time.monotonic() - t_start, 3), val_ssim=scores[0], val_psnr=scores[1])
                    bar.write(f"step {step}: validation SSIM {scores[0]:.4f} PSNR {scores[1]:.2f} dB", file=sys.stderr)
            if dist.is_main and step % max(1, int(tc.save_every)) == 0:
                save_checkpoint(out_dir, step, raw, ema, optimizer, cfg, tc.keep_last)
            timed_out = deadline is not None and time.monotonic() >= deadline
            if dist.any(stop.requested or timed_out, device):
                say(f"stopping at step {step} ({'SIGTERM' if stop.requested else 'max_minutes reached'})")
                break
    bar.close()

    digests = dist.gather_strings(weights_digest(raw))
    if dist.is_main:
        save_checkpoint(out_dir, step, raw, ema, optimizer, cfg, tc.keep_last)
        export_weights(out_dir, out_dir / WEIGHTS_NAME)
        summary = {
            "step": step,
            "world_size": dist.world_size,
            "rank_weight_digests": digests,
            "cases": len(dataset.cases),
            "rejected_cases": [str(e) for e in dataset.errors],
        }
        tmp = out_dir / f".train_summary.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out_dir / "train_summary.json")
        say(f"exported EMA weights of step {step} to {out_dir / WEIGHTS_NAME}")
    if len(set(digests)) > 1:  # every rank sees the same digests, so every rank stops here
        raise TrainError(f"ranks ended with different weights ({len(set(digests))} distinct digests)")
    dist.barrier()
    if dataset.errors:
        say(f"{len(dataset.errors)} training case(s) were rejected (see warnings above)")
        return 1
    return 0
