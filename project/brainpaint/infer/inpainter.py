"""The diffusion predictor: a trained network fills the mask of a case, slice by slice.

`DiffusionInpainter(cfg)` is built once per run (weights, network, diffusion) and is stateless
between cases, so one bad case cannot affect the next. Per case:

0. The case is turned to RAS axes (`CaseData.in_ras`), the frame of the training brains and
   the atlas; the result is turned back to the case's own array order at the end.
1. `dataset.volume_inputs` normalises the voided volume with the metric's own percentile map
   (so the network's [0, 1] is the metric's [0, 1]) and builds the prior-filled `b` channel.
2. In-plane windows are chosen once per volume, so all slices of a window stack into batches:
   the whole-slice window of whole-slice models; for crop models either windows of exactly
   the training crop size covering the mask, blended where they overlap (`infer.tile`), or
   one box grown around the whole mask.
3. Every axial slice of a window that contains mask voxels is conditioned and denoised; slices
   go through the network `infer.batch_slices` at a time (not one by one), under
   `torch.inference_mode` and, on CUDA, bf16 autocast. Each slice draws its noise from its own
   seed, so the result does not depend on the batch size.
4. `infer.ensemble` independent samples are averaged (the challenge metrics reward the
   conditional mean); their standard deviation is returned as an uncertainty map.
5. An optional Gaussian post-filter smooths the in-mask result, then the volume is mapped back
   to the input intensity scale. `batch.py` restores every known voxel bit-exactly.

The same weights serve every sampler: `ddpm` with 1000 steps is the paper-faithful ancestral
path; `ddim` (or respaced `ddpm`) with few steps is the fast default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from brainpaint.conditioning import geometry
from brainpaint.conditioning.inputs import PriorCache, VolumeInputs, volume_inputs
from brainpaint.conditioning.layout import InputLayout
from brainpaint.conditioning.target import decode_sample
from brainpaint.config.presets import size_multiple
from brainpaint.config.settings import MODEL_SECTIONS, Config
from brainpaint.diffusion.process import GaussianDiffusion
from brainpaint.diffusion.sampling import run_settings, sample_slices
from brainpaint.errors import CaseError, InferenceSetupError
from brainpaint.infer.prediction import Prediction
from brainpaint.infer.smoothing import smooth_in_mask
from brainpaint.io.brats import from_ras, warn
from brainpaint.model.devices import select_device
from brainpaint.model.weights import WEIGHTS_FILE_ERRORS, load_model
from brainpaint.model.weights_path import resolve_weights
from brainpaint.stages import Stages


def _setting(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def warn_overridden(cfg: Config, weights_cfg: Config, weights) -> list[str]:
    """Say in one line which model/diffusion/data values of the parameters the weights replace."""
    keys = sorted(
        k for k in cfg.explicit if k.split(".")[0] in MODEL_SECTIONS and _setting(cfg, k) != _setting(weights_cfg, k)
    )
    if keys:
        given = ", ".join(f"{k}={_setting(cfg, k)!r}" for k in keys)
        used = ", ".join(f"{k}={_setting(weights_cfg, k)!r}" for k in keys)
        warn(f"the weights {weights} define {used}; the parameters' {given} are not used for inference")
    return keys


# On the CPU the network runs on channels-last tensors: oneDNN's convolutions take about a fifth
# less time on them, with the same values to 1e-5 (docs/RESULTS.md, CPU speed).
CPU_CHANNELS_LAST = True

def eps_steps(cfg: Config, weights_cfg: Config, weights):
    """The infer settings to run (`sampling.run_settings`): `cfg.infer`, with EPS_STEPS steps for
    eps weights unless the parameters chose the steps (said in one line)."""
    inf = run_settings(cfg.infer, weights_cfg.diffusion.prediction, "infer.steps" in cfg.explicit)
    if inf.steps != cfg.infer.steps:
        warn(f"the weights {weights} predict eps, which needs more than {cfg.infer.steps} step(s): "
             f"running {inf.steps} {inf.sampler} steps (set infer.steps to choose)")
    return inf


# --------------------------------------------------------------------------- the diffusion predictor
class DiffusionInpainter:
    """Predictor `(data: CaseData, seed: int) -> Prediction` backed by a trained diffusion model.

    The network, diffusion schedule and data transform (prior, crop size, slice size, context
    slices) come from the weights file's own metadata, so a weights file always runs with the
    settings it was trained with (a parameters file that sets others gets a warning); the
    sampling settings come from `cfg.infer`.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.infer = cfg.infer
        self.device = select_device(self.infer.device, announce=True)
        self.weights = resolve_weights(self.infer.weights)
        try:
            self.model, self.model_cfg = load_model(self.weights, self.device)
        except WEIGHTS_FILE_ERRORS as exc:  # corrupt file, wrong metadata: one clear line
            raise InferenceSetupError(f"cannot load weights {self.weights}: {exc}") from exc
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        warn_overridden(cfg, self.model_cfg, self.weights)
        self.infer = eps_steps(cfg, self.model_cfg, self.weights)
        self.diffusion = GaussianDiffusion(self.model_cfg.diffusion)
        if self.infer.steps > self.diffusion.num_timesteps:
            raise InferenceSetupError(
                f"infer.steps must be <= the {self.diffusion.num_timesteps} diffusion steps of {self.weights}, "
                f"got {self.infer.steps}"
            )
        self.data_cfg = self.model_cfg.data
        self.layout = InputLayout.of(self.model_cfg)
        self.multiple = size_multiple(self.model_cfg.model)
        # Harmonic fills and midlines known in advance, by case id (scoring the same cases again).
        self.known_priors: dict[str, PriorCache] = {}
        # The population atlas the weights carry (`model.atlas`), for the atlas channel.
        self.atlas = self.model.atlas.detach().float().cpu().numpy() if self.model_cfg.model.atlas else None

    @property
    def channels_last(self) -> bool:
        return CPU_CHANNELS_LAST and self.device.type == "cpu"

    def volume_inputs(self, data, stages: Optional[Stages] = None) -> VolumeInputs:
        """`dataset.volume_inputs` of a case in RAS axes (`CaseData.in_ras`, as are the methods
        below): its harmonic fill and midline if known in advance (`known_priors`, also RAS),
        and the weights' atlas; `stages` times its steps."""
        return volume_inputs(data.voided, data.mask, self.data_cfg, self.known_priors.get(data.id), self.atlas, stages)

    def prepare(self, data) -> "PreparedCase":
        """Everything of a case before the network (turned to RAS, its `volume_inputs`), with
        its stage times: `batch.run_infer` prepares the next case while the network fills this one."""
        stages = Stages()
        with stages.time("load"):  # turning the arrays is part of reading the case
            ras = data.in_ras()
        if not np.asarray(ras.mask, dtype=bool).any():
            raise CaseError(data.id, "mask is empty: nothing to inpaint")
        return PreparedCase(data.id, ras, self.volume_inputs(ras, stages), stages)

    # ------------------------------------------------------------------ geometry
    def slice_box(self, data) -> tuple[slice, slice]:
        """One in-plane box for the whole volume, so all slices stack into batches.

        Whole-slice models get the `data.slice_size` window holding the brain; crop models a
        box around the mask grown by `infer.crop_margin`. Where the grid is smaller than the
        network patch (or not a multiple of the U-Net's downsampling factor), the box is
        extended past the high end of the grid; `slice_conditioning` fills that part with
        zeros (background), as `geometry.crop` pads training patches, and `geometry.paste`
        ignores it.
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

    def windows(self, data) -> list[tuple[tuple[slice, slice], Optional[np.ndarray]]]:
        """(box, blending weight) of every in-plane window of a case; weight None for a single
        window that holds the whole mask."""
        size = self.data_cfg.crop_size
        if size is None or not self.infer.tile:
            return [(self.slice_box(data), None)]
        mask = np.asarray(data.mask, dtype=bool)
        boxes = geometry.window_boxes(mask, size, margin=self.infer.crop_margin)
        return [(box, geometry.window_weight(size)) for box in boxes]

    def plan(self, data) -> list[tuple[tuple[slice, slice], Optional[np.ndarray], list[int]]]:
        """(box, blending weight, slices) of every window (`windows`): on each slice only the
        fewest windows whose cores hold its mask voxels (`geometry.slices_per_window`)."""
        windows = self.windows(data)
        zs = geometry.slices_per_window(data.mask, [box for box, _ in windows], self.infer.crop_margin)
        return [(box, weight, z) for (box, weight), z in zip(windows, zs)]

    # ------------------------------------------------------------------ sampling
    def _autocast_dtype(self) -> Optional[torch.dtype]:
        """bf16 for the network on CUDA with `infer.bf16` (the diffusion arithmetic stays float32); never on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" and self.infer.bf16 else None

    def sample_slices(self, cond: np.ndarray, seed: int, member: int, keys: Optional[list] = None) -> np.ndarray:
        """`sampling.sample_slices` of conditioned slices [N, C, H, W] -> x0 [N, H, W] with this
        predictor's network, diffusion and settings."""
        return sample_slices(self.diffusion, self.model, cond, self.infer, self.data_cfg.prior, self.device, seed, member,
                             keys, channels_last=self.channels_last,
                             autocast=self._autocast_dtype())

    # ------------------------------------------------------------------ one case
    def conditioning(self, data, vin=None, box=None):
        """(slice indices, VolumeInputs, box, conditioning [N, C, H, W]) of the masked slices of
        one window (`box`, default the single window of `slice_box`)."""
        mask = np.asarray(data.mask, dtype=bool)
        if not mask.any():
            raise CaseError(data.id, "mask is empty: nothing to inpaint")
        if vin is None:
            vin = self.volume_inputs(data)
        box = self.slice_box(data) if box is None else box
        zs = [int(z) for z in np.flatnonzero(geometry.crop(mask, box).any(axis=(0, 1)))]
        if not zs:  # a window of the grid that holds no mask voxel
            return zs, vin, box, None
        cond = np.stack([self.layout.build(vin, z, box) for z in zs])
        return zs, vin, box, cond

    def fill(self, data, vin, seed: int, member: int, stages: Optional[Stages] = None) -> np.ndarray:
        """One member's fill of the mask voxels ([0, 1] scale, the volume's C order); slice z of
        window w draws its noise from the key (w, z). The (window, slice) pairs of `plan` go
        through the network `infer.batch_slices` at a time, across windows, each batch's
        conditioning cut out just before it runs."""
        stages = Stages.of(stages)
        mask = np.asarray(data.mask, dtype=bool)
        total = np.zeros(mask.shape, np.float32)
        weights = np.zeros(mask.shape, np.float32)
        plan = self.plan(data)
        pairs = [(w, z) for w, (_, _, zs) in enumerate(plan) for z in zs]
        batch = self.infer.batch_slices or max(len(pairs), 1)
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            with stages.time("conditioning"):
                cond = np.stack([self.layout.build(vin, z, plan[w][0]) for w, z in chunk])
            with stages.time("network"):
                x0 = self.sample_slices(cond, seed, member, keys=[(w, z) for w, z in chunk])
                stages.count("windows", len(chunk))  # slice windows, and the network's forward passes
                stages.count("passes", self.infer.steps * (2 if self.infer.flip_average else 1))
                images = decode_sample(x0, cond[:, self.layout.index("b")], self.data_cfg.prior)
                for (w, z), image in zip(chunk, images):
                    box, weight = plan[w][0], plan[w][1]
                    weight = np.ones(image.shape, np.float32) if weight is None else weight
                    for target, values in ((total, weight * image), (weights, weight)):
                        plane = geometry.crop(target[:, :, z], box) + values
                        geometry.paste(plane, box, target[:, :, z], where=mask[:, :, z])
        return total[mask] / weights[mask]

    def __call__(self, data, seed: int, prepared: Optional["PreparedCase"] = None) -> Prediction:
        """The prediction of a case, in its own array order (filled in RAS axes); `prepared` is
        its `prepare` if done before (else it is done here). The prediction carries the stage
        times and the conditioning's fallbacks as warnings."""
        if prepared is None:
            prepared = self.prepare(data)
        elif prepared.case_id != data.id:
            raise ValueError(f"inputs prepared for {prepared.case_id} given with case {data.id}")
        pred = self.predict_ras(prepared.ras, seed, prepared.vin, prepared.stages)
        with prepared.stages.time("write"):  # turning the result back is part of writing it
            back = lambda a: None if a is None else from_ras(a, data.affine)  # noqa: E731
            return Prediction(volume=back(pred.volume), std=back(pred.std), slices=pred.slices,
                              warnings=pred.warnings, stages=prepared.stages)

    @torch.inference_mode()
    def predict_ras(self, data, seed: int, vin: Optional[VolumeInputs] = None, stages: Optional[Stages] = None) -> Prediction:
        """The prediction of a case given in RAS axes, in RAS axes (`vin` its `volume_inputs`
        if computed before; `stages` times the steps)."""
        stages = Stages.of(stages)
        mask = np.asarray(data.mask, dtype=bool)
        if not mask.any():
            raise CaseError(data.id, "mask is empty: nothing to inpaint")
        vin = self.volume_inputs(data, stages) if vin is None else vin
        # Normalised volume: known voxels from the voided image; each member fills the mask.
        base = vin.imap.normalize(data.voided)
        members = np.empty((self.infer.ensemble, int(mask.sum())), dtype=np.float32)
        for k in range(members.shape[0]):
            members[k] = self.fill(data, vin, seed, k, stages)

        with stages.time("network"):  # the members' mean, filtered, on the input scale
            mean = base.copy()
            mean[mask] = members.mean(axis=0)
            mean = smooth_in_mask(mean, mask, self.infer.smoothing_sigma, self.infer.smoothing_border)
            volume = np.array(data.voided, dtype=np.float32, copy=True)
            volume[mask] = vin.imap.denormalize(np.clip(mean[mask], 0.0, 1.0))
        std = None
        if members.shape[0] > 1:
            std = np.zeros(mask.shape, dtype=np.float32)
            std[mask] = members.std(axis=0) * np.float32(vin.imap.hi - vin.imap.lo)
        return Prediction(volume=volume, std=std, slices=int(mask.any(axis=(0, 1)).sum()), warnings=list(vin.notes),
                          stages=stages)


@dataclass
class PreparedCase:
    """A case made ready for the network (`DiffusionInpainter.prepare`): its id, the case in
    RAS axes, its volume inputs and the stage times so far."""

    case_id: str
    ras: object  # CaseData in RAS axes
    vin: VolumeInputs
    stages: Stages
