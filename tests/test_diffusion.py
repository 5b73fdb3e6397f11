"""Gaussian diffusion: closed forms, respacing, hybrid loss and samplers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from brainpaint.config.settings import DiffusionConfig, ModelConfig
from brainpaint.diffusion.process import GaussianDiffusion, make_betas, space_timesteps
from brainpaint.model.unet import build_unet

torch.set_num_threads(1)


def _diffusion(**kw) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(**kw))


def _random_tiny(cond_channels: int = 2, out_channels: int = 2, seed: int = 0) -> nn.Module:
    """Tiny U-Net with its zero-initialised layers randomised, so it predicts something."""
    torch.manual_seed(seed)
    model = build_unet(ModelConfig(preset="tiny"), cond_channels + 1, out_channels)
    for p in model.parameters():
        if p.ndim > 1 and torch.count_nonzero(p) == 0:
            nn.init.normal_(p, std=0.02)
    return model.eval()


class _Affine(nn.Module):
    """out = [a * x_t, b]: separate parameters for the eps and the variance channel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        xt = x[:, -1:]
        return torch.cat([self.a * xt, self.b * torch.ones_like(xt)], dim=1)


# --------------------------------------------------------------------------- schedule
def test_linear_schedule_matches_the_paper():
    d = _diffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[-1] < 1e-4  # x_T is essentially pure noise
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        make_betas("quadratic", 10)


def test_q_sample_statistics_match_the_closed_form():
    d = _diffusion()
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    for step in (0, 100, 500, 999):
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
        abar = d.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=4e-3)
        assert xt.var().item() == pytest.approx(1 - abar, rel=2e-2, abs=2e-5)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on the two Gaussians, computed independently."""
    d = _diffusion()
    gen = torch.Generator().manual_seed(1)
    steps = [1, 2, 10, 250, 999]
    x0 = torch.randn(len(steps), 1, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(len(steps), 1, 4, 4, generator=gen, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.tensor(steps))
    for i, s in enumerate(steps):
        beta, abar_prev = d.betas[s], d.alphas_cumprod[s - 1]
        alpha = 1 - beta
        # prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); likelihood x_t ~ N(sqrt(alpha) x_{t-1}, beta)
        precision = 1 / (1 - abar_prev) + alpha / beta
        expected_var = 1 / precision
        expected_mean = expected_var * (math.sqrt(abar_prev) * x0[i] / (1 - abar_prev) + math.sqrt(alpha) * xt[i] / beta)
        assert var[i].item() == pytest.approx(expected_var, rel=1e-9)
        assert var[i].item() == pytest.approx((1 - abar_prev) / (1 - d.alphas_cumprod[s]) * beta, rel=1e-12)
        assert log_var[i].item() == pytest.approx(math.log(expected_var), rel=1e-9)
        torch.testing.assert_close(mean[i], expected_mean, rtol=1e-9, atol=1e-12)
    # t = 0: the mean is x0 itself and the log variance is clipped to that of t = 1.
    mean0, _, log_var0 = d.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    torch.testing.assert_close(mean0, x0[:1])
    assert log_var0.item() == pytest.approx(math.log(d.posterior_variance[1]))


# --------------------------------------------------------------------------- respacing
def test_space_timesteps():
    kept = space_timesteps(1000, 50)
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(space_timesteps(10, 10), np.arange(10))
    with pytest.raises(ValueError, match="cannot sample with 2000 steps"):
        space_timesteps(1000, 2000)


@pytest.mark.parametrize("steps", [1, 7, 50, 250])
def test_respaced_betas_reproduce_alphas_cumprod(steps):
    d = _diffusion()
    r = d.respaced(steps)
    kept = space_timesteps(1000, steps)
    assert r.num_timesteps == steps
    assert np.array_equal(r.timestep_map, kept)
    # abar of the respaced chain (the cumulative product of its betas) at the kept timesteps.
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-9)
    assert (r.betas > d.betas[kept] - 1e-15).all()  # one respaced step spans several original ones
    assert d.respaced(1000) is d


def test_respaced_model_sees_original_timesteps():
    d = _diffusion()
    r = d.respaced(10)
    seen = []

    def model(x, t):
        seen.extend(t.tolist())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    r.training_losses(model, torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4), t=torch.tensor([0, 9]))
    assert seen == [0, 999]


# --------------------------------------------------------------------------- learned variance and losses
def test_learned_range_variance_interpolates_between_posterior_and_beta():
    d = _diffusion()
    xt = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([5, 5, 5])
    v = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = d.p_mean_variance_from_output(torch.cat([torch.zeros_like(xt), v], 1), xt, t)
    lv = out["log_variance"][:, 0, 0, 0]
    lo, hi = math.log(d.posterior_variance[5]), math.log(d.betas[5])
    assert lv.tolist() == pytest.approx([lo, hi, (lo + hi) / 2], rel=1e-6)


def test_vb_term_vanishes_for_the_true_posterior():
    d = _diffusion()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1, 2, 5])  # early steps, where beta_t and beta~_t differ most
    xt = d.q_sample(x0, t, noise)
    perfect = torch.cat([noise, -torch.ones_like(noise)], 1)  # true eps, posterior variance
    assert d._vb_bits(perfect, x0, xt, t).abs().max().item() < 1e-4
    wrong = torch.cat([noise, torch.ones_like(noise)], 1)  # variance beta_t instead of beta~_t
    assert (d._vb_bits(wrong, x0, xt, t) > 1e-2).all()


def test_hybrid_loss_parts_and_detached_mean():
    d = _diffusion(lambda_vlb=1e-3)
    model = _Affine()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    losses = d.training_losses(model, x0, torch.zeros(4, 2, 8, 8), t=t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"}
    assert all(v.ndim == 0 for v in losses.values())
    xt = d.q_sample(x0, t, noise)
    expected_mse = ((noise - 0.5 * xt) ** 2).mean()
    assert losses["mse"].item() == pytest.approx(expected_mse.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["mse"].item() + losses["vb"].item(), rel=1e-6)
    # The VB term trains only the variance channel: no gradient reaches the eps parameter.
    losses["vb"].backward()
    assert model.a.grad.item() == 0.0 and model.b.grad.item() != 0.0


def test_fixed_variance_has_no_vb_term_and_checks_channels():
    d = _diffusion(learn_sigma=False)
    model = lambda x, t: x[:, -1:] * 0.1  # noqa: E731
    losses = d.training_losses(model, torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4))
    assert losses["vb"].item() == 0.0
    with pytest.raises(ValueError, match="outputs 2 channels but the diffusion expects 1"):
        d.training_losses(lambda x, t: torch.zeros(2, 2, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4))


@pytest.mark.slow
def test_hybrid_loss_decreases_when_overfitting_one_image():
    torch.manual_seed(0)
    d = _diffusion()
    model = build_unet(ModelConfig(preset="tiny"), 3, 2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x0 = ((xx**2 + yy**2) < 0.5).float().mul(1.2).sub(0.6).expand(8, 1, 16, 16)
    cond = torch.cat([x0 * (xx.abs() > 0.3), (xx.abs() <= 0.3).float().expand(8, 1, 16, 16)], 1)
    gen = torch.Generator().manual_seed(3)
    eval_t = torch.linspace(1, 999, 8).long()
    eval_noise = torch.randn(x0.shape, generator=gen)

    def evaluate():
        with torch.no_grad():
            return d.training_losses(model, x0, cond, t=eval_t, noise=eval_noise)

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(60):
        loss = d.training_losses(model, x0, cond)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after["loss"].item() < 0.5 * before["loss"].item()
    assert after["mse"].item() < 0.5 * before["mse"].item()
    assert after["vb"].item() < before["vb"].item()


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler_output_shape_and_seed_determinism(sampler):
    d = _diffusion()
    model = _random_tiny()
    cond = torch.randn(2, 2, 16, 24)
    run = lambda seed: d.sample(  # noqa: E731
        model, cond, sampler=sampler, steps=5, eta=0.0, generator=torch.Generator().manual_seed(seed)
    )
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 1, 16, 24) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.abs().max() <= 1.0  # clip_denoised keeps x0 in [-1, 1]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta_zero_depends_only_on_the_initial_noise():
    d = _diffusion()
    model = _random_tiny()
    cond = torch.randn(1, 2, 16, 16)
    calls = []

    def noise_fn(shape, generator):
        calls.append(shape)
        return torch.randn(shape, generator=generator)

    d.sample(model, cond, sampler="ddim", steps=6, eta=0.0, generator=torch.Generator().manual_seed(0), noise_fn=noise_fn)
    assert calls == [(1, 1, 16, 16)]
    calls.clear()
    d.sample(model, cond, sampler="ddim", steps=6, eta=0.5, generator=torch.Generator().manual_seed(0), noise_fn=noise_fn)
    assert len(calls) == 1 + 5  # initial noise, then one draw per step except the last
    calls.clear()
    d.sample(model, cond, sampler="ddpm", steps=6, generator=torch.Generator().manual_seed(0), noise_fn=noise_fn)
    assert len(calls) == 1 + 5


def test_noise_fn_shared_across_the_batch_gives_identical_samples():
    d = _diffusion()
    model = _random_tiny()
    cond = torch.randn(1, 2, 16, 16).expand(3, 2, 16, 16)

    def shared(shape, generator):
        return torch.randn((1, *shape[1:]), generator=generator).expand(shape)

    out = d.sample(model, cond, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(0), noise_fn=shared)
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], out[2], rtol=1e-5, atol=1e-6)


def test_fixed_variance_sampling_and_bad_sampler():
    d = _diffusion(learn_sigma=False)
    model = _random_tiny(out_channels=1)
    cond = torch.randn(1, 2, 16, 16)
    out = d.sample(model, cond, sampler="ddpm", steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        d.sample(model, cond, sampler="euler")


def test_bf16_autocast_sampling_stays_close_to_float32():
    d = _diffusion()
    model = _random_tiny()
    cond = torch.randn(1, 2, 16, 16)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = d.sample(model, cond, steps=4, generator=gen())
    low = d.sample(model, cond, steps=4, generator=gen(), autocast=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # The random network amplifies rounding at a few pixels; on average the draws agree.
    assert (low - ref).abs().mean().item() < 0.01


class _GaussianOracle(nn.Module):
    """The exact eps predictor when every pixel of the training images is N(mean, std^2).

    std = 0 is a point mass, where the posterior variance (v = -1) is the exact reverse variance.
    """

    def __init__(self, diffusion: GaussianDiffusion, mean: float, std: float):
        super().__init__()
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.mean, self.var = mean, std**2

    def forward(self, x, t):
        xt = x[:, -1:].double()
        abar = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (xt - abar.sqrt() * self.mean) / (abar * self.var + 1 - abar)
        return torch.cat([eps, -torch.ones_like(eps)], 1).float()


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpm2m", 10), ("ddpm", 25), ("ddpm", 1000)])
def test_samplers_recover_a_point_mass_with_the_exact_denoiser(sampler, steps):
    d = _diffusion()
    oracle = _GaussianOracle(d, mean=0.3, std=0.0)  # a point mass
    out = d.sample(oracle, torch.zeros(4, 2, 4, 4), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.full_like(out, 0.3), atol=1e-3, rtol=0)


def test_temperature_zero_ddim_lands_on_the_mean_and_ignores_the_seed():
    d = _diffusion()
    oracle = _GaussianOracle(d, mean=0.3, std=0.4)
    cond = torch.zeros(64, 2, 8, 8)
    draw = lambda seed, temp: d.sample(  # noqa: E731
        oracle, cond, sampler="ddim", steps=100, generator=torch.Generator().manual_seed(seed),
        clip_denoised=False, temperature=temp,
    )
    samples = draw(0, 1.0)
    # temperature 1: draws from N(0.3, 0.4^2) (up to the discretisation of 100 DDIM steps)
    assert abs(samples.mean().item() - 0.3) < 0.02 and abs(samples.std().item() - 0.4) < 0.03
    # temperature 0: every draw is the mean, whatever the seed
    zero = draw(0, 0.0)
    torch.testing.assert_close(zero, torch.full_like(zero, 0.3), atol=2e-3, rtol=0)
    assert torch.equal(zero, draw(1, 0.0))
    # temperature 0.5: the same draws, half as far from the centre (the ODE is linear here)
    torch.testing.assert_close(draw(0, 0.5) - zero, 0.5 * (samples - zero), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        draw(0, -0.1)


def test_dpm2m_is_ddim_when_first_order_and_more_accurate_with_few_steps():
    d = _diffusion()
    model = _random_tiny()
    cond = torch.randn(2, 2, 16, 16)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # Two steps: a first-order step (the DDIM update) and the final x0 prediction.
    ddim = d.sample(model, cond, sampler="ddim", steps=2, generator=gen())
    dpm = d.sample(model, cond, sampler="dpm2m", steps=2, generator=gen())
    torch.testing.assert_close(dpm, ddim, atol=1e-5, rtol=0)

    # On Gaussian data with the exact denoiser, 20 steps of the 2nd-order solver keep the
    # spread of the data better than 20 DDIM steps (which shrink it).
    oracle = _GaussianOracle(d, mean=0.3, std=0.4)
    big = torch.zeros(64, 2, 8, 8)
    spread = {
        name: d.sample(oracle, big, sampler=name, steps=20, generator=gen(), clip_denoised=False).std().item()
        for name in ("ddim", "dpm2m")
    }
    assert abs(spread["dpm2m"] - 0.4) < 0.6 * abs(spread["ddim"] - 0.4), spread
    zero = d.sample(oracle, big, sampler="dpm2m", steps=10, generator=gen(), clip_denoised=False, temperature=0.0)
    torch.testing.assert_close(zero, torch.full_like(zero, 0.3), atol=2e-3, rtol=0)


def test_pixels_of_weight_zero_add_nothing_to_the_loss():
    """A voided tumour (weight 0) is never a target: whatever the truth there, the loss is the same."""
    d = GaussianDiffusion(DiffusionConfig(steps=100, learn_sigma=True))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 1)  # pixelwise: a pixel of weight 0 cannot reach another
    model = lambda x, t: conv(x)  # noqa: E731
    cond, noise = torch.rand(2, 2, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([0, 6])
    weight = torch.ones(2, 1, 8, 8)
    weight[:, :, 2:5, 2:6] = 0
    x0 = torch.rand(2, 1, 8, 8)
    other = x0.clone()
    other[:, :, 2:5, 2:6] = -3.0
    losses = [d.training_losses(model, x, cond, t=t, noise=noise, weight=weight) for x in (x0, other)]
    for key in ("mse", "vb"):
        assert abs(losses[0][key].item() - losses[1][key].item()) < 1e-5
    unweighted = d.training_losses(model, other, cond, t=t, noise=noise)
    assert unweighted["mse"].item() > losses[1]["mse"].item() + 1e-3
