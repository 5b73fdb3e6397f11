"""Training: a small `Trainer` that builds a run, restores it, steps it, runs its hooks, finishes it.

A run lives in one output folder:

    <out>/checkpoints/step_XXXXXXXX/     model, EMA, optimizer and RNG states (checkpoints.py)
    <out>/train_log.csv                  one row per log interval and per validation (log.py)
    <out>/validation/step_XXXXXXXX.png   b | m | EMA sample | ground truth (preview.py)
    <out>/model.safetensors              the exported EMA weights, what inference loads (export.py)
    <out>/train_summary.json             final step, world size, per-rank weight digests
    <out>/parameters.yaml                the run's configuration

`resume` continues from the newest checkpoint at the same step with the same EMA, optimizer,
every rank's RNG states and the same position in the data stream: the resumed run computes
what the uninterrupted one would have. A fresh run (`resume=False`) sets the old checkpoints
aside and deletes them only once it has saved its own first one. Under torchrun every rank trains on its own shard of the slices through
DistributedDataParallel (distributed.py); only rank 0 writes. `train.batch_size` is the batch
of one rank. AdamW, EMA weights (ema.py), bf16 autocast, torch.compile and channels_last on CUDA.
A run stops at `train.max_steps`, `train.max_minutes` of wall time or `train.max_cpu_minutes`
of CPU time (budget.py, which also sets the learning rate); `train.export_every` writes the EMA
weights to `<out>/exports/step_XXXXXXXX.safetensors` as the run goes (learning curves).
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from brainpaint.conditioning.layout import network_channels
from brainpaint.config.presets import size_multiple
from brainpaint.config.settings import Config
from brainpaint.data.atlas_build import atlas_from_cases
from brainpaint.data.slices import SliceDataset
from brainpaint.data.stream import train_loader
from brainpaint.diffusion.process import GaussianDiffusion
from brainpaint.errors import CaseError, ConfigError, TrainError, one_line
from brainpaint.io.atomic import write_text
from brainpaint.model.devices import select_device
from brainpaint.model.unet import build_unet
from brainpaint.model.weights_path import WEIGHTS_NAME
from brainpaint.train.budget import Budget
from brainpaint.train.checkpoints import (check_same_model, drop_aside, list_checkpoints, put_back, rng_state,
                                          save_checkpoint, seed_all, set_aside, set_rng_state)
from brainpaint.train.distributed import DistEnv, StopSignal, weights_digest
from brainpaint.train.ema import EMA
from brainpaint.train.export import export_ema, export_weights, hold_atlas, warm_start
from brainpaint.train.log import LOG_NAME, CsvLog, Progress
from brainpaint.train.preview import Validator


class Trainer:
    """One training run: `run()` = build, restore, the step loop with its hooks, finish."""

    def __init__(self, cfg: Config, data_dir, out_dir, val_dir=None, resume: bool = True, dist: Optional[DistEnv] = None):
        self.cfg, self.tc = cfg, cfg.train
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.val_dir = Path(val_dir) if val_dir else None
        self.resume = resume
        self.dist = dist or DistEnv()
        self.step, self.cpu_before = 0, 0.0
        self.rng: Optional[dict] = None  # this rank's RNG state of the checkpoint resumed from
        self.aside: Optional[Path] = None  # the previous run's checkpoints, while not yet replaced

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, file=sys.stderr)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Device, data, network, diffusion, optimizer and EMA."""
        tc, dist = self.tc, self.dist
        self.device = select_device(tc.device, dist.local_rank)
        dist.init(self.device)
        multiple, size = size_multiple(self.cfg.model), self.cfg.data.crop_size or self.cfg.data.slice_size
        if size % multiple:
            key = "crop_size" if self.cfg.data.crop_size else "slice_size"
            raise TrainError(f"data.{key} ({size}) must be a multiple of {multiple}, the network's downsampling factor")
        self.dataset = self._dataset(self.data_dir, "case", augment=True)
        if not len(self.dataset):
            raise TrainError(f"no training slices in {self.data_dir}: no usable case with a non-empty mask-healthy")
        ds = self.dataset
        self.say(f"training data: {len(ds.cases)} cases, {len(ds.units)} volumes/masks, {len(ds)} slices")
        self.val_set = self._dataset(self.val_dir, "validation case", augment=False) if self.val_dir else ds
        seed_all(tc.seed)  # identical initial weights on every rank
        self.raw = build_unet(self.cfg.model, *network_channels(self.cfg)).to(self.device)
        if tc.channels_last:
            self.raw = self.raw.to(memory_format=torch.channels_last)
        self.diffusion = GaussianDiffusion(self.cfg.diffusion)
        self.optimizer = torch.optim.AdamW(self.raw.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.ema = EMA(self.raw, tc.ema_rate, warmup=tc.ema_warmup)

    def _dataset(self, folder: Path, what: str, augment: bool) -> SliceDataset:
        try:
            dataset = SliceDataset(folder, self.cfg, augment=augment, seed=self.tc.seed, log=self.say)
        except (FileNotFoundError, NotADirectoryError) as exc:  # the data folder itself
            raise TrainError(str(exc)) from exc
        for err in dataset.errors:
            self.say(f"warning: skipping {what} {err}")
        return dataset

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Continue from the newest checkpoint, or warm-start from `train.init_weights`."""
        dist, out = self.dist, self.out_dir
        ckpts = list_checkpoints(out) if self.resume else []
        if not self.resume and dist.is_main:
            self.aside = set_aside(out)
            if self.aside:
                self.say(f"warning: not resuming: the old checkpoints wait in {self.aside} until this run has saved one")
        dist.barrier()
        if ckpts:
            self._resume_from(ckpts[-1])
        elif self.tc.init_weights:
            warm_start(self.raw, self.ema, self.cfg, Path(self.tc.init_weights), self.device)
            self.say(f"starting from the weights in {self.tc.init_weights} (model and EMA; new optimizer, step 0)")
        if self.cfg.model.atlas:  # the data sets compute the atlas channel from the network's atlas
            build = lambda: atlas_from_cases(self.dataset.cases, log=self.say, fit=self.cfg.data.atlas_fit)  # noqa: E731
            self.dataset.atlas = self.val_set.atlas = hold_atlas(self.raw, self.ema, build)
        if self.rng is None:
            seed_all(self.tc.seed * 1000003 + dist.rank * 7919 + self.step)  # each rank draws its own noise

    def _resume_from(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        check_same_model(state.get("config", {}), self.cfg, ckpt)
        self.raw.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(self.device)))
        self.ema.load(load_file(str(ckpt / "ema.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.cpu_before = int(state["step"]), float(state.get("cpu_seconds", 0.0))
        ranks = state.get("rng_ranks", [state["rng"]])
        if len(ranks) == self.dist.world_size:
            self.rng = ranks[self.dist.rank]  # restored in `start`, once the data loader is built
        else:
            self.say(f"warning: {ckpt} holds RNG states of {len(ranks)} rank(s), not {self.dist.world_size}: new seeds")
        self.say(f"resuming from {ckpt} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        """Wrap the network (DDP, compile), open the log, set up validation and the data stream."""
        tc, dist = self.tc, self.dist
        self.model: nn.Module = self.raw
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.raw, device_ids=ids)
        if tc.compile:
            self.model = torch.compile(self.model)
        log = None
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out_dir / "parameters.yaml")
            log = CsvLog(self.out_dir / LOG_NAME, resume_step=self.step)
        self.progress = Progress(log, slices_per_step=tc.batch_size * dist.world_size)
        self.validator = Validator(self.val_set, self.cfg, self.device) if dist.is_main and tc.val_every > 0 else None
        self.ema_model = None
        self.batches = iter(train_loader(self.dataset, self.tc, self.cfg.data.num_workers, self.dist, self.step, self.device))
        if self.rng is not None:  # after the loader's own draw: the uninterrupted run's state from here
            set_rng_state(self.rng)
        self.budget = Budget(tc, self.cpu_before)
        self.bar = tqdm(total=tc.max_steps, initial=self.step, disable=not dist.is_main, dynamic_ncols=True,
                        desc="train", file=sys.stderr)

    def train_step(self, batch: dict) -> None:
        """One optimizer step and EMA update on one batch."""
        tc = self.tc
        x0 = batch["x0"].to(self.device, non_blocking=True)
        cond = batch["cond"].to(self.device, non_blocking=True)
        weight = batch["weight"].to(self.device, non_blocking=True)
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            cond = cond.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.budget.set_lr(self.optimizer, self.step)
        amp = self.device.type == "cuda" and tc.bf16
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            terms = self.diffusion.training_losses(self.model, x0, cond, weight=weight)
        loss = terms["loss"].float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.ema.update(self.raw, self.step)
        self.step += 1
        self.progress.add(terms)
        self.bar.update(1)

    def hooks(self) -> None:
        """After a step: log, validate and checkpoint when their intervals come round."""
        tc, step = self.tc, self.step
        if self.dist.is_main and (step % tc.log_every == 0 or step == tc.max_steps):
            loss = self.progress.write(self.step, self.optimizer.param_groups[0]["lr"])
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if self.validator is not None and step % tc.val_every == 0:
            self._validate()
        if tc.export_every and step % tc.export_every == 0 and self.dist.is_main:
            self._export_step()
        if step % tc.save_every == 0:
            rng = self.dist.gather(rng_state())
            self.dist.on_main(self.device, "write the checkpoint", lambda: self._save(rng))

    def _export_step(self) -> None:
        path = self.out_dir / "exports" / f"step_{self.step:08d}.safetensors"
        export_ema(self.ema, self.cfg, self.step, path, self.budget.cpu_seconds())

    def _save(self, rng: list) -> None:
        save_checkpoint(self.out_dir, self.step, self.raw, self.ema, self.optimizer, self.cfg, self.tc.keep_last, rng,
                        self.budget.cpu_seconds())
        drop_aside(self.aside)  # the previous run's checkpoints, now replaced
        self.aside = None

    def _validate(self) -> None:
        if self.ema_model is None:
            self.ema_model = copy.deepcopy(self.raw).eval()
        self.ema.copy_to(self.ema_model)
        scores = self.validator.run(self.ema_model, self.diffusion, self.step, self.out_dir)
        if scores:
            self.progress.write_validation(self.step, *scores)
            self.bar.write(f"step {self.step}: validation SSIM {scores[0]:.4f} PSNR {scores[1]:.2f} dB", file=sys.stderr)

    def run(self) -> int:
        """Train until `train.max_steps`, SIGTERM or `train.max_minutes`; returns the exit code."""
        try:
            self.build()
            self.restore()
            self.start()
            return self._loop()
        except BaseException:
            if self.dist.is_main:
                put_back(self.out_dir, self.aside)  # ended before saving: the old checkpoints return
            raise

    def _loop(self) -> int:
        deadline = time.monotonic() + 60.0 * self.tc.max_minutes if self.tc.max_minutes else None
        try:
            with StopSignal() as stop:
                while self.step < self.tc.max_steps:
                    self.train_step(next(self.batches))
                    self.hooks()
                    timed_out = (deadline is not None and time.monotonic() >= deadline) or self.budget.cpu_spent()
                    if self.dist.any(stop.requested or timed_out, self.device):
                        self.say(f"stopping at step {self.step} ({'SIGTERM' if stop.requested else 'time budget reached'})")
                        break
        finally:
            self.batches = None  # the last reference: loader workers shut down now, not at exit
            self.bar.close()
        return self.finish()

    # ------------------------------------------------------------------ finish
    def finish(self) -> int:
        """Final checkpoint, exported EMA weights and summary; every rank checks the digests."""
        dist = self.dist
        digests = dist.gather(weights_digest(self.raw))
        rng = dist.gather(rng_state())
        self.dist.on_main(self.device, "write the final checkpoint and weights", lambda: self._write_final(digests, rng))
        if len(set(digests)) > 1:  # every rank sees the same digests, so every rank stops here
            raise TrainError(f"ranks ended with different weights ({len(set(digests))} distinct digests)")
        dist.barrier()
        if self.dataset.errors:
            self.say(f"{len(self.dataset.errors)} training case(s) were rejected (see warnings above)")
            return 1
        return 0

    def _write_final(self, digests: list[str], rng: list) -> None:
        out, step = self.out_dir, self.step
        self._save(rng)
        export_weights(out, out / WEIGHTS_NAME)
        if self.tc.export_every:
            self._export_step()
        summary = {
            "step": step,
            "world_size": self.dist.world_size,
            "rank_weight_digests": digests,
            "cases": len(self.dataset.cases),
            "rejected_cases": [str(e) for e in self.dataset.errors],
        }
        write_text(out / "train_summary.json", json.dumps(summary, indent=2))
        self.say(f"exported EMA weights of step {step} to {out / WEIGHTS_NAME}")


def run_train(cfg: Config, data_dir, out_dir, val_dir=None, resume: bool = True) -> int:
    """Train, checkpoint and export; returns the process exit code (0 ok, 1 failed or a case was rejected)."""
    dist = DistEnv()
    try:
        return Trainer(cfg, data_dir, out_dir, val_dir, resume, dist).run()
    except (TrainError, ConfigError, CaseError) as exc:  # user-facing; anything else is a bug: traceback
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        dist.close()
