"""Training loop: overfitting, checkpoints, kill-and-resume, SIGTERM, 2-process gloo DDP, export."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import synth
from brainpaint.data.atlas_build import atlas_from_cases
from brainpaint.io.brats import discover_cases
from brainpaint.config.settings import Config, model_config_yaml
from brainpaint.data.slices import SliceDataset
from brainpaint.data.stream import TrainStream
from brainpaint.diffusion.process import GaussianDiffusion
from brainpaint.model.weights import load_model
from brainpaint.train.checkpoints import list_checkpoints, save_checkpoint
from brainpaint.train.ema import EMA
from brainpaint.train.export import export_weights
from brainpaint.train.preview import masked_ssim_psnr
from brainpaint.train.trainer import run_train
from brainpaint.train.preview import Validator
from brainpaint.model.unet import build_unet
from brainpaint.conditioning.layout import network_channels
from brainpaint.model.weights import weights_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"preset": "tiny"},
    "diffusion": {"steps": 100},
    "data": {"crop_size": 16, "flip_prob": 0.5},
    "train": {"batch_size": 4, "log_every": 1, "save_every": 2, "val_every": 0, "keep_last": 2, "ema_rate": 0.9},
}


def _cfg(**sections) -> Config:
    data = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.from_dict(data)


def _log_rows(out: Path) -> list[dict]:
    with (out / "train_log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT / "project") + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    synth.write_case(root, "case-a", seed=0, radius=4)
    synth.write_case(root, "case-b", seed=1, radius=3)
    return root


# --------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_overfits_one_case_and_exports_weights_that_learned(tmp_path):
    root = tmp_path / "one"
    synth.write_case(root, "only", seed=0, radius=4)
    cfg = _cfg(
        diffusion={"learn_sigma": False},
        data={"flip_prob": 0.0},
        train={"batch_size": 8, "lr": 2e-3, "max_steps": 60, "log_every": 10, "save_every": 1000},
    )
    out = tmp_path / "out"
    assert run_train(cfg, root, out) == 0
    mse = [float(r["mse"]) for r in _log_rows(out) if r["mse"]]
    assert len(mse) == 6
    assert mse[-1] < 0.25 * mse[0], mse

    # The exported EMA network predicts the noise of the training slices far better than the
    # freshly initialised one (same timesteps, same noise).
    trained, saved_cfg = load_model(out / "model.safetensors")
    fresh = build_unet(saved_cfg.model, *network_channels(saved_cfg))
    ds = SliceDataset(root, saved_cfg, augment=False)
    batch = [ds[i] for i in range(len(ds))]
    x0 = torch.stack([b["x0"] for b in batch])
    cond = torch.stack([b["cond"] for b in batch])
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (len(batch),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    diffusion = GaussianDiffusion(saved_cfg.diffusion)
    with torch.no_grad():
        after = diffusion.training_losses(trained, x0, cond, t=t, noise=noise)["mse"].item()
        before = diffusion.training_losses(fresh, x0, cond, t=t, noise=noise)["mse"].item()
    assert after < 0.3 * before, (before, after)


def test_validation_writes_a_png_grid_and_metrics(tmp_path, data):
    from PIL import Image

    cfg = _cfg(train={"max_steps": 2, "val_every": 2, "val_slices": 3, "save_every": 100})
    out = tmp_path / "out"
    assert run_train(cfg, data, out) == 0
    png = out / "validation" / "step_00000002.png"
    with Image.open(png) as im:
        assert im.size == (4 * 16 + 3 * 2, 3 * 16 + 2 * 2)  # b | m | sample | truth, 3 slices
    val = [r for r in _log_rows(out) if r["val_ssim"]]
    assert [r["step"] for r in val] == ["2"]
    # The logged scores are those of the EMA weights of step 2 (the export) on the same slices.
    ema_model, saved = load_model(out / "model.safetensors")
    validator = Validator(SliceDataset(data, cfg, augment=False), cfg, torch.device("cpu"))
    ssim, psnr = validator.run(ema_model, GaussianDiffusion(saved.diffusion), 2, tmp_path / "again")
    assert float(val[0]["val_ssim"]) == pytest.approx(ssim, rel=1e-5)
    assert float(val[0]["val_psnr"]) == pytest.approx(psnr, rel=1e-5)
    # They are what inference makes of those slices with its defaults: `brainpaint infer`'s
    # predictor on the exported weights samples them to the same fills.
    from brainpaint.conditioning.target import decode_sample
    from brainpaint.infer.inpainter import DiffusionInpainter

    inpainter = DiffusionInpainter(Config.from_dict({"infer": {"weights": str(out / "model.safetensors"), "device": "cpu"}}))
    calls = []
    real = inpainter.diffusion.sample
    inpainter.diffusion.sample = lambda *a, **k: calls.append(k) or real(*a, **k)
    x0 = inpainter.sample_slices(validator.cond.numpy(), seed=0, member=0)
    b = validator.cond[:, 0:1]
    users = masked_ssim_psnr(decode_sample(torch.from_numpy(x0)[:, None], b, "none"), decode_sample(validator.x0, b, "none"),
                             validator.cond[:, 1:2])
    assert users == pytest.approx((float(val[0]["val_ssim"]), float(val[0]["val_psnr"])), rel=1e-5)
    assert [(k["sampler"], k["steps"], k["temperature"]) for k in calls] == [("ddim", inpainter.infer.steps, 0.0)] * (2 if inpainter.infer.flip_average else 1)


class _Returns:
    """A diffusion whose sampler returns a fixed x0 (zeros by default) and records how it was asked."""

    def __init__(self, x0=None):
        self.x0, self.calls = x0, []

    def sample(self, model, cond, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros(cond.shape[0], 1, *cond.shape[2:]) if self.x0 is None else self.x0.clone()


def test_validation_scores_are_the_known_answer(tmp_path, data):
    cfg = _cfg(train={"val_slices": 3}, infer={"flip_average": False})  # the sampler's answer as it is
    validator = Validator(SliceDataset(data, cfg, augment=False), cfg, torch.device("cpu"))
    perfect = validator.run(None, _Returns(validator.x0), 7, tmp_path)
    assert perfect[0] == pytest.approx(1.0, abs=1e-6) and perfect[1] == pytest.approx(120.0)  # MSE floor 1e-12
    assert (tmp_path / "validation" / "step_00000007.png").is_file()

    # 0.1 darker inside the mask (x0 is 2 * image - 1 for the prior "none"), clipped at 0.
    b, mask = validator.cond[:, 0:1], validator.cond[:, 1:2] > 0.5
    truth = ((validator.x0 + 1) / 2).clamp(0, 1)
    darker = (truth - 0.1).clamp(0, 1)
    ssim, psnr = validator.run(None, _Returns(2 * darker - 1), 8, tmp_path)
    mse = float(((darker - truth)[mask] ** 2).mean())
    assert psnr == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert 0 < ssim < 1
    assert b.shape[0] == 3


def test_validation_clips_the_x0_prediction_like_inference(tmp_path, data):
    from test_inference import write_weights

    from brainpaint.io.brats import discover_cases, load_case
    from brainpaint.infer.inpainter import DiffusionInpainter

    for prior, bound in (("none", 1.0), ("harmonic", 2.0)):
        cfg = _cfg(data={"prior": prior}, train={"val_slices": 2})
        validator = Validator(SliceDataset(data, cfg, augment=False), cfg, torch.device("cpu"))
        during_training = _Returns(validator.x0)
        validator.run(None, during_training, 1, tmp_path)

        weights = write_weights(tmp_path / f"{prior}.safetensors", crop_size=16, prior=prior)
        inpainter = DiffusionInpainter(Config.from_dict({"infer": {"weights": str(weights), "device": "cpu", "steps": 2}}))
        case = load_case(discover_cases(data, labels=True)[0][0])
        for_inference = _Returns()
        inpainter.diffusion = for_inference
        inpainter(case, seed=0)
        assert during_training.calls[0]["clip_denoised"] == for_inference.calls[0]["clip_denoised"] == bound, prior


def test_masked_psnr_matches_the_official_definition():
    from inpainting.challenge_metrics_2023 import _peak_signal_noise_ratio

    gen = torch.Generator().manual_seed(0)
    truth = torch.rand((2, 1, 16, 16), generator=gen)
    pred = (truth + 0.1 * torch.randn(truth.shape, generator=gen)).clamp(0, 1)
    mask = torch.zeros_like(truth)
    mask[:, :, 4:12, 3:10] = 1
    ssim, psnr = masked_ssim_psnr(pred, truth, mask)
    inside = mask.bool()
    official = _peak_signal_noise_ratio(truth[inside], pred[inside], data_range=(0, 1)).item()
    assert psnr == pytest.approx(official, abs=1e-4)
    assert 0 < ssim < 1
    same_ssim, same_psnr = masked_ssim_psnr(truth, truth, mask)
    assert same_ssim == pytest.approx(1.0, abs=1e-6) and same_psnr > 100


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_complete_pruned_and_partial_ones_ignored(tmp_path):
    cfg = _cfg()
    model = build_unet(cfg.model, *network_channels(cfg))
    ema = EMA(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, ema, opt, cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    (root / "step_00000008").mkdir()  # an interrupted copy by other means: no state.pt
    (root / "step_00000008" / "model.safetensors").write_bytes(b"")
    (root / ".tmp-step_00000010-123").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    state = torch.load(root / "step_00000006" / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["config"]["model"]["preset"] == "tiny"


def test_ema_update_is_the_exponential_average():
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, 0.75)
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.state["weight"], 0.75 * before + 0.25 * (before + 1.0))


def test_ema_warmup_follows_the_network_early_and_reaches_the_rate():
    lin = torch.nn.Linear(2, 1)
    ema = EMA(lin, 0.999)
    assert ema.decay(0) == pytest.approx(0.1)
    assert ema.decay(100) == pytest.approx(101 / 110)
    assert ema.decay(100_000) == 0.999
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin, 0)  # first update: 90 % of the way to the network, not 0.1 %
    torch.testing.assert_close(ema.state["weight"], 0.1 * before + 0.9 * (before + 1.0))
    assert EMA(lin, 0.999, warmup=False).decay(0) == 0.999


def test_export_and_load_model_round_trip(tmp_path, data):
    cfg = _cfg(model={"context_slices": 1}, data={"prior": "harmonic"}, train={"max_steps": 2})
    out = tmp_path / "out"
    assert run_train(cfg, data, out) == 0
    ckpt = list_checkpoints(out)[-1]
    target = export_weights(ckpt, tmp_path / "exported.safetensors")
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert load_file(str(target)).keys() == ema.keys()
    with safe_open(str(target), "pt") as f:
        meta = yaml.safe_load(f.metadata()["config"])
    assert set(meta) == {"model", "diffusion", "data"} and meta["data"]["prior"] == "harmonic"

    model, loaded = load_model(target)
    assert loaded.model.context_slices == 1 and loaded.data.prior == "harmonic"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0, atol=0)
    x = torch.zeros(1, network_channels(loaded)[0], 16, 16)
    assert model(x, torch.zeros(1, dtype=torch.long)).shape == (1, 2, 16, 16)
    # the run's own export is the same file content
    torch.testing.assert_close(load_file(str(out / "model.safetensors")), ema)


def test_load_model_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="foreign.safetensors has no 'config' metadata"):
        load_model(path)


# --------------------------------------------------------------------------- failures
def test_no_usable_case_is_one_line_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_train(_cfg(train={"max_steps": 1}), empty, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no training slices in") and not (tmp_path / "out" / "checkpoints").exists()


def test_bad_case_is_skipped_but_reported_in_the_exit_code(tmp_path, data, capsys):
    (data / "case-b" / "case-b-mask-healthy.nii.gz").write_bytes(b"broken")
    out = tmp_path / "out"
    assert run_train(_cfg(train={"max_steps": 2}), data, out) == 1
    err = capsys.readouterr().err
    assert "warning: skipping case case-b: cannot read case-b-mask-healthy.nii.gz" in err
    assert (out / "model.safetensors").is_file()  # the good case still trained and exported
    assert json.loads((out / "train_summary.json").read_text())["rejected_cases"][0].startswith("case-b:")


def test_resume_with_another_network_is_refused(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert run_train(_cfg(train={"max_steps": 2}), data, out) == 0
    assert run_train(_cfg(model={"base_channels": 8}, train={"max_steps": 4}), data, out) == 1
    assert "was trained with model.base_channels=None, the parameters say 8" in capsys.readouterr().err


def test_init_weights_warm_starts_model_and_ema_at_step_zero(tmp_path, data, capsys):
    first = tmp_path / "first"
    assert run_train(_cfg(train={"max_steps": 2}), data, first) == 0
    exported = load_file(str(first / "model.safetensors"))

    # zero further steps: the warm-started run exports exactly the weights it was given
    second = tmp_path / "second"
    cfg = _cfg(train={"max_steps": 0, "init_weights": str(first / "model.safetensors")})
    assert run_train(cfg, data, second) == 0
    assert "starting from the weights in" in capsys.readouterr().err
    torch.testing.assert_close(load_file(str(second / "model.safetensors")), exported, rtol=0, atol=0)
    with safe_open(str(second / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "0"

    # training goes on from there, counting its own steps from zero
    third = tmp_path / "third"
    cfg = _cfg(train={"max_steps": 3, "init_weights": str(first / "model.safetensors")})
    assert run_train(cfg, data, third) == 0
    assert [int(r["step"]) for r in _log_rows(third) if r.get("loss")] == [1, 2, 3]
    moved = load_file(str(third / "model.safetensors"))
    assert any(not torch.equal(moved[k], exported[k]) for k in exported)


def test_init_weights_of_another_network_is_refused(tmp_path, data, capsys):
    first = tmp_path / "first"
    assert run_train(_cfg(train={"max_steps": 1}), data, first) == 0
    cfg = _cfg(model={"base_channels": 8}, train={"max_steps": 1, "init_weights": str(first / "model.safetensors")})
    assert run_train(cfg, data, tmp_path / "second") == 1
    assert "was trained with model.base_channels=16, the parameters say 8" in capsys.readouterr().err
    missing = _cfg(train={"max_steps": 1, "init_weights": str(tmp_path / "nope.safetensors")})
    assert run_train(missing, data, tmp_path / "third") == 1
    assert "train.init_weights: weights file not found" in capsys.readouterr().err


def _network_output(cfg: Config, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """The output of the network `cfg` describes, holding `weights`, on `x` at t = 5 and 700."""
    net = build_unet(cfg.model, *network_channels(cfg)).eval()
    net.load_state_dict(weights)
    with torch.no_grad():
        return net(x, torch.tensor([5, 700]))


def _grown(tmp_path, data, **model) -> tuple[Config, dict, dict]:
    """A plain network trained one step (run folder tmp_path/plain), and a network with the
    `model` settings warm-started from it for zero steps (tmp_path/grown): (grown config, plain
    weights, grown weights)."""
    plain, grown = tmp_path / "plain", tmp_path / "grown"
    assert run_train(_cfg(train={"max_steps": 1}), data, plain) == 0
    cfg = _cfg(model=model, train={"max_steps": 0, "init_weights": str(plain / "model.safetensors")})
    assert run_train(cfg, data, grown) == 0
    return cfg, load_file(str(plain / "model.safetensors")), load_file(str(grown / "model.safetensors"))


def test_init_weights_widens_a_2d_network_into_a_25d_one_computing_the_same_function(tmp_path, data, capsys):
    cfg_25d, w2, w25 = _grown(tmp_path, data, context_slices=1)
    assert w25["input_blocks.0.0.weight"].shape[1] == 7 and w2["input_blocks.0.0.weight"].shape[1] == 3
    assert all(torch.equal(w25[k], w2[k]) for k in w2 if k != "input_blocks.0.0.weight")

    x = torch.randn(2, 7, 32, 32, generator=torch.Generator().manual_seed(0))  # [b, m, b-, m-, b+, m+, x_t]
    torch.testing.assert_close(_network_output(cfg_25d, w25, x), _network_output(_cfg(), w2, x[:, [0, 1, 6]]), rtol=1e-5, atol=1e-6)

    # a 2.5D network cannot start a 2D one: it would lose inputs it was trained to use
    back = _cfg(train={"max_steps": 0, "init_weights": str(tmp_path / "grown" / "model.safetensors")})
    assert run_train(back, data, tmp_path / "back") == 1
    assert "was trained with model.context_slices=1, the parameters say 0" in capsys.readouterr().err


def test_init_weights_deepens_the_middle_of_a_network_computing_the_same_function(tmp_path, data, capsys):
    cfg_deep, w0, w2 = _grown(tmp_path, data, extra_middle_blocks=2)
    new = sorted(set(w2) - set(w0))
    assert new and all(k.startswith(("middle_block.3.", "middle_block.4.", "middle_block.5.", "middle_block.6.")) for k in new)
    assert all(torch.equal(w2[k], w0[k]) for k in w0)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_network_output(cfg_deep, w2, x), _network_output(_cfg(), w0, x), rtol=0, atol=0)

    # training moves the new blocks off the identity
    moved = tmp_path / "moved"
    cfg_train = _cfg(model={"extra_middle_blocks": 2}, train={"max_steps": 2, "init_weights": str(tmp_path / "plain" / "model.safetensors")})
    assert run_train(cfg_train, data, moved) == 0
    w_moved = load_file(str(moved / "model.safetensors"))
    assert any(w_moved[k].abs().sum() > 0 for k in new if "out_layers.3" in k or "proj_out" in k)

    # a deeper network cannot start a shallower one
    back = _cfg(train={"max_steps": 0, "init_weights": str(tmp_path / "grown" / "model.safetensors")})
    assert run_train(back, data, tmp_path / "back") == 1
    assert "was trained with model.extra_middle_blocks=2, the parameters say 0; a network cannot drop middle blocks" in capsys.readouterr().err


@pytest.mark.slow
def test_init_weights_adds_the_atlas_channel_computing_the_same_function_and_builds_the_atlas(tmp_path, data, capsys):
    cfg_atlas, w0, w1 = _grown(tmp_path, data, atlas=True)
    assert w1["input_blocks.0.0.weight"].shape[1] == 4 and w0["input_blocks.0.0.weight"].shape[1] == 3
    assert set(w1) - set(w0) == {"atlas"}
    cases, _ = discover_cases(data, labels=True)
    np.testing.assert_array_equal(w1["atlas"].numpy(), atlas_from_cases(cases))
    assert "atlas: mean of 2 brain(s)" in capsys.readouterr().err

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # [b, m, atlas, x_t]
    torch.testing.assert_close(_network_output(cfg_atlas, w1, x), _network_output(_cfg(), w0, x[:, [0, 1, 3]]), rtol=0, atol=0)

    # context slices grown later keep the atlas channel's weights (matched by name, not position)
    moved = tmp_path / "moved"
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 2, "init_weights": str(tmp_path / "grown" / "model.safetensors")}), data, moved) == 0
    w2 = load_file(str(moved / "model.safetensors"))
    assert w2["input_blocks.0.0.weight"][:, 2].abs().sum() > 0  # training moved the atlas weights off zero
    wider = tmp_path / "wider"
    cfg_wide = _cfg(model={"atlas": True, "context_slices": 1}, train={"max_steps": 0, "init_weights": str(moved / "model.safetensors")})
    assert run_train(cfg_wide, data, wider) == 0
    w3 = load_file(str(wider / "model.safetensors"))
    conv2, conv3 = w2["input_blocks.0.0.weight"], w3["input_blocks.0.0.weight"]  # [b, m, a, x] -> [b, m, b-, m-, b+, m+, a, x]
    assert torch.equal(conv3[:, [0, 1, 6, 7]], conv2) and not conv3[:, 2:6].any()
    assert torch.equal(w3["atlas"], w2["atlas"])

    # a network with the atlas channel cannot start one without it
    back = _cfg(train={"max_steps": 0, "init_weights": str(moved / "model.safetensors")})
    assert run_train(back, data, tmp_path / "back") == 1
    assert "was trained with model.atlas=True, the parameters say False" in capsys.readouterr().err


def test_weights_start_a_run_with_another_atlas_gain_but_a_run_resumes_only_with_its_own(tmp_path, data, capsys):
    guided = {"model": {"atlas": True}, "data": {"prior": "harmonic", "atlas_gain": 0.5}}
    plain = tmp_path / "plain"
    assert run_train(_cfg(model={"atlas": True}, data={"prior": "harmonic"}, train={"max_steps": 2}), data, plain) == 0
    start = _cfg(**guided, train={"max_steps": 2, "init_weights": str(plain / "model.safetensors")})
    assert run_train(start, data, tmp_path / "guided") == 0
    assert weights_config(tmp_path / "guided" / "model.safetensors").data.atlas_gain == 0.5
    assert run_train(_cfg(model={"atlas": True}, data={"prior": "harmonic"}, train={"max_steps": 4}), data, tmp_path / "guided") == 1
    assert "was trained with data.atlas_gain=0.5, the parameters say 0.0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_keeps_its_atlas_even_when_the_training_brains_change(tmp_path, data):
    out = tmp_path / "run"
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 2}), data, out) == 0
    before = load_file(str(out / "model.safetensors"))["atlas"]
    synth.write_case(data, "case-c", seed=5, radius=4)  # a rebuilt atlas would differ
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 4}), data, out) == 0
    after = load_file(str(out / "model.safetensors"))
    assert torch.equal(after["atlas"], before) and weights_config(out / "model.safetensors").model.atlas
    fresh = tmp_path / "fresh"
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 0}), data, fresh) == 0
    assert not torch.equal(load_file(str(fresh / "model.safetensors"))["atlas"], before)


# Every recipe in configs/ starts a run on the two tiny synthetic cases, changed only where a
# real-size run would take minutes there: a 32-px crop (or 64-px whole slices) instead of the
# recipe's size and 16 base channels for the wider networks, unless the recipe starts from
# weights (whose network and crop size it keeps; the shipped weights stand in for a start file
# that only a training run makes); no loader workers and a cache folder of the test's own.
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
SHIPPED_WEIGHTS = ROOT / "workspace" / "additional_files" / "model.safetensors"


def _tiny_run(cfg: Config, tmp_path: Path) -> dict:
    from brainpaint.config.presets import resolve_architecture

    changes = {"train.max_steps": 1, "train.device": "cpu", "data.num_workers": 0, "data.cache_dir": str(tmp_path / "cache")}
    init = cfg.train.init_weights
    if init is not None:  # the network and crop size of its start weights stay
        changes["train.init_weights"] = str(ROOT / init if (ROOT / init).is_file() else SHIPPED_WEIGHTS)
        return changes
    if cfg.data.crop_size is not None:
        changes["data.crop_size"] = 32
    else:
        changes["data.slice_size"] = 64
    if resolve_architecture(cfg.model)["base_channels"] > 16:
        changes["model.base_channels"] = 16
    return changes


def test_configs_holds_the_recipes_the_docs_name_and_nothing_else():
    assert [p.name for p in RECIPES] == ["demo_small.yaml", "gpu_wide.yaml", "paper.yaml", "shipped.yaml", "tumour.yaml"]
    assert not [p for p in (ROOT / "configs").rglob("*") if p.is_dir()]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_in_configs_starts_a_run(tmp_path, data, recipe):
    cfg = Config.load(recipe)
    changes = _tiny_run(cfg, tmp_path)
    out = tmp_path / "run"
    assert run_train(cfg.override(changes), data, out) == 0
    assert list_checkpoints(out) and (out / "model.safetensors").is_file()
    # the weights describe the recipe with those changes
    meta = yaml.safe_load(safe_open(str(out / "model.safetensors"), "pt").metadata()["config"])
    assert meta == yaml.safe_load(model_config_yaml(cfg.override(changes)))


# --------------------------------------------------------------------------- kill, resume, SIGTERM
def _start(data: Path, out: Path, params: Path, new_session: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "brainpaint", "train", "--data-path", str(data), "--output-path", str(out),
           "--parameters-file", str(params)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_continues_at_the_checkpoint(tmp_path, data):
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    _cfg(train={"max_steps": 10_000}).save(params)
    proc = _start(data, out, params)
    _wait_for(lambda: len(list_checkpoints(out)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()

    ckpt = list_checkpoints(out)[-1]
    k = int(ckpt.name.split("_")[1])
    assert k >= 4 and k % 2 == 0
    ema_k = load_file(str(ckpt / "ema.safetensors"))

    # Resuming with max_steps == k trains nothing: the export is exactly the checkpoint's EMA.
    cfg = _cfg(train={"max_steps": k})
    assert run_train(cfg, data, out) == 0
    torch.testing.assert_close(load_file(str(out / "model.safetensors")), ema_k, rtol=0, atol=0)

    # Two more steps: the log continues at k+1 (rows of the killed run past k are dropped),
    # and the optimizer state continued counting from k.
    assert run_train(_cfg(train={"max_steps": k + 2}), data, out) == 0
    steps = [int(r["step"]) for r in _log_rows(out) if r["loss"]]
    assert steps == list(range(1, k + 3))
    state = torch.load(list_checkpoints(out)[-1] / "state.pt", weights_only=True)
    assert state["step"] == k + 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {k + 2}
    assert not np.allclose(load_file(str(out / "model.safetensors"))["out.2.weight"], ema_k["out.2.weight"])


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exports(tmp_path, data):
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    _cfg(train={"max_steps": 10_000, "save_every": 3}).save(params)
    proc = _start(data, out, params)
    _wait_for(lambda: len(list_checkpoints(out)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    err = proc.stderr.read()
    proc.stderr.close()
    assert "SIGTERM" in err
    final = json.loads((out / "train_summary.json").read_text())["step"]
    assert final >= 3 and list_checkpoints(out)[-1].name == f"step_{final:08d}"
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_still_checkpoints(tmp_path, data):
    # Schedulers signal every process of the job, loader workers included.
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    _cfg(train={"max_steps": 10_000, "save_every": 3}, data={"num_workers": 1}).save(params)
    proc = _start(data, out, params, new_session=True)
    _wait_for(lambda: len(list_checkpoints(out)) >= 1, proc, timeout=120)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    proc.stderr.close()
    final = json.loads((out / "train_summary.json").read_text())["step"]
    assert list_checkpoints(out)[-1].name == f"step_{final:08d}"
    assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    root = tmp_path / "data"
    for i in range(4):  # enough cases for each rank to get its own
        synth.write_case(root, f"case-{i}", seed=i, radius=3)
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    _cfg(train={"max_steps": 3, "save_every": 100}).save(params)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "brainpaint", "train", "--data-path", str(root), "--output-path", str(out),
           "--parameters-file", str(params)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert [int(r["step"]) for r in _log_rows(out) if r["loss"]] == [1, 2, 3]  # rank 0 logs alone
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]


# --------------------------------------------------------------------------- resume = the uninterrupted run
def _checkpoint_tensors(out: Path, step: int) -> dict:
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    return {name: load_file(str(ckpt / name)) for name in ("model.safetensors", "ema.safetensors")}


def _assert_same_tensors(a: dict, b: dict) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, data, workers):
    # Crops with jitter and flips: the data stream draws augmentation randomness every sample.
    settings = dict(data={"num_workers": workers, "flip_prob": 0.5}, train={"save_every": 2, "batch_size": 3})
    whole = tmp_path / "whole"
    assert run_train(_cfg(**{**settings, "train": {**settings["train"], "max_steps": 5}}), data, whole) == 0
    parts = tmp_path / "parts"
    assert run_train(_cfg(**{**settings, "train": {**settings["train"], "max_steps": 2}}), data, parts) == 0
    assert run_train(_cfg(**{**settings, "train": {**settings["train"], "max_steps": 5}}), data, parts) == 0
    _assert_same_tensors(_checkpoint_tensors(parts, 5), _checkpoint_tensors(whole, 5))


def test_stream_skipping_draws_what_sampling_would(data):
    for crop in (16, None):
        cfg = _cfg(data={"crop_size": crop, "slice_size": 48, "flip_prob": 0.5})
        ds = SliceDataset(data, cfg)
        seq = iter(TrainStream(ds, seed=5))
        expected = [next(seq) for _ in range(7)][-1]
        resumed = next(iter(TrainStream(ds, seed=5, skip=6)))
        assert torch.equal(resumed["x0"], expected["x0"]) and torch.equal(resumed["cond"], expected["cond"])


# --------------------------------------------------------------------------- failures are reported, bugs are not hidden
def test_no_resume_keeps_the_old_checkpoints_until_the_new_run_has_saved(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert run_train(_cfg(train={"max_steps": 2}), data, out) == 0
    old = [p.name for p in list_checkpoints(out)]
    # A fresh run that fails before it saves anything leaves the old checkpoints in place.
    failing = _cfg(train={"max_steps": 1, "init_weights": str(tmp_path / "missing.safetensors")})
    assert run_train(failing, data, out, resume=False) == 1
    assert "weights file not found" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out)] == old
    # Once the new run has written a checkpoint, only its own are left.
    assert run_train(_cfg(train={"max_steps": 1}), data, out, resume=False) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]
    assert sorted(p.name for p in out.iterdir() if "checkpoints" in p.name) == ["checkpoints"]


def test_a_failed_export_is_a_one_line_error(tmp_path, data, capsys):
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)  # the export cannot replace a folder
    (out / "model.safetensors" / "keep").write_text("x")
    assert run_train(_cfg(train={"max_steps": 1}), data, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "model.safetensors" in err[-1]


def test_programming_errors_keep_their_traceback(tmp_path, data, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(GaussianDiffusion, "training_losses", broken)
    with pytest.raises(ValueError, match="a bug, not a user error"):
        run_train(_cfg(train={"max_steps": 1}), data, tmp_path / "out")


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    assert run_train(_cfg(train={"max_steps": 1}), tmp_path / "absent", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: data folder {tmp_path / 'absent'} does not exist"


def _torchrun(data: Path, out: Path, params: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "brainpaint", "train", "--data-path", str(data), "--output-path", str(out),
           "--parameters-file", str(params)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _four_cases(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(4):  # enough cases for each rank to get its own
        synth.write_case(root, f"case-{i}", seed=i, radius=3)
    return root


@pytest.mark.slow
def test_ddp_resume_restores_every_rank_and_continues_the_uninterrupted_run(tmp_path):
    root = _four_cases(tmp_path)
    runs = {}
    for name, stops in (("whole", [4]), ("parts", [2, 4])):
        out = tmp_path / name
        for max_steps in stops:
            params = tmp_path / f"{name}-{max_steps}.yaml"
            _cfg(train={"max_steps": max_steps, "save_every": 2}).save(params)
            result = _torchrun(root, out, params)
            assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _checkpoint_tensors(out, 4)
    _assert_same_tensors(runs["parts"], runs["whole"])


@pytest.mark.slow
def test_ddp_export_failure_on_rank_0_stops_every_rank_with_a_message(tmp_path):
    root = _four_cases(tmp_path)
    out = tmp_path / "out"
    (out / "model.safetensors").mkdir(parents=True)
    (out / "model.safetensors" / "keep").write_text("x")
    params = tmp_path / "params.yaml"
    _cfg(train={"max_steps": 2, "save_every": 100}).save(params)
    result = _torchrun(root, out, params)
    assert result.returncode != 0
    assert "error: cannot write" in result.stderr
    assert "error: rank 0 could not" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_weights_of_the_box_fit_start_an_affine_fit_run_with_an_atlas_of_registered_brains(tmp_path, data, capsys):
    box = tmp_path / "box"
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 1}), data, box) == 0
    start = _cfg(model={"atlas": True}, data={"atlas_fit": "affine"},
                 train={"max_steps": 1, "init_weights": str(box / "model.safetensors")})
    assert run_train(start, data, tmp_path / "affine") == 0
    assert "atlas: mean of 2 registered brain(s)" in capsys.readouterr().err
    w_box, w_affine = (load_file(str(p / "model.safetensors")) for p in (box, tmp_path / "affine"))
    cases, _ = discover_cases(data, labels=True)
    np.testing.assert_array_equal(w_affine["atlas"].numpy(), atlas_from_cases(cases, fit="affine"))
    assert not torch.equal(w_affine["atlas"], w_box["atlas"])
    assert weights_config(tmp_path / "affine" / "model.safetensors").data.atlas_fit == "affine"
    # a run resumes only with its own fit
    assert run_train(_cfg(model={"atlas": True}, train={"max_steps": 2}), data, tmp_path / "affine") == 1
    assert "was trained with data.atlas_fit='affine', the parameters say 'box'" in capsys.readouterr().err
