"""Slice consistency: correlated sampling noise, 2.5D conditioning and the stripe index.

Slice-wise 2D sampling draws every axial slice independently, which shows up as stripes in
coronal and sagittal views. These tests pin down the mechanisms that counter it: noise shared
across the slices of a volume (`infer.noise_correlation`), neighbouring slices as network input
(`model.context_slices`), and the measure itself (`evaluate.stripe_index`).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from brainpaint.io.brats import CaseData
from brainpaint.config.settings import Config
from brainpaint.evaluate import stripe_index
from brainpaint.errors import ConfigError
from brainpaint.diffusion.noise import CorrelatedNoise
from brainpaint.infer.inpainter import DiffusionInpainter

import synth

torch.set_num_threads(1)

SHAPE = synth.SMALL_SHAPE  # (48, 48, 20)
Z_MASKED = range(4, 16)  # the slices the cylinder mask below covers


tiny_weights = synth.tiny_weights


def z_invariant_case() -> CaseData:
    """A brain that is identical in every axial slice, with a cylinder mask along z.

    All masked slices then get exactly the same network conditioning, so any difference
    between their fills comes from the sampling noise alone.
    """
    section = synth.make_brain(seed=3)[:, :, SHAPE[2] // 2]
    brain = np.repeat(section[:, :, None], SHAPE[2], axis=2)
    disk = np.zeros(SHAPE[:2], bool)
    xx, yy = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    disk[(xx - 24) ** 2 + (yy - 22) ** 2 <= 25] = True
    mask = np.zeros(SHAPE, bool)
    mask[:, :, Z_MASKED.start : Z_MASKED.stop] = disk[:, :, None]
    voided = np.where(mask, 0, brain).astype(np.float32)
    return CaseData(
        id="BraTS-GLI-00070-000",
        voided=voided,
        mask=mask,
        affine=synth.default_affine(),
        header=nib.Nifti1Header(),
        dtype=np.dtype(np.int16),
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


def predict(weights, data, **infer):
    # Temperature 1 (not the shipped 0): these tests are about how the sampling noise is shared.
    settings = {"weights": str(weights), "device": "cpu", "sampler": "ddim", "steps": 3, "smoothing_sigma": 0,
                "temperature": 1.0}
    settings.update(infer)
    return DiffusionInpainter(Config.from_dict({"infer": settings}))(data, seed=7).volume


def fills_by_slice(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The in-mask values of every masked slice, one row per slice (same disk in each)."""
    return np.stack([volume[:, :, z][mask[:, :, z]] for z in Z_MASKED])


# --------------------------------------------------------------------------- the noise itself
def test_fully_shared_noise_is_one_field_per_step_for_all_slices_and_batches():
    noise = CorrelatedNoise(1.0, seed=5, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    first_batch, second_batch = noise.for_batch(), noise.for_batch()
    a0, a1 = first_batch((6, 1, 8, 8), gen), first_batch((6, 1, 8, 8), gen)
    b0 = second_batch((2, 1, 8, 8), gen)  # a later, smaller batch of the same volume
    assert a0.shape == (6, 1, 8, 8)
    for i in range(6):
        torch.testing.assert_close(a0[i], a0[0], rtol=0, atol=0)
    torch.testing.assert_close(b0[1], a0[0], rtol=0, atol=0)  # same step, another batch
    assert not torch.equal(a1[0], a0[0])  # every step draws a fresh shared field


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_partly_shared_noise_has_unit_variance_and_correlation_rho(rho):
    noise = CorrelatedNoise(rho, seed=1, device=torch.device("cpu")).for_batch()
    gen = torch.Generator().manual_seed(2)
    draws = noise((4, 1, 64, 64), gen).reshape(4, -1)
    variance = draws.var(dim=1)
    assert torch.all((variance - 1).abs() < 0.08)
    corr = torch.corrcoef(draws)
    off_diagonal = corr[~torch.eye(4, dtype=torch.bool)]
    assert torch.all((off_diagonal - rho).abs() < 0.06)


def test_noise_correlation_outside_unit_interval_is_a_configuration_error(weights):
    for bad in (-0.5, 1.5):
        with pytest.raises(ConfigError, match="infer.noise_correlation must be in \\[0, 1\\]"):
            DiffusionInpainter(Config.from_dict({"infer": {"weights": str(weights), "device": "cpu", "noise_correlation": bad}}))


# --------------------------------------------------------------------------- effect on samples
def test_shared_noise_makes_identically_conditioned_slices_identical(weights):
    data = z_invariant_case()
    rows = fills_by_slice(predict(weights, data, noise_correlation=1.0, batch_slices=5), data.mask)
    # Same conditioning + same noise: every slice's fill equals the first one (batches of 5
    # slices replay the same shared noise, so this also holds across batch boundaries).
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), rtol=1e-4, atol=1e-2)  # intensities ~1e3

    independent = fills_by_slice(predict(weights, data, noise_correlation=0.0, batch_slices=5), data.mask)
    slice_to_slice = np.abs(np.diff(independent, axis=0)).mean()
    assert slice_to_slice > 10 * max(np.abs(np.diff(rows, axis=0)).mean(), 1e-3)


def test_more_correlation_means_smoother_through_plane(weights):
    data = z_invariant_case()

    def through_plane_energy(rho):
        volume = predict(weights, data, noise_correlation=rho)
        return float(np.mean(np.diff(fills_by_slice(volume, data.mask), axis=0) ** 2))

    e0, e5, e9 = (through_plane_energy(r) for r in (0.0, 0.5, 0.9))
    assert e0 > e5 > e9 > 0


# --------------------------------------------------------------------------- 2.5D conditioning
def test_context_slices_pass_the_neighbouring_slices_to_the_network(tmp_path):
    data = CaseData(**{**z_invariant_case().__dict__})
    rng = np.random.default_rng(0)
    data.voided = data.voided * rng.uniform(0.8, 1.2, SHAPE[2])[None, None, :].astype(np.float32)
    inpainter = DiffusionInpainter(
        Config.from_dict({"infer": {"weights": str(tiny_weights(tmp_path / "c1.safetensors", context_slices=1)), "device": "cpu", "steps": 2}})
    )
    zs, vin, box, cond = inpainter.conditioning(data)
    assert zs == list(Z_MASKED)
    assert cond.shape == (len(zs), 6, 48, 48)  # b, m, b_{z-1}, m_{z-1}, b_{z+1}, m_{z+1}
    for i in range(1, len(zs) - 1):
        np.testing.assert_array_equal(cond[i, 2:4], cond[i - 1, 0:2])
        np.testing.assert_array_equal(cond[i, 4:6], cond[i + 1, 0:2])
    # The slices just outside the mask are context too: known tissue, empty mask.
    np.testing.assert_array_equal(cond[0, 2], vin.b[:, :, zs[0] - 1])
    assert cond[0, 3].sum() == 0 and cond[0, 1].sum() > 0
    volume = inpainter(data, seed=1).volume
    assert np.isfinite(volume).all()
    np.testing.assert_array_equal(volume[~data.mask], data.voided[~data.mask])


# --------------------------------------------------------------------------- the measure
def test_stripe_index_is_high_for_stacked_independent_slices_and_one_for_isotropic_tissue():
    rng = np.random.default_rng(0)
    shape = (40, 40, 30)
    mask = np.zeros(shape, bool)
    mask[8:32, 8:32, 5:25] = True
    truth = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    other_draw = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)  # same texture, new sample
    # Each slice an independent draw of the same in-plane texture: what slice-wise sampling gives.
    stacked = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(shape[:2]), 1.5) for _ in range(shape[2])], axis=2
    )
    stacked *= truth.std() / stacked.std()
    assert stripe_index(truth, truth, mask) == pytest.approx(1.0)
    assert stripe_index(other_draw, truth, mask) == pytest.approx(1.0, abs=0.1)
    assert stripe_index(stacked, truth, mask) > 2.0
    # A 3D Gaussian filter lowers the index of the stacked volume but also blurs in-plane.
    assert stripe_index(ndimage.gaussian_filter(stacked, 1.075), truth, mask) < stripe_index(stacked, truth, mask)


# --------------------------------------------------------------------------- the table script
def _stripe_table_module():
    return synth.load_benchmark("stripe_table")


def test_stripe_table_runs_the_chosen_variants_on_one_mask_per_subject(tmp_path, weights, capsys):
    table = _stripe_table_module()
    data = tmp_path / "val"
    for case_id in ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000"):
        synth.write_case(data, case_id, seed=int(case_id[-5:-4]), radius=4, centre=(24, 22, 9))
    out = tmp_path / "table.md"
    args = ["--data", str(data), "--weights", str(weights), "--steps", "2", "--threads", "1"]
    rc = table.main(args + ["--variants", "harmonic,default,ens4", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0
    assert "2 cases: BraTS-GLI-00001-000, BraTS-GLI-00002-000" in printed.err  # the -000 cases only
    text = out.read_text()
    assert text.strip() == printed.out.strip()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| variant", "| harmonic fill (no network)", "| default (workspace/parameters.yaml)", "| + ensemble K=4"
    ]
    assert all(" ± " in cell for r in rows[1:] for cell in r.split(" | ")[1:5])

    # the equal-budget comparison: a 2.5D model and its 2D control, each at the default sampler
    wide = tiny_weights(tmp_path / "tiny_25d.safetensors", context_slices=1)
    rc = table.main(args + ["--variants", "ctl+default,25d+default", "--weights-25d", str(wide), "--weights-control", str(weights)])
    printed = capsys.readouterr()
    assert rc == 0
    assert f"- 2.5D weights: {wide}." in printed.out and f"- 2D control weights: {weights}." in printed.out
    rows = [line.split(" | ")[0] for line in printed.out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| 2D control (equal budget), default sampler", "| 2.5D model, default sampler"]
    assert table.main(args + ["--variants", "ctl"]) == 2
    assert "the 2D control variants need --weights-control" in capsys.readouterr().err

    assert table.main(args + ["--variants", "plain,nonsense"]) == 2
    assert "unknown variant(s) nonsense" in capsys.readouterr().err
    assert table.main(["--data", str(tmp_path / "absent")]) == 0
    assert "SKIPPED" in capsys.readouterr().err
