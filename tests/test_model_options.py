"""The training recipe's options: prediction target, loss weighting, terminal timesteps, the
mirrored hemisphere, intensity augmentation, fixed-size inference windows, the CPU budget and
learning-rate schedule, exports for learning curves, and the fast official metrics."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import ndimage
from safetensors import safe_open

import synth
from brainpaint.conditioning import geometry
from brainpaint.io.brats import discover_cases, load_case
from brainpaint.train.budget import Budget
from brainpaint.config.settings import Config, TrainConfig
from brainpaint.data.augment import IntensityAugmentation
from brainpaint.data.slices import SliceDataset
from brainpaint.data.stream import TrainStream
from brainpaint.conditioning.target import decode_sample
from brainpaint.conditioning.inputs import volume_inputs
from brainpaint.conditioning.layout import InputLayout
from brainpaint.diffusion.process import GaussianDiffusion
from brainpaint.evaluate import official_metrics
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.train.checkpoints import list_checkpoints
from brainpaint.train.trainer import run_train
from brainpaint.model.weights import weights_config
from test_inference import write_weights

torch.set_num_threads(1)


# --------------------------------------------------------------------------- prediction targets
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_target_holds_the_clean_image_and_the_noise(prediction):
    diff = GaussianDiffusion(Config.from_dict({"diffusion": {"prediction": prediction}}).diffusion)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = diff.q_sample(x0, t, noise)
    target = diff.prediction_target(x0, noise, t)
    torch.testing.assert_close(diff.x0_from_prediction(target, xt, t), x0, rtol=1e-4, atol=2e-3)
    out = diff.p_mean_variance_from_output(torch.cat([target, torch.zeros_like(target)], 1), xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_x0"], x0, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(out["eps"][1:], noise[1:], rtol=1e-3, atol=2e-3)  # t = 0: eps is ill-defined


class _Constant(torch.nn.Module):
    """A network that outputs a fixed image as its prediction (and 0 for the variance)."""

    def __init__(self, image):
        super().__init__()
        self.image = image

    def forward(self, x, t):
        return torch.cat([self.image.expand(x.shape[0], -1, -1, -1), torch.zeros_like(self.image).expand(x.shape[0], -1, -1, -1)], 1)


def test_one_step_from_pure_noise_returns_the_x0_prediction_whatever_the_noise():
    diff = GaussianDiffusion(Config.from_dict({"diffusion": {"prediction": "x0"}}).diffusion)
    image = torch.rand(1, 1, 8, 8) - 0.5
    cond = torch.zeros(3, 2, 8, 8)
    for temperature in (0.0, 1.0):
        out = diff.sample(_Constant(image), cond, sampler="ddim", steps=1, temperature=temperature,
                          generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, image.expand(3, -1, -1, -1))


def test_min_snr_weights_are_min_snr_over_the_targets_own_scale():
    cfgs = {p: Config.from_dict({"diffusion": {"prediction": p, "loss_weighting": "min_snr", "min_snr_gamma": 5}}) for p in ("eps", "x0", "v")}
    t = torch.tensor([0, 100, 500, 999])
    abar = torch.as_tensor(GaussianDiffusion(cfgs["x0"].diffusion).alphas_cumprod)[t]
    snr = (abar / (1 - abar)).float()
    expected = {"x0": snr.clamp(max=5), "eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1)}
    for p, cfg in cfgs.items():
        torch.testing.assert_close(GaussianDiffusion(cfg.diffusion).loss_weights(t), expected[p])
    assert torch.equal(GaussianDiffusion(Config().diffusion).loss_weights(t), torch.ones(4))


def test_terminal_fraction_puts_that_share_of_samples_at_the_last_step():
    torch.manual_seed(0)
    diff = GaussianDiffusion(Config.from_dict({"diffusion": {"terminal_fraction": 0.25}}).diffusion)
    t, terminal = diff.sample_timesteps(20000, "cpu")
    assert abs(float(terminal.float().mean()) - 0.25) < 0.015 and bool((t[terminal] == 999).all())
    assert abs(float((t < 500).float().mean()) - 0.375) < 0.015


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_terminal_samples_see_a_zero_input_and_learn_the_mean(prediction):
    """With x_t = 0 (what temperature-0 sampling feeds first) the target holds x0 itself."""
    diff = GaussianDiffusion(Config.from_dict({"diffusion": {"terminal_fraction": 1.0, "prediction": prediction}}).diffusion)
    x0 = torch.rand(3, 1, 8, 8) - 0.5
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen["xt"], seen["t"] = x[:, -1:], t
            xt = x[:, -1:]
            target = diff.prediction_target(x0, (xt - diff.extract(diff.sqrt_alphas_cumprod, t, x0) * x0)
                                            / diff.extract(diff.sqrt_one_minus_alphas_cumprod, t, x0), t)
            return torch.cat([target, torch.zeros_like(target)], 1)

    terms = diff.training_losses(Spy(), x0, torch.zeros(3, 2, 8, 8))
    assert torch.equal(seen["xt"], torch.zeros_like(x0)) and bool((seen["t"] == 999).all())
    assert float(terms["mse"]) < 1e-10  # the spy outputs exactly the target of a zero input
    torch.testing.assert_close(diff.x0_from_prediction(Spy()(torch.zeros(3, 3, 8, 8), seen["t"])[:, :1],
                                                       torch.zeros_like(x0), seen["t"]), x0, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- mirror
def test_mirror_reflects_about_the_plane_it_names():
    vol = np.arange(10 * 3 * 2, dtype=np.float32).reshape(10, 3, 2)
    np.testing.assert_array_equal(geometry.mirror_x(vol, 0), vol[::-1])
    shifted = geometry.mirror_x(vol, 2)  # x -> 9 - x - 2
    np.testing.assert_array_equal(shifted[:8], vol[::-1][2:])
    assert not shifted[8:].any()
    np.testing.assert_array_equal(geometry.mirror_x(vol, -3)[3:], vol[::-1][:7])


@pytest.mark.parametrize("offset", [-5, 0, 3])
def test_midline_of_a_shifted_symmetric_brain_is_found(offset):
    brain = synth.make_brain((64, 48, 24), seed=3)
    sym = 0.5 * (brain + brain[::-1])  # symmetric about x = 31.5
    moved = np.zeros_like(sym)
    if offset >= 0:
        moved[offset:] = sym[: 64 - offset]
    else:
        moved[:offset] = sym[-offset:]
    mask = synth.make_mask((64, 48, 24), centre=(20, 24, 12), radius=5).astype(bool)
    voided = np.where(mask, 0, moved)
    shift = geometry.midline_shift(voided, (voided != 0) & ~mask)
    assert shift == -2 * offset
    mirrored = geometry.mirror_x(moved, shift)
    inside = (moved != 0) & (mirrored != 0)
    np.testing.assert_allclose(mirrored[inside], moved[inside], rtol=1e-5)


def test_mirror_channels_come_after_b_and_m(tmp_path):
    synth.write_case(tmp_path, "c", seed=1, radius=4, centre=(16, 24, 10))
    data = load_case(discover_cases(tmp_path)[0][0])
    cfg = Config.from_dict({"data": {"mirror": True, "prior": "harmonic"}})
    vin = volume_inputs(data.voided, data.mask, cfg.data)
    box = (slice(0, 48), slice(0, 48))
    cond = InputLayout(mirror=True, context_slices=1).build(vin, 10, box)
    assert cond.shape[0] == 2 + 2 + 4
    np.testing.assert_array_equal(cond[2], geometry.mirror_x(vin.b[:, :, 10], vin.mirror_shift))
    np.testing.assert_array_equal(cond[3], geometry.mirror_x(vin.mask[:, :, 10], vin.mirror_shift))
    np.testing.assert_array_equal(cond[4], vin.b[:, :, 9])  # the neighbours follow
    assert Config.from_dict({"data": {"mirror": True}}).data.mirror


# --------------------------------------------------------------------------- augmentation
def test_intensity_augmentation_keeps_target_and_conditioning_consistent(tmp_path):
    synth.write_case(tmp_path, "c", seed=1, radius=4)
    cfg = Config.from_dict({"data": {"crop_size": 32, "prior": "harmonic", "mirror": True, "gamma_aug": 0.3, "bias_aug": 0.2}})
    ds = SliceDataset(tmp_path, cfg, augment=True)
    plain = ds.sample(ds.pairs[3], random.Random(4), augment=False)
    aug = IntensityAugmentation.draw(random.Random(1), cfg.data)
    assert aug.gamma != 1.0 and aug.field is not None and aug.mirror_field is not None and aug.field != aug.mirror_field
    cond = plain["cond"].numpy()
    gt = decode_sample(plain["x0"].numpy()[0], cond[0], "harmonic")
    new_cond, new_gt = aug.apply(cond, gt, InputLayout.of(cfg))
    outside = cond[1] == 0
    # Outside the mask b is the image, so the augmented b is the augmented ground truth there.
    np.testing.assert_allclose(new_cond[0][outside], new_gt[outside], atol=1e-6)
    np.testing.assert_array_equal(new_cond[1], cond[1])  # masks untouched
    np.testing.assert_array_equal(new_cond[3], cond[3])
    assert not np.allclose(new_cond[0], cond[0]) and not np.allclose(new_cond[2], cond[2])
    assert new_gt.min() >= 0 and new_gt.max() <= 1
    flat = IntensityAugmentation(gamma=1.0).apply(cond, gt, InputLayout.of(cfg))
    np.testing.assert_array_equal(flat[0], cond)


def test_stream_skipping_draws_what_sampling_would_with_augmentation_and_mirror(tmp_path):
    synth.write_case(tmp_path, "a", seed=0, radius=4)
    synth.write_case(tmp_path, "b", seed=1, radius=3)
    cfg = Config.from_dict({"data": {"crop_size": 16, "mirror": True, "gamma_aug": 0.2, "bias_aug": 0.1, "prior": "harmonic"}})
    ds = SliceDataset(tmp_path, cfg)
    seq = iter(TrainStream(ds, seed=5))
    expected = [next(seq) for _ in range(7)][-1]
    resumed = next(iter(TrainStream(ds, seed=5, skip=6)))
    assert torch.equal(resumed["x0"], expected["x0"]) and torch.equal(resumed["cond"], expected["cond"])


def test_prior_cache_folder_is_filled_once_and_gives_the_same_samples(tmp_path):
    synth.write_case(tmp_path / "d", "a", seed=0, radius=4)
    base = {"crop_size": 16, "mirror": True, "prior": "harmonic"}
    fresh = SliceDataset(tmp_path / "d", Config.from_dict({"data": base}))
    cached_cfg = Config.from_dict({"data": {**base, "cache_dir": str(tmp_path / "cache")}})
    first = SliceDataset(tmp_path / "d", cached_cfg)
    pair = fresh.pairs[2]
    a = fresh.sample(pair, random.Random(0), augment=False)
    b = first.sample(pair, random.Random(0), augment=False)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    c = SliceDataset(tmp_path / "d", cached_cfg).sample(pair, random.Random(0), augment=False)
    for x in (b, c):
        torch.testing.assert_close(x["cond"], a["cond"], rtol=0, atol=1e-6)
        torch.testing.assert_close(x["x0"], a["x0"], rtol=0, atol=1e-6)


def test_a_new_prior_version_computes_the_prior_again_instead_of_reading_the_old_cache(tmp_path, monkeypatch):
    from brainpaint.conditioning import inputs

    synth.write_case(tmp_path / "d", "a", seed=0, radius=4)
    cfg = Config.from_dict({"data": {"crop_size": 16, "mirror": True, "prior": "harmonic", "cache_dir": str(tmp_path / "c")}})
    pair = SliceDataset(tmp_path / "d", cfg).pairs[2]
    sample = lambda: SliceDataset(tmp_path / "d", cfg).sample(pair, random.Random(0), augment=False)["cond"]  # noqa: E731
    computed = sample()
    (entry,) = (tmp_path / "c").glob("*.npz")
    assert f"-v{inputs.PRIOR_VERSION}-" in entry.name
    with np.load(entry) as stored:  # an entry of an older fill, under the same version: read as it is
        np.savez(entry, fill=stored["fill"] + 100.0, shift=stored["shift"])
    assert not torch.equal(sample(), computed)
    monkeypatch.setattr(inputs, "PRIOR_VERSION", inputs.PRIOR_VERSION + 1)  # the fill's algorithm changed
    torch.testing.assert_close(sample(), computed, rtol=0, atol=0)  # computed again, not read
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2


# --------------------------------------------------------------------------- windows
def test_windows_have_the_training_size_and_cover_the_mask():
    mask = np.zeros((240, 240, 5), bool)
    mask[60:70, 100:112, 2] = True
    (box,) = geometry.window_boxes(mask, 64, margin=8)
    assert geometry.box_size(box) == (64, 64) and mask[box].sum() == mask.sum()
    mask[60:190, 100:130, 3] = True  # longer than a window along x
    boxes = geometry.window_boxes(mask, 64, margin=8)
    assert len(boxes) > 1 and all(geometry.box_size(b) == (64, 64) for b in boxes)
    covered = np.zeros(mask.shape[:2], bool)
    for b in boxes:
        geometry.paste(np.ones((64, 64), bool), b, covered)
    assert covered[mask.any(axis=2)].all()
    weight = geometry.window_weight(64)
    assert weight.min() > 0 and weight.max() == 1 and weight[32, 32] == 1


def test_tiled_inference_runs_windows_of_the_training_size_and_keeps_known_voxels(tmp_path, monkeypatch):
    w = write_weights(tmp_path / "w.safetensors", crop_size=16, prior="harmonic", mirror=True, prediction="x0")
    synth.write_case(tmp_path / "d", "c", seed=2, radius=7)
    data = load_case(discover_cases(tmp_path / "d")[0][0])
    cfg = Config.from_dict({"infer": {"weights": str(w), "device": "cpu", "tile": True, "crop_margin": 2, "steps": 1, "temperature": 0}})
    inpainter = DiffusionInpainter(cfg)
    shapes = []
    real = inpainter.sample_slices

    def spy(cond, seed, member, keys=None):
        shapes.append(cond.shape)
        return real(cond, seed, member, keys)

    monkeypatch.setattr(inpainter, "sample_slices", spy)
    pred = inpainter(data, seed=0)
    assert len(shapes) > 1 and all(s[1:] == (4, 16, 16) for s in shapes)
    mask = data.mask
    np.testing.assert_array_equal(pred.volume[~mask], data.voided[~mask])
    assert np.isfinite(pred.volume).all()


@pytest.mark.slow
def test_batch_size_does_not_change_the_output_at_temperature_one(tmp_path):
    w = write_weights(tmp_path / "w.safetensors", crop_size=16, prediction="x0")
    synth.write_case(tmp_path / "d", "c", seed=2, radius=5)
    data = load_case(discover_cases(tmp_path / "d")[0][0])
    outs = []
    for batch in (0, 1, 3):
        for tile in (False, True):
            cfg = Config.from_dict({"infer": {"weights": str(w), "device": "cpu", "batch_slices": batch, "sampler": "ddpm",
                                              "steps": 4, "temperature": 1.0, "tile": tile}})
            outs.append((tile, DiffusionInpainter(cfg)(data, seed=7).volume))
    for tile in (False, True):
        same = [v for t, v in outs if t == tile]
        for v in same[1:]:
            # Same noise for every slice; only the float rounding of batched convolutions differs
            # (1e-2 on a ~800 intensity range).
            np.testing.assert_allclose(v, same[0], rtol=1e-5, atol=1e-2)
    assert not np.array_equal(outs[0][1], DiffusionInpainter(Config.from_dict({"infer": {
        "weights": str(w), "device": "cpu", "sampler": "ddpm", "steps": 4, "temperature": 1.0}}))(data, seed=8).volume)


def test_eps_weights_run_16_steps_unless_the_steps_are_chosen(tmp_path, capsys):
    """The default one step is the conditional mean of x0/v weights; eps weights get 16 steps,
    said in one line, and an explicit `infer.steps` is always obeyed."""
    eps = write_weights(tmp_path / "eps.safetensors", crop_size=16)
    x0 = write_weights(tmp_path / "x0.safetensors", crop_size=16, prediction="x0")
    default = DiffusionInpainter(Config.from_dict({"infer": {"weights": str(eps), "device": "cpu"}}))
    assert default.infer.steps == 16 and Config().infer.steps == 1
    err = capsys.readouterr().err
    assert "predict eps" in err and "running 16 ddim steps" in err
    chosen = DiffusionInpainter(Config.from_dict({"infer": {"weights": str(eps), "device": "cpu", "steps": 1}}))
    assert chosen.infer.steps == 1 and "predict eps" not in capsys.readouterr().err
    assert DiffusionInpainter(Config.from_dict({"infer": {"weights": str(x0), "device": "cpu"}})).infer.steps == 1
    from brainpaint.infer.batch import settings_lines

    assert "16 steps" in settings_lines(default.cfg, default)[0]


def test_weights_files_without_the_new_settings_load_as_eps_models(tmp_path):
    w = write_weights(tmp_path / "w.safetensors")
    with safe_open(str(w), "pt") as f:
        meta = f.metadata()
    assert "prediction: eps" in meta["config"]
    import yaml
    from safetensors.torch import load_file, save_file

    old = yaml.safe_load(meta["config"])
    for key in ("prediction", "loss_weighting", "min_snr_gamma", "terminal_fraction"):
        old["diffusion"].pop(key)
    for key in ("mirror", "gamma_aug", "bias_aug"):
        old["data"].pop(key)
    save_file(load_file(str(w)), str(tmp_path / "old.safetensors"), metadata={"config": yaml.safe_dump(old)})
    cfg = weights_config(tmp_path / "old.safetensors")
    assert cfg.diffusion.prediction == "eps" and not cfg.data.mirror
    assert "cache_dir" not in meta["config"]


def test_weights_files_that_record_a_retired_setting_load_or_say_which(tmp_path):
    """Weights files up to the shipped one record `data.planes: axial` (coronal training is
    retired): they load; one trained on coronal slices too is refused, naming the setting."""
    import yaml
    from safetensors.torch import load_file, save_file

    from brainpaint.errors import InferenceSetupError

    w = write_weights(tmp_path / "w.safetensors")
    with safe_open(str(w), "pt") as f:
        meta = yaml.safe_load(f.metadata()["config"])
    for planes in ("axial", "axial+coronal"):
        meta["data"]["planes"] = planes
        save_file(load_file(str(w)), str(tmp_path / f"{planes}.safetensors"), metadata={"config": yaml.safe_dump(meta)})
    assert weights_config(tmp_path / "axial.safetensors").to_dict() == weights_config(w).to_dict()
    with pytest.raises(InferenceSetupError, match="data.planes was retired: only axial is still accepted"):
        DiffusionInpainter(Config.from_dict({"infer": {"weights": str(tmp_path / "axial+coronal.safetensors"), "device": "cpu"}}))


# --------------------------------------------------------------------------- budget and schedule
def test_lr_schedules_follow_the_budget():
    def factor(step, **kw):
        return Budget(TrainConfig(max_steps=100, **kw)).lr_factor(step)

    assert factor(50) == 1.0
    assert factor(50, lr_schedule="linear") == pytest.approx(0.5)
    assert factor(25, lr_schedule="cosine") == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert factor(100, lr_schedule="linear") == 0.0
    assert factor(4, warmup_steps=10) == pytest.approx(0.5)
    budget = Budget(TrainConfig(max_steps=10**6, max_cpu_minutes=1.0, lr_schedule="linear"), cpu_before=45.0)
    assert budget.progress(0) == pytest.approx(0.75, abs=0.02) and not budget.cpu_spent()
    assert Budget(TrainConfig(max_cpu_minutes=1.0), cpu_before=61.0).cpu_spent()


@pytest.mark.slow
def test_cpu_budget_stops_the_run_keeps_its_total_across_resumes_and_exports_a_curve(tmp_path):
    data = tmp_path / "data"
    synth.write_case(data, "a", seed=0, radius=4)
    settings = {
        "model": {"preset": "tiny"}, "diffusion": {"steps": 100, "prediction": "x0"},
        "data": {"crop_size": 16, "mirror": True, "prior": "harmonic"},
        "train": {"batch_size": 2, "save_every": 2, "export_every": 2, "val_every": 0, "max_cpu_minutes": 0.03,
                  "lr_schedule": "linear", "log_every": 1},
    }
    out = tmp_path / "run"
    assert run_train(Config.from_dict(settings), data, out) == 0
    ckpt = list_checkpoints(out)[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert 1.0 <= state["cpu_seconds"] < 30
    exports = sorted((out / "exports").glob("step_*.safetensors"))
    steps = [int(p.stem.split("_")[1]) for p in exports]
    assert steps and steps[-1] == state["step"] and all(s % 2 == 0 for s in steps[:-1])
    with safe_open(str(exports[-1]), "pt") as f:
        assert float(f.metadata()["cpu_seconds"]) == pytest.approx(state["cpu_seconds"], abs=0.2)
    # Resuming with the budget spent trains one more step at most and keeps counting from the total.
    assert run_train(Config.from_dict(settings), data, out) == 0
    again = torch.load(list_checkpoints(out)[-1] / "state.pt", weights_only=True)
    assert again["step"] <= state["step"] + 1 and again["cpu_seconds"] >= state["cpu_seconds"]


# --------------------------------------------------------------------------- metrics
def test_official_metrics_on_the_mask_box_equal_the_whole_volume():
    shape = (40, 44, 30)
    gt = synth.make_brain(shape, seed=4)
    mask = synth.make_mask(shape, centre=(18, 20, 14), radius=6).astype(bool)
    voided = np.where(mask, 0, gt)
    rng = np.random.default_rng(0)
    for pred in (harmonic_fill(voided, mask), np.where(mask, gt * rng.uniform(0.7, 1.3, shape), gt)):
        whole = official_metrics(pred, gt, voided, mask, crop=False)
        assert official_metrics(pred, gt, voided, mask) == whole


def test_the_midline_of_every_shift_at_once_is_the_best_single_shift():
    """`midline_shift` (all shifts by FFT) picks the shift a direct pass per shift would."""
    rng = np.random.default_rng(7)
    picked = []
    for offset in (-3, 2, 5):
        field = ndimage.gaussian_filter(rng.standard_normal((48, 40, 40)), 3.0)
        brain = np.roll(field + field[::-1], offset, axis=0) + 0.5 * ndimage.gaussian_filter(rng.standard_normal(field.shape), 2.0)
        known = rng.random(brain.shape) > 0.3
        vol, k = brain[:, ::2, ::2].astype(np.float32), known[:, ::2, ::2]
        scores = {}
        for shift in range(-8, 9):
            both = k & geometry.mirror_x(k, shift)
            a, b = vol[both], geometry.mirror_x(vol, shift)[both]
            a, b = a - a.mean(), b - b.mean()
            scores[shift] = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
        picked.append(geometry.midline_shift(brain, known, max_shift=8))
        assert picked[-1] == max(scores, key=scores.get)
    assert picked == [6, -4, -8]  # -2 * offset, the last one beyond the search: its edge
