"""The Python API (`from brainpaint import Inpainter`): the command line's guarantees on arrays
and nibabel images, one-line ValueErrors, and the README's example run as written."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import synth
from typer.testing import CliRunner

from brainpaint import Inpainter
from brainpaint.cli import app
from brainpaint.io.brats import prediction_name
from brainpaint.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
CASE = "BraTS-GLI-00003-000"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return synth.tiny_weights(tmp_path_factory.mktemp("w") / "model.safetensors")


@pytest.fixture(scope="module")
def inpainter(weights):
    return Inpainter.from_weights(weights, device="cpu", steps=2)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return synth.write_case(tmp_path_factory.mktemp("data"), CASE, seed=4, labels=False)


def _load(case_dir: Path):
    return (nib.load(str(case_dir / f"{CASE}-t1n-voided.nii.gz")), nib.load(str(case_dir / f"{CASE}-mask.nii.gz")))


def test_arrays_in_array_out_with_every_known_voxel_kept(inpainter):
    voided = (synth.make_brain() * (1 - synth.make_mask())).round().astype(np.int16)
    mask = synth.make_mask().astype(bool)
    filled = inpainter(voided, mask, affine=synth.default_affine())
    assert isinstance(filled, np.ndarray) and filled.dtype == np.int16 and filled.shape == voided.shape
    assert filled[~mask].tobytes() == voided[~mask].tobytes()
    # The fill was written (the voided input is 0 there) and stays in the input's intensity range.
    assert filled[mask].any() and 0 <= filled[mask].min() and filled[mask].max() <= voided.max()


def test_an_lps_case_fills_the_same_as_arrays_with_its_affine_as_images_and_through_the_command(
        inpainter, case_dir, weights, tmp_path):
    voided, mask = _load(case_dir)
    assert nib.aff2axcodes(voided.affine) == ("L", "P", "S")  # stored as BraTS stores its files
    filled = inpainter(voided, mask, case_id=CASE)
    assert isinstance(filled, nib.Nifti1Image)
    np.testing.assert_array_equal(filled.affine, voided.affine)
    assert filled.get_data_dtype() == voided.get_data_dtype()
    values, inside = np.asanyarray(voided.dataobj), np.asanyarray(mask.dataobj)
    as_arrays = inpainter(values, inside, affine=voided.affine, case_id=CASE)
    np.testing.assert_array_equal(as_arrays, np.asanyarray(filled.dataobj))

    result = CliRunner().invoke(app, ["infer", "--data-path", str(case_dir.parent), "--output-path", str(tmp_path / "out"),
                                      "--weights", str(weights), "--device", "cpu", "--steps", "2"])
    assert result.exit_code == 0, result.output
    written = nib.load(str(tmp_path / "out" / prediction_name(CASE)))
    np.testing.assert_array_equal(np.asanyarray(filled.dataobj), np.asanyarray(written.dataobj))
    # The orientation matters: the same arrays taken as RAS are filled differently ...
    as_ras = inpainter(values, inside, affine=np.eye(4), case_id=CASE)
    assert np.abs(as_ras[inside > 0].astype(float) - as_arrays[inside > 0]).max() > 1
    # ... so arrays without their affine are refused, never guessed.
    with pytest.raises(InputError, match=rf"^{CASE}: numpy arrays need the affine of their image: pass affine=img.affine"):
        inpainter(values, inside, case_id=CASE)


def test_an_ensemble_returns_its_spread(weights, case_dir):
    voided, mask = _load(case_dir)
    sampler = Inpainter.from_weights(weights, device="cpu", steps=2, temperature=1, ensemble=2)
    values, inside = np.asanyarray(voided.dataobj), np.asanyarray(mask.dataobj).astype(bool)
    filled, std = sampler(values, inside, affine=voided.affine, return_std=True)
    assert std.dtype == np.float32 and std.shape == values.shape
    assert np.all(std[~inside] == 0) and std[inside].mean() > 0
    assert filled[~inside].tobytes() == values[~inside].tobytes()


def test_the_harmonic_fill_needs_no_weights(monkeypatch, case_dir):
    monkeypatch.setenv("BRAINPAINT_WEIGHTS", "/nonexistent/model.safetensors")
    voided, mask = _load(case_dir)
    filled = Inpainter.from_weights(method="harmonic")(voided, mask)
    inside = np.asanyarray(mask.dataobj).astype(bool)
    assert np.all(np.asanyarray(filled.dataobj)[inside] > 0)


def test_default_weights_follow_the_environment(monkeypatch, weights):
    monkeypatch.setenv("BRAINPAINT_WEIGHTS", str(weights))
    assert Inpainter.from_weights(device="cpu").predictor.weights == weights


def _voided_and_mask():
    mask = synth.make_mask()
    return synth.make_brain() * (1 - mask), mask


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v, m: (v, m[:, :, :-1]), "volume: shape mismatch: voided (48, 48, 20) vs mask (48, 48, 19)"),
        (lambda v, m: (v, np.zeros_like(m)), "volume: mask is empty"),
        (lambda v, m: (v, np.ones_like(m)), "volume: mask covers the whole volume: there is no known tissue to fill from"),
        (lambda v, m: (v, m * 2), "volume: mask is not binary (values other than 0/1: 2)"),
        (lambda v, m: (np.where(m > 0, v, np.nan), m), "volume: voided has"),
        (lambda v, m: (v[..., None], m[..., None]), "volume: voided is 4D with shape (48, 48, 20, 1); expected a 3D volume"),
        (lambda v, m: (v.astype(str), m), "volume: voided has dtype <U32; expected numbers"),
    ],
)
def test_bad_input_is_a_one_line_value_error(inpainter, change, message):
    voided, mask = change(*_voided_and_mask())
    with pytest.raises(ValueError) as err:
        inpainter(voided, mask, affine=np.eye(4))
    assert isinstance(err.value, InputError) and str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("affine", [None, np.eye(3), np.zeros((4, 4)), np.full((4, 4), np.nan), "RAS"])
def test_arrays_without_a_usable_affine_are_refused(inpainter, affine):
    with pytest.raises(InputError) as err:
        inpainter(*_voided_and_mask(), affine=affine)
    message = str(err.value)
    assert message.startswith("volume: ") and "affine" in message and "\n" not in message


def test_an_affine_that_contradicts_the_images_is_refused(inpainter, case_dir):
    voided, mask = _load(case_dir)
    np.testing.assert_array_equal(np.asanyarray(inpainter(voided, mask, affine=voided.affine).dataobj),
                                  np.asanyarray(inpainter(voided, mask).dataobj))
    with pytest.raises(InputError, match="^volume: affine= differs from the nibabel image's own affine$"):
        inpainter(voided, mask, affine=np.eye(4))


def test_images_on_different_grids_and_wrong_requests_are_errors(inpainter, case_dir):
    voided, mask = _load(case_dir)
    affine = mask.affine.copy()
    affine[0, 3] += 0.5
    shifted = nib.Nifti1Image(np.asanyarray(mask.dataobj), affine)
    with pytest.raises(InputError, match=r"^case-x: affine mismatch: mask differs from voided by up to 0.5$"):
        inpainter(voided, shifted, case_id="case-x")
    with pytest.raises(InputError, match="return_std=True needs the diffusion method with ensemble > 1"):
        inpainter(voided, mask, return_std=True)
    with pytest.raises(ConfigError, match="unknown parameter 'infer.stepz'"):
        Inpainter.from_weights(stepz=3)
    with pytest.raises(ValueError, match="infer.steps must be >= 1"):
        Inpainter.from_weights(steps=0)


# ---------------------------------------------------------------- the README, run as written
def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, weights):
    """The README's Python block, on a tiny synthetic case at the demo case's path."""
    section = _readme_section("Python API")
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    case_id = re.search(r"workspace/data/(BraTS-[A-Z]+-\d{5}-\d{3})/", code).group(1)
    synth.write_case(tmp_path / "workspace" / "data", case_id, seed=5, labels=False)
    (tmp_path / "example.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO / "project"), BRAINPAINT_WEIGHTS=str(weights), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.glob("*.nii.gz"))
    assert written == [prediction_name(case_id)]
    voided = np.asanyarray(nib.load(str(tmp_path / "workspace/data" / case_id / f"{case_id}-t1n-voided.nii.gz")).dataobj)
    mask = synth.make_mask().astype(bool)
    assert np.asanyarray(nib.load(str(tmp_path / written[0])).dataobj)[~mask].tobytes() == voided[~mask].tobytes()


def test_the_readme_one_line_python_checks_run():
    commands = re.findall(r'^\s*(python -c "[^"]+")\s*(?:#.*)?$', (REPO / "README.md").read_text(), re.M)
    assert any("from brainpaint import Inpainter" in c for c in commands)
    env = dict(os.environ, PYTHONPATH=str(REPO / "project"))
    for command in commands:
        argv = shlex.split(command)
        result = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
