"""Dev-only: the DDIM and DPM-Solver++(2M) samplers against diffusers' schedulers.

Skipped unless `diffusers` is installed (`pip install -r requirements-extra.txt`; it is not a
dependency of brainpaint). Both libraries integrate the same fixed model output function on
the same linear schedule (beta 1e-4..0.02, T = 1000) and the same ten timesteps
(0, 111, ..., 999); their trajectories must agree step by step. Differences come only from
diffusers building its betas in float32 where brainpaint uses float64.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (dev-only: requirements-extra.txt)")

from brainpaint.config.settings import DiffusionConfig  # noqa: E402
from brainpaint.diffusion.process import GaussianDiffusion  # noqa: E402
from brainpaint.diffusion.samplers import SAMPLERS  # noqa: E402

STEPS = 10
TOLERANCE = dict(rtol=1e-4, atol=2e-5)


def eps_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A fixed, smooth stand-in for a trained network's noise prediction."""
    return 0.8 * torch.tanh(x) + 0.1 * torch.sin(3 * x) + 0.05 * (t / 1000.0)


def _ours(name: str, x: torch.Tensor, eta: float = 0.0, noises=None) -> list[torch.Tensor]:
    process = GaussianDiffusion(DiffusionConfig(learn_sigma=False)).respaced(STEPS)
    solver = SAMPLERS[name](process, eta=eta)
    trajectory = []
    for step, i in enumerate(range(STEPS - 1, -1, -1)):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        out = eps_model(x, int(process.timestep_map[i]))
        pred = process.p_mean_variance_from_output(out, x, t, clip_denoised=False)
        x = solver.step(pred, x, t, i, lambda shape, n=(noises[step] if noises else None): n)
        trajectory.append(x)
    return trajectory


def _schedule_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _start(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_ddim_scheduler(eta):
    scheduler = diffusers.DDIMScheduler(**_schedule_kwargs(), clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing="linspace", prediction_type="epsilon")
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    # diffusers steps from t to t - T // num_inference_steps; our kept timesteps are 111 apart.
    scheduler.num_inference_steps = 1000 // 111
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(2, 1, 8, 8, generator=gen) for _ in range(STEPS)] if eta else None
    theirs = []
    x = _start()
    for step, t in enumerate(scheduler.timesteps):
        kwargs = {"eta": eta, "variance_noise": noises[step]} if eta else {}
        x = scheduler.step(eps_model(x, int(t)), int(t), x, **kwargs).prev_sample
        theirs.append(x)
    ours = _ours("ddim", _start(), eta=eta, noises=noises)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"step {step}: {m}")


def test_dpm_solver_2m_matches_diffusers_multistep_scheduler():
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **_schedule_kwargs(), algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon",
    )
    scheduler.set_timesteps(timesteps=[999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
    # brainpaint takes first-order steps on the last two steps (the DPM-Solver paper's "lower
    # order final": the step into t = 0 spans a large log-SNR interval), diffusers' 2M on the
    # last one only; resetting its count of taken steps makes its step 111 -> 0 first order too.
    theirs, x = [], _start()
    for step, t in enumerate(scheduler.timesteps):
        if step == STEPS - 2:
            scheduler.lower_order_nums = 0
        x = scheduler.step(eps_model(x, int(t)), int(t), x).prev_sample
        theirs.append(x)
    ours = _ours("dpm2m", _start())
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"step {step}: {m}")
