"""Gaussian diffusion (DDPM with learned-range variance), hybrid loss and the sampling loop.

Follows Ho et al. (2020) and Nichol & Dhariwal (2021, "improved DDPM"):

- forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with a linear (or
  cosine) beta schedule, T = 1000 by default;
- the network's first output channel predicts the noise eps (the paper), the clean x0 or
  the velocity v = alpha eps - sigma x0 (``diffusion.prediction``; x0 and v are well
  conditioned at high noise, where one network call from pure noise returns the conditional
  mean); with ``learn_sigma`` a second channel in [-1, 1] interpolates the log variance
  between the posterior variance ``beta~_t`` and ``beta_t``;
- hybrid loss ``L = L_simple + lambda * L_vlb``. ``L_simple`` is the MSE of the prediction
  (optionally min-SNR weighted; timesteps uniform, optionally with extra mass at T - 1); the VB term
  is the KL between the true posterior and the model's reverse step, in bits per dimension,
  with the model mean detached so the VB term only trains the variance. ``L_vlb`` is
  estimated from the single uniformly drawn t as ``T * L_t``, so the VB term added to the
  loss is ``lambda * T * L_t`` (identical to improved DDPM's ``L_t * T / 1000`` for
  lambda = 0.001). At t = 0 improved DDPM uses a discretised decoder for 8-bit images; MRI
  intensities are continuous, so the t = 0 term here is the continuous Gaussian negative
  log-likelihood of x_0 (in bits; it can be negative since it is a density);
- sampling on a respaced subset of timesteps ("space_timesteps"): the kept timesteps keep
  their ``abar``, betas are recomputed from consecutive kept ``abar``s, and the network still
  sees the original timestep indices. ``sample`` runs the reverse loop on it and leaves each
  step to a sampler of ``brainpaint.samplers`` (``ddpm``, ``ddim``, ``dpm2m``: one class and
  one ``step`` each); ``ddpm`` with all 1000 steps is the published sampler.

Everything runs in "diffusion space": tensors [B, 1, H, W], roughly in [-1, 1]. The network is
called as ``model(torch.cat([cond, x_t], 1), t)``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from brainpaint.config.settings import BETA_SCHEDULES
from brainpaint.diffusion.samplers import SAMPLERS

NoiseFn = Callable[[tuple, Optional[torch.Generator]], torch.Tensor]




# --------------------------------------------------------------------------- schedules
def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Beta schedule (float64).

    ``linear``: ``beta_start..beta_end`` are the values for T = 1000 and are scaled by
    ``1000 / T`` (as in improved DDPM) so a shorter chain still ends in near-pure noise.
    ``cosine``: the improved-DDPM cosine schedule (``beta_start``/``beta_end`` unused).
    """
    if num_timesteps < 1:
        raise ValueError(f"diffusion.steps must be positive, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array(
            [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"unknown beta schedule '{schedule}' (choose {' or '.join(BETA_SCHEDULES)})")


def space_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` timesteps of ``range(num_timesteps)``, evenly spaced, always keeping 0 and T-1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot sample with {steps} steps from a {num_timesteps}-step diffusion")
    if steps == 1:
        return np.array([num_timesteps - 1])
    kept = np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64))
    assert len(kept) == steps  # evenly spaced integers are distinct when steps <= T
    return kept


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x, mean, logvar) -> torch.Tensor:
    """Negative log density of x under N(mean, e^logvar) elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def default_noise(shape: tuple, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU without a generator)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


# --------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """Forward process, training loss and samplers for one beta schedule.

    Construct from a DiffusionConfig; :meth:`respaced` derives the same process on a subset of
    timesteps (used by :meth:`sample`).
    """

    def __init__(self, diff_cfg=None, *, betas: Optional[np.ndarray] = None, timestep_map=None):
        if betas is None:
            if diff_cfg is None:
                raise ValueError("GaussianDiffusion needs a DiffusionConfig or betas")
            betas = make_betas(diff_cfg.beta_schedule, diff_cfg.steps, diff_cfg.beta_start, diff_cfg.beta_end)
        self.cfg = diff_cfg
        self.learn_sigma = diff_cfg.learn_sigma if diff_cfg is not None else True
        self.lambda_vlb = diff_cfg.lambda_vlb if diff_cfg is not None else 1e-3
        self.prediction = diff_cfg.prediction if diff_cfg is not None else "eps"
        self.loss_weighting = diff_cfg.loss_weighting if diff_cfg is not None else "uniform"
        self.min_snr_gamma = diff_cfg.min_snr_gamma if diff_cfg is not None else 5.0
        self.terminal_fraction = diff_cfg.terminal_fraction if diff_cfg is not None else 0.0

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        # Original timestep index of each (possibly respaced) step: what the network sees.
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # Posterior q(x_{t-1} | x_t, x_0): beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip the log at t=0 to beta~_1 (only used as a variance bound).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._respaced: dict[int, GaussianDiffusion] = {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor, dtype: Union[torch.dtype, str, None] = None) -> torch.Tensor:
        """arr[t] as a tensor broadcastable to ``like`` ([B, 1, 1, ...]), in ``like``'s dtype
        unless ``dtype`` (a torch dtype or its name, e.g. "float64") is given (the schedule
        itself is float64)."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        out = torch.as_tensor(arr, device=t.device)[t.long()].to(dtype or like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """The same process restricted to ``steps`` evenly spaced timesteps.

        The kept timesteps keep their ``abar``; betas are recomputed as
        ``1 - abar_k / abar_{previous kept}``.
        """
        if steps == self.num_timesteps:
            return self
        if steps not in self._respaced:
            kept = space_timesteps(self.num_timesteps, steps)
            acp = self.alphas_cumprod[kept]
            betas = 1.0 - acp / np.append(1.0, acp[:-1])
            self._respaced[steps] = GaussianDiffusion(self.cfg, betas=betas, timestep_map=self.timestep_map[kept])
        return self._respaced[steps]

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.extract(self.sqrt_alphas_cumprod, t, x0) * x0 + self.extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.extract(self.posterior_mean_coef1, t, xt) * x0 + self.extract(self.posterior_mean_coef2, t, xt) * xt
        var = self.extract(self.posterior_variance, t, xt)
        log_var = self.extract(self.posterior_log_variance_clipped, t, xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        ) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / self.extract(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        )

    def x0_from_prediction(self, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 estimate held by a prediction of type ``self.prediction``."""
        if self.prediction == "x0":
            return pred
        if self.prediction == "v":  # x0 = alpha x_t - sigma v
            return self.extract(self.sqrt_alphas_cumprod, t, xt) * xt - self.extract(
                self.sqrt_one_minus_alphas_cumprod, t, xt
            ) * pred
        return self.predict_x0_from_eps(xt, t, pred)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction == "x0":
            return x0
        if self.prediction == "v":  # v = alpha eps - sigma x0
            return self.extract(self.sqrt_alphas_cumprod, t, x0) * noise - self.extract(
                self.sqrt_one_minus_alphas_cumprod, t, x0
            ) * x0
        return noise

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of the prediction MSE: ones for "uniform".

        "min_snr" weights the x0-space MSE by min(SNR, gamma), written in the prediction's own
        space: the eps-MSE is SNR times the x0-MSE and the v-MSE (SNR + 1) times it.
        """
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        abar = torch.as_tensor(self.alphas_cumprod, device=t.device)[t.long()]
        snr = abar / (1.0 - abar)
        weight = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            weight = weight / snr
        elif self.prediction == "v":
            weight = weight / (snr + 1.0)
        return weight.float()

    def sample_timesteps(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Training timesteps: uniform, a ``terminal_fraction`` share of them replaced by T - 1
        with a zero x_t (the second tensor marks those), the input of one-step sampling."""
        t = torch.randint(0, self.num_timesteps, (n,), device=device)
        terminal = torch.zeros(n, dtype=torch.bool, device=device)
        if self.terminal_fraction > 0:
            terminal = torch.rand(n, device=device) < self.terminal_fraction
            t = torch.where(terminal, torch.full_like(t, self.num_timesteps - 1), t)
        return t, terminal

    # ------------------------------------------------------------------ reverse process
    def _split_output(self, out: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        expected = 2 * xt.shape[1] if self.learn_sigma else xt.shape[1]
        if out.shape[1] != expected:
            raise ValueError(
                f"the network outputs {out.shape[1]} channels but the diffusion expects {expected} "
                f"(learn_sigma={self.learn_sigma})"
            )
        if self.learn_sigma:
            eps, v = out.chunk(2, dim=1)
            return eps, v
        return out, None

    def p_mean_variance_from_output(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: Union[bool, float] = True
    ) -> dict[str, torch.Tensor]:
        """Reverse-step mean, log variance, predicted x0 and eps from the raw network output."""
        out = out.float()
        raw, v = self._split_output(out, xt)
        if v is not None:
            # Learned range: v in [-1, 1] interpolates log beta~_t (v=-1) and log beta_t (v=+1).
            min_log = self.extract(self.posterior_log_variance_clipped, t, xt)
            max_log = self.extract(np.log(self.betas), t, xt)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            # Fixed variance: the posterior variance beta~_t (clipped at t=0).
            log_var = self.extract(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        x0 = self.x0_from_prediction(raw, xt, t)
        clipped = clip_denoised is not False and clip_denoised is not None
        if clipped:
            bound = 1.0 if clip_denoised is True else float(clip_denoised)
            x0 = x0.clamp(-bound, bound)
        eps = raw if (self.prediction == "eps" and not clipped) else self.predict_eps_from_x0(xt, t, x0)
        mean, _, _ = self.q_posterior_mean_variance(x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": x0, "eps": eps}

    def _model_output(self, model: nn.Module, cond: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_t = torch.as_tensor(self.timestep_map, device=t.device)[t.long()]
        return model(torch.cat([cond, xt.to(cond.dtype)], dim=1), model_t)

    # ------------------------------------------------------------------ training
    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        cond: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss for one batch: dict(loss, mse, vb) of scalar batch means.

        ``t`` defaults to `sample_timesteps`, ``noise`` to standard normal noise. ``weight``
        ([B, 1, H, W], default ones) weighs each pixel's terms: 0 where the truth is unknown
        (a voided tumour, whose healthy tissue nobody has seen). ``mse`` is the
        (weighted) MSE of the prediction type: on eps, x0 or v. Terminal samples (see
        `sample_timesteps`) see x_t = 0, exactly what sampling from temperature 0 feeds the
        network first: their target is what x_t = 0 implies (the noise -alpha / sigma x0), so
        for every prediction type the network learns the conditional mean of x0 there.
        """
        b = x0.shape[0]
        terminal = torch.zeros(b, dtype=torch.bool, device=x0.device)
        if t is None:
            t, terminal = self.sample_timesteps(b, x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        if terminal.any():
            zero = terminal.view(-1, *([1] * (x0.ndim - 1)))
            xt = torch.where(zero, torch.zeros_like(xt), xt)
            implied = -self.extract(self.sqrt_alphas_cumprod, t, x0) / self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
            noise = torch.where(zero, implied, noise)
        out = self._model_output(model, cond, xt, t).float()
        pred, v = self._split_output(out, xt)
        weight = torch.ones_like(x0) if weight is None else weight.to(x0.dtype)
        mse = _mean_flat(weight * (self.prediction_target(x0, noise, t) - pred) ** 2) * self.loss_weights(t)
        if v is not None:
            # Detach the mean: the VB term only shapes the variance (improved DDPM).
            frozen = torch.cat([pred.detach(), v], dim=1)
            vb = self._vb_bits(frozen, x0, xt, t, weight) * (self.lambda_vlb * self.num_timesteps)
        else:
            vb = torch.zeros_like(mse)
        loss = mse + vb
        return {"loss": loss.mean(), "mse": mse.mean(), "vb": vb.mean()}

    def _vb_bits(
        self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Per-sample L_t in bits per dimension (pixels weighed by `weight`, default ones): KL for
        t > 0, Gaussian decoder NLL at t = 0."""
        weight = torch.ones_like(x0) if weight is None else weight
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        pred = self.p_mean_variance_from_output(out, xt, t, clip_denoised=False)
        kl = _mean_flat(weight * normal_kl(true_mean, true_log_var, pred["mean"], pred["log_variance"])) / math.log(2.0)
        nll = _mean_flat(weight * gaussian_nll(x0, pred["mean"], pred["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def sample(
        self,
        model: nn.Module,
        cond: torch.Tensor,
        *,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        noise_fn: Optional[NoiseFn] = None,
        clip_denoised: Union[bool, float] = True,
        progress: bool = False,
        autocast: Optional[torch.dtype] = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw x_0 [B, 1, H, W] (diffusion space) given the conditioning ``cond`` [B, C, H, W].

        - ``sampler``: a name of ``samplers.SAMPLERS``: ``"ddpm"`` (ancestral, learned
          variance), ``"ddim"`` (``eta`` = 0 is deterministic given the initial noise) or
          ``"dpm2m"`` (DPM-Solver++(2M), a deterministic second-order multistep solver of the
          same ODE as DDIM with eta = 0: more accurate for few steps); all on ``steps``
          respaced timesteps.
        - ``generator``: makes the draw reproducible; noise is drawn on the generator's device
          and moved to ``cond``'s device, so a CPU generator gives the same noise everywhere.
        - ``noise_fn(shape, generator)``: replaces the standard normal draws (e.g. one
          stream per slice, ``noise.SliceNoise``).
        - ``clip_denoised``: clamp the predicted x_0 to [-1, 1] (or to +-value for a float).
        - ``autocast``: dtype for the network under autocast (e.g. torch.bfloat16 on CUDA);
          the diffusion arithmetic stays float32.
        - ``temperature``: scale of the initial noise x_T and of every noise draw of the
          reverse steps (1 = the model's distribution). Below 1 the draws concentrate towards
          the centre of the distribution; 0 with DDIM (eta = 0) follows the probability-flow
          ODE from x_T = 0, one deterministic estimate near the conditional mean.
        """
        _check_sampling(sampler, temperature)
        spaced = self.respaced(steps)
        solver = SAMPLERS[sampler](spaced, eta=eta)
        draw = _noise_source(noise_fn, generator, cond.device)
        noise = lambda shape: float(temperature) * draw(shape)  # noqa: E731
        b, _, h, w = cond.shape
        shape = (b, 1, h, w)
        amp = torch.autocast(cond.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        x = noise(shape)
        for i in tqdm(range(spaced.num_timesteps - 1, -1, -1), desc=f"{sampler} sampling", leave=False, disable=not progress):
            t = torch.full((b,), i, device=cond.device, dtype=torch.long)
            with amp:
                out = spaced._model_output(model, cond, x, t)
            pred = spaced.p_mean_variance_from_output(out, x, t, clip_denoised)
            x = solver.step(pred, x, t, i, noise)
        return x


def _check_sampling(sampler: str, temperature: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}' (choose {', '.join(SAMPLERS)})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def _noise_source(noise_fn: Optional[NoiseFn], generator: Optional[torch.Generator], device) -> Callable:
    """Unscaled standard normal draws of a shape, float32 on ``device``."""
    draw = noise_fn or default_noise
    return lambda shape: draw(tuple(shape), generator).to(device=device, dtype=torch.float32)
