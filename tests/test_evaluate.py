"""Evaluation: numbers identical to the official package, stripe index, missing/extra predictions."""
from __future__ import annotations

import contextlib
import csv
import io
import math

import numpy as np
import pytest
import yaml
from scipy import ndimage
from inpainting.challenge_metrics_2023 import compute_image_quality_metrics
from typer.testing import CliRunner

import synth
from brainpaint.infer.batch import run_infer
from brainpaint.io.brats import prediction_name
from brainpaint.config.settings import Config
from brainpaint.evaluate import run_evaluate, stripe_index

CFG = Config().override({"infer.method": "harmonic"})


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two labelled cases (int16 and float32) with harmonic predictions."""
    root = tmp_path_factory.mktemp("eval")
    labels, preds = root / "labels", root / "preds"
    synth.write_case(labels, "case-1", seed=1, dtype=np.int16)
    synth.write_case(labels, "case-2", seed=2, dtype=np.float32, radius=6)
    assert run_infer(CFG, labels, preds) == 0
    return labels, preds, root


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _official(labels, preds, cid):
    folder = labels / cid
    with contextlib.redirect_stdout(io.StringIO()):
        return compute_image_quality_metrics(
            prediction=str(preds / prediction_name(cid)),
            healthy_mask=str(folder / f"{cid}-mask-healthy.nii.gz"),
            reference_t1=str(folder / f"{cid}-t1n.nii.gz"),
            voided_t1=str(folder / f"{cid}-t1n-voided.nii.gz"),
        )


def test_metrics_equal_the_official_package(scored, capsys):
    labels, preds, root = scored
    out = root / "m1" / "metrics.csv"
    assert run_evaluate(CFG, preds, labels, out) == 0
    rows = _rows(out)
    assert [r["case"] for r in rows] == ["case-1", "case-2"]
    assert list(rows[0])[:4] == ["case", "ssim", "psnr", "mse"] and "stripe_index" in rows[0]
    for row in rows:
        official = _official(labels, preds, row["case"])
        for key in ("ssim", "psnr", "mse"):
            assert float(row[key]) == official[key], key
        assert 0 < official["ssim"] < 1 and official["mse"] > 0
    summary = yaml.safe_load((root / "m1" / "metrics_summary.yaml").read_text())
    assert summary["cases_scored"] == 2 and summary["cases_failed"] == 0
    for key in ("ssim", "psnr", "mse", "stripe_index"):
        values = [float(r[key]) for r in rows]
        assert summary["metrics"][key]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert summary["metrics"][key]["std"] == pytest.approx(np.std(values), rel=1e-12)
    printed = capsys.readouterr().out
    assert "ssim" in printed and printed.rstrip().endswith("2 cases: 2 scored, 0 failed")
    assert sorted(p.name for p in (root / "m1").iterdir()) == ["metrics.csv", "metrics_summary.yaml"]


def test_missing_and_extra_predictions_fail_clearly(scored, tmp_path, capsys):
    labels, preds, _ = scored
    partial = tmp_path / "preds"
    partial.mkdir()
    (partial / prediction_name("case-2")).write_bytes((preds / prediction_name("case-2")).read_bytes())
    (partial / prediction_name("case-9")).write_bytes(b"stray")
    out = tmp_path / "metrics.csv"
    assert run_evaluate(CFG, partial, labels, out) == 1
    err = capsys.readouterr().err
    assert f"error: case-1: missing prediction {prediction_name('case-1')}" in err
    assert f"error: {prediction_name('case-9')}: extra file in the predictions folder" in err
    assert [r["case"] for r in _rows(out)] == ["case-2"]  # the good case is still scored
    summary = yaml.safe_load((tmp_path / "metrics_summary.yaml").read_text())
    assert set(summary["failed"]) == {"case-1", prediction_name("case-9")}


def test_prediction_with_wrong_shape_is_a_case_error(scored, tmp_path, capsys):
    labels, preds, _ = scored
    bad = tmp_path / "preds"
    bad.mkdir()
    (bad / prediction_name("case-1")).write_bytes((preds / prediction_name("case-1")).read_bytes())
    synth.save(np.zeros((48, 48, 19)), bad / prediction_name("case-2"), dtype=np.int16)
    assert run_evaluate(CFG, bad, labels, tmp_path / "m.csv") == 1
    assert "error: case-2: shape mismatch: case-2-t1n-inference.nii.gz (48, 48, 19)" in capsys.readouterr().err


def test_stripe_index_can_be_switched_off(scored, tmp_path):
    labels, preds, _ = scored
    cfg = CFG.override({"evaluate.stripe_index": False})
    assert run_evaluate(cfg, preds, labels, tmp_path / "m.csv") == 0
    assert "stripe_index" not in _rows(tmp_path / "m.csv")[0]


def test_cli_evaluate(scored, tmp_path):
    from brainpaint.cli import app

    labels, preds, _ = scored
    out = tmp_path / "cli" / "metrics.csv"
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(preds), "--labels", str(labels), "--output-file", str(out)])
    assert result.exit_code == 0, result.output
    assert len(_rows(out)) == 2


# --------------------------------------------------------------------------- stripe index
def test_stripe_index_hand_computed():
    mask = np.zeros((3, 3, 3), bool)
    mask[0:2, 0:1, 0:2] = True  # pairs: x (2: z=0,1), z (2: x=0,1); no y pairs
    gt = np.zeros((3, 3, 3))
    gt[1, 0, :] = 1.0  # x-differences 1, z-differences 0 ... plus a z-gradient:
    gt[:, :, 1] += 2.0  # z-differences 2
    pred = gt.copy()
    pred[:, :, 1] += 1.0  # z-differences 3
    # gt: x energy mean 1, z energy mean 4 -> R = 4; pred: x 1, z 9 -> R = 9
    assert stripe_index(pred, gt, mask) == pytest.approx(9 / 4)
    assert stripe_index(gt, gt, mask) == pytest.approx(1.0)


def test_stripe_index_detects_slice_offsets_and_ignores_outside_pairs():
    gt = synth.make_brain(seed=4).astype(np.float64)
    mask = synth.make_mask(radius=7).astype(bool)
    assert stripe_index(gt, gt, mask) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    striped = gt + rng.normal(0, 150, gt.shape[2])[None, None, :]
    assert stripe_index(striped, gt, mask) > 2.0
    changed_outside = gt.copy()
    changed_outside[~mask] = rng.normal(0, 500, (~mask).sum())
    assert stripe_index(changed_outside, gt, mask) == pytest.approx(1.0)


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


def test_stripe_index_undefined_cases_are_nan():
    vol = np.ones((5, 5, 5))
    one_slice = np.zeros((5, 5, 5), bool)
    one_slice[1:4, 1:4, 2] = True
    assert math.isnan(stripe_index(vol, vol + np.arange(5), one_slice))
    assert math.isnan(stripe_index(vol, vol, np.ones((5, 5, 5), bool)))  # flat: no energy
