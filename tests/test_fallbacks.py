"""No silent fallback: where a fill falls back on something else (the atlas placed by its box,
the harmonic solver short of its tolerance, the midline at the grid's centre), the case says so
in its line, in the summary, in its QA report and, through the Python API, as a warning."""
from __future__ import annotations

import re
import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import synth
from brainpaint import Inpainter
from brainpaint.conditioning import atlas as atlas_module
from brainpaint.conditioning import harmonic
from brainpaint.conditioning.atlas import ATLAS_SHAPE, register
from brainpaint.conditioning.geometry import midline_shift
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.config.settings import Config
from brainpaint.data.atlas_build import build_atlas
from brainpaint.errors import FallbackWarning
from brainpaint.infer.batch import run_infer

HARMONIC = Config().override({"infer.method": "harmonic"})


# --------------------------------------------------------------------------- where they happen
def test_a_solve_stopped_short_of_its_tolerance_says_so(monkeypatch):
    # A line of voxels known only at its two ends: conjugate gradients needs about one
    # iteration per voxel, more than MAX_ITER allows here.
    line = np.zeros((1200, 1, 1), np.float32)
    line[0], line[-1] = 100.0, 10.0
    mask = np.zeros(line.shape, bool)
    mask[1:-1] = True
    monkeypatch.setattr(harmonic, "MAX_ITER", 300)
    notes: list[str] = []
    filled = harmonic_fill(line, mask, notes=notes)
    assert len(notes) == 1 and re.fullmatch(
        r"harmonic fill of 1198 voxels did not converge: the solver stopped after 300 iterations at relative "
        r"residual \S+ \(tolerance 1e-07\); its last iterate is used", notes[0]), notes
    assert np.all((filled[mask] >= 10.0) & (filled[mask] <= 100.0))  # still a bounded estimate
    monkeypatch.undo()
    notes.clear()
    harmonic_fill(line, mask, notes=notes)
    harmonic_fill(synth.make_brain(), synth.make_mask().astype(bool), notes=notes)
    assert notes == []


def test_a_volume_with_no_midline_to_find_says_the_centre_is_used():
    brain = synth.make_brain()
    notes: list[str] = []
    midline_shift(brain, brain > 0, notes=notes)
    assert notes == []  # a brain with structure on both sides
    flat = (brain > 0).astype(np.float32) * 500.0  # no contrast: every shift matches as well
    small = synth.make_brain((20, 20, 12))  # too few voxels known on both sides
    for volume in (flat, small):
        assert midline_shift(volume, volume > 0, notes=notes) == 0
    assert notes == ["midline not found (under 1000 brain voxels known on both sides at every shift, or no contrast "
                     "there): the mirror channels reflect about the grid's centre"] * 2


def test_each_fallback_of_the_atlas_registration_says_what_placed_the_atlas(monkeypatch):
    brain = synth.make_brain((40, 48, 40), seed=2)
    atlas = build_atlas([brain])
    no_mask = np.zeros(brain.shape, bool)
    notes: list[str] = []
    register(atlas, brain, no_mask, brain > 0, notes)
    assert notes == []  # converged on an improvement

    small = synth.make_brain((20, 20, 12))
    assert register(atlas, small, np.zeros(small.shape, bool), small > 0, notes).A is not None
    assert len(notes) == 1 and notes[0].startswith("atlas registration: ") and notes[0].endswith(
        " known brain voxels on its 3-voxel grid, under 100: the atlas is placed by the brain's bounding box")
    notes.clear()
    flat = np.full(ATLAS_SHAPE, 0.5, np.float32)  # an atlas with nothing to correlate
    placement = register(flat, brain, no_mask, brain > 0, notes)
    assert np.array_equal(placement.A, np.eye(3)) and not placement.t.any()
    assert notes[-1] == "atlas registration found no placement better than the brain's bounding box: the box is used"
    notes.clear()
    monkeypatch.setattr(atlas_module, "REGISTER_MAXITER", 1)  # a search cut short
    placement = register(atlas, brain, no_mask, brain > 0, notes)
    assert notes[0] == (f"atlas registration did not converge within its tolerances ({placement.iterations} "
                        "iterations): its best placement is used")


# --------------------------------------------------------------------------- where they are told
def test_a_fallback_is_in_the_case_line_the_summary_and_the_qa_report(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    for cid in ("a", "b"):
        synth.write_case(data, cid, labels=False)
    assert run_infer(HARMONIC, data, tmp_path / "out", report_dir=tmp_path / "plain") == 0
    capsys.readouterr()
    monkeypatch.setattr(harmonic, "MAX_ITER", 1)
    code = run_infer(HARMONIC, data, tmp_path / "out2", report_dir=tmp_path / "qa")
    assert code == 0  # a fill on a fallback is still a fill: the run succeeds, and says so
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"a: ok \(\d+\.\d s, 11 slices, 1 warning\) \[1/2\]", lines[1]), lines
    assert re.fullmatch(r"warning: a: harmonic fill of \d+ voxels did not converge: the solver stopped after 1 "
                        r"iterations at relative residual \S+ \(tolerance 1e-07\); its last iterate is used", lines[2])
    assert lines[-4].split() == ["case", "status", "seconds", "slices", "warnings"]
    assert lines[-3].split()[:2] == ["a", "ok"] and lines[-3].split()[-1] == "1"
    assert lines[-1] == "2 cases: 2 ok (2 with warnings), 0 failed, 0 skipped"
    # The QA picture carries the warning under its panels.
    plain, warned = (Image.open(tmp_path / folder / "a-qa.png") for folder in ("plain", "qa"))
    assert warned.width == plain.width and warned.height > plain.height
    caption = np.asarray(warned.convert("RGB")).astype(int)[plain.height:]
    yellow = (caption[..., 0] > 200) & (caption[..., 1] > 170) & (caption[..., 2] < 60)
    assert yellow.sum() > 100  # the warning, in yellow


@pytest.fixture(scope="module")
def guided_weights(tmp_path_factory):
    """Weights like the shipped ones: harmonic prior, mirror channels, an atlas placed by the affine fit."""
    atlas = build_atlas([synth.make_brain(seed=3)])
    return synth.tiny_weights(tmp_path_factory.mktemp("w") / "guided.safetensors", crop_size=16, prior="harmonic",
                              prediction="x0", mirror=True, atlas=atlas, atlas_fit="affine")


def test_the_diffusion_path_tells_its_fallbacks_in_the_case_line_and_the_api(tmp_path, guided_weights, capsys):
    # A small brain: too little of it on the registration's grid, too little on both sides
    # of any midline.
    case = synth.write_case(tmp_path / "data", "small", shape=(20, 20, 12), radius=3, labels=False)
    cfg = Config().override({"infer.weights": str(guided_weights), "infer.device": "cpu"})
    assert run_infer(cfg, tmp_path / "data", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert re.search(r"^small: ok \(\d+\.\d s, \d+ slices, 2 warnings\) \[1/1\]$", err, re.M), err
    assert "\nwarning: small: midline not found" in err and "\nwarning: small: atlas registration: " in err
    assert err.rstrip().endswith("1 cases: 1 ok (1 with warnings), 0 failed, 0 skipped")

    voided, mask = (nib.load(str(case / f"small-{name}.nii.gz")) for name in ("t1n-voided", "mask"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Inpainter.from_weights(guided_weights, device="cpu")(voided, mask, case_id="small")
    told = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(told) == 2 and told[0].startswith("small: midline not found") and told[1].startswith("small: atlas registration: ")
