"""DiffusionInpainter with a tiny randomly initialised network: geometry, known voxels,
determinism, ensembles, samplers, post-filter, and `brainpaint infer` end to end."""
from __future__ import annotations

import dataclasses
import re

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage
from typer.testing import CliRunner

from brainpaint.conditioning.atlas import atlas_residual
from brainpaint.data.atlas_build import build_atlas
from brainpaint.conditioning.intensity import IntensityMap
from brainpaint.io.brats import CaseData, discover_cases, load_case, to_ras
from brainpaint.config.settings import Config
from brainpaint.errors import ConfigError
from brainpaint.model.devices import select_device
from brainpaint.errors import InferenceSetupError
from brainpaint.infer.inpainter import DiffusionInpainter
from brainpaint.infer.smoothing import smooth_in_mask
from brainpaint.model.weights_path import resolve_weights

import synth

torch.set_num_threads(1)

CASE = "BraTS-GLI-00007-000"


write_weights = synth.tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def case_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synth.write_case(root, CASE, seed=1, labels=False, radius=4, centre=(24, 22, 9))
    cases, errors = discover_cases(root)
    assert not errors
    return load_case(cases[0])


def make(weights, **infer):
    # Temperature 1 (not the shipped 0) so that seeds, ensembles and noise settings play their part.
    base = {"weights": str(weights), "device": "cpu", "steps": 3, "sampler": "ddim", "temperature": 1.0}
    base.update(infer)
    return DiffusionInpainter(Config.from_dict({"infer": base}))


@pytest.mark.slow
def test_prediction_geometry_and_known_voxels(weights, case_data):
    pred = make(weights)(case_data, seed=5)
    mask = case_data.mask
    assert pred.volume.shape == case_data.voided.shape and pred.volume.dtype == np.float32
    assert pred.slices == int(mask.any(axis=(0, 1)).sum())
    np.testing.assert_array_equal(pred.volume[~mask], case_data.voided[~mask])
    # The fill is in the input intensity scale: inside the metric's [lo, hi] window.
    lo, hi = np.percentile(case_data.voided, [0.5, 99.5])
    assert pred.volume[mask].min() >= max(lo, 0) - 1e-3 and pred.volume[mask].max() <= hi + 1e-3
    assert pred.volume[mask].std() > 0
    assert pred.std is None


@pytest.mark.slow
def test_seed_determinism(weights, case_data):
    inpainter = make(weights, sampler="ddpm", steps=4)
    a = inpainter(case_data, seed=11).volume
    b = make(weights, sampler="ddpm", steps=4)(case_data, seed=11).volume
    c = inpainter(case_data, seed=12).volume
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[case_data.mask], c[case_data.mask])


@pytest.mark.slow
def test_ensemble_mean_and_std(weights, case_data):
    single = make(weights, smoothing_sigma=0)(case_data, seed=3)
    pred = make(weights, ensemble=3, smoothing_sigma=0)(case_data, seed=3)
    mask = case_data.mask
    assert pred.std is not None and pred.std.shape == mask.shape
    assert np.all(pred.std[~mask] == 0) and pred.std[mask].mean() > 0
    # Member 0 of the ensemble is the single sample with the same seed; averaging changes the fill.
    assert not np.array_equal(pred.volume[mask], single.volume[mask])
    np.testing.assert_array_equal(pred.volume[~mask], case_data.voided[~mask])


def test_ensemble_is_the_mean_of_its_members_and_its_std_their_spread(weights, case_data, monkeypatch):
    inpainter = make(weights, ensemble=3, smoothing_sigma=0)
    case_data = case_data.in_ras()  # the network's frame: the slices below are the ones it fills
    zs, vin, box, cond = inpainter.conditioning(case_data)
    assert box == (slice(0, 48), slice(0, 48))  # whole 48x48 slices: network pixels are grid voxels
    rng = np.random.default_rng(0)
    drawn = [rng.uniform(-1.2, 1.2, (len(zs), 48, 48)).astype(np.float32) for _ in range(3)]
    calls = []

    def sample_slices(cond_, seed, member, keys=None):  # a batch of slices, named (window, z)
        calls.append((seed, member))
        return np.stack([drawn[member][zs.index(z)] for _, z in keys])

    monkeypatch.setattr(inpainter, "sample_slices", sample_slices)
    pred = inpainter(case_data, seed=3)
    assert sorted(set(calls)) == [(3, 0), (3, 1), (3, 2)] and calls == sorted(calls)
    mask = case_data.mask
    # Each member's fill in [0, 1] (prior "none": image = (x0 + 1) / 2, clipped), at the mask voxels.
    members = np.stack([
        np.concatenate([np.clip((x[i] + 1) / 2, 0, 1)[mask[:, :, z]] for i, z in enumerate(zs)]) for x in drawn
    ])
    order = np.concatenate([np.flatnonzero(mask[:, :, z].ravel()) * mask.shape[2] + z for z in zs])
    members = members[:, np.argsort(order)]  # slice by slice -> the volume's C order
    np.testing.assert_allclose(pred.volume[mask], vin.imap.denormalize(members.mean(axis=0)), rtol=1e-6)
    np.testing.assert_allclose(pred.std[mask], members.std(axis=0) * (vin.imap.hi - vin.imap.lo), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_temperature_zero_is_one_deterministic_fill_whatever_the_seed(weights, case_data):
    cold = make(weights, temperature=0.0)
    a, b = cold(case_data, seed=1).volume, cold(case_data, seed=2).volume
    np.testing.assert_array_equal(a, b)
    warm = make(weights, temperature=1.0)
    assert not np.array_equal(warm(case_data, seed=1).volume, warm(case_data, seed=2).volume)
    with pytest.raises(ConfigError, match="infer.temperature must be >= 0"):  # checked when the parameters load
        make(weights, temperature=-1.0)


@pytest.mark.slow
def test_batching_does_not_change_independent_slices(weights, case_data):
    # float32: bf16 (CUDA, and CPUs that compute it natively) rounds batched convolutions
    # differently, which sampled steps of an untrained network amplify
    one_batch = make(weights, batch_slices=0, bf16=False)(case_data, seed=2).volume
    per_slice = make(weights, batch_slices=1, bf16=False)(case_data, seed=2).volume
    # Each slice draws its own noise stream however slices are batched; only the float rounding
    # of batched convolutions differs (below 1e-4 of the ~1000 intensity range, where other
    # noise would move voxels by hundreds).
    np.testing.assert_allclose(one_batch, per_slice, atol=0.1)
    assert np.abs(one_batch - make(weights, batch_slices=1, bf16=False)(case_data, seed=3).volume).max() > 10


# --------------------------------------------------------------------------- 2.5D conditioning
SHAPE = synth.SMALL_SHAPE  # (48, 48, 20)
Z_MASKED = range(4, 16)  # the slices the cylinder mask below covers


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


def test_context_slices_pass_the_neighbouring_slices_to_the_network(tmp_path):
    data = CaseData(**{**z_invariant_case().__dict__})
    rng = np.random.default_rng(0)
    data.voided = data.voided * rng.uniform(0.8, 1.2, SHAPE[2])[None, None, :].astype(np.float32)
    inpainter = DiffusionInpainter(
        Config.from_dict({"infer": {"weights": str(write_weights(tmp_path / "c1.safetensors", context_slices=1)), "device": "cpu", "steps": 2}})
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


def test_padding_small_grid_and_crop_models(tmp_path, case_data):
    # A 40x44 grid with a 48-pixel model: slices are zero-padded past the grid and cut back.
    w48 = write_weights(tmp_path / "w48.safetensors", slice_size=48, prior="harmonic", context_slices=1)
    small = dataclasses.replace(
        case_data, voided=case_data.voided[4:44, 2:46].copy(), mask=case_data.mask[4:44, 2:46].copy()
    )
    inpainter = make(w48)
    box = inpainter.slice_box(small)
    assert (box[0].stop - box[0].start, box[1].stop - box[1].start) == (48, 48)
    pred = inpainter(small, seed=0)
    assert pred.volume.shape == small.voided.shape
    np.testing.assert_array_equal(pred.volume[~small.mask], small.voided[~small.mask])

    wcrop = write_weights(tmp_path / "wcrop.safetensors", crop_size=16)
    crop = make(wcrop, crop_margin=2)
    sx, sy = crop.slice_box(case_data)
    assert sx.stop - sx.start >= 16 and (sx.stop - sx.start) % 2 == 0
    assert case_data.mask[sx, sy].sum() == case_data.mask.sum()  # the whole mask is in the crop
    pred = crop(case_data, seed=0)
    np.testing.assert_array_equal(pred.volume[~case_data.mask], case_data.voided[~case_data.mask])


def test_smoothing_only_in_mask_and_exact():
    rng = np.random.default_rng(0)
    vol = rng.random((30, 30, 20)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[10:14, 12:15, 0:4] = True  # touches the volume edge in z
    out = smooth_in_mask(vol, mask, sigma=1.075)
    np.testing.assert_array_equal(out[~mask], vol[~mask])
    full = ndimage.gaussian_filter(vol, 1.075)
    np.testing.assert_allclose(out[mask], full[mask], rtol=0, atol=1e-6)
    assert smooth_in_mask(vol, mask, sigma=0, border=2) is vol


def test_smoothing_border_is_how_much_known_tissue_the_filter_reads():
    # Known tissue at 100 around a fill at 0: what the filter reads of the tissue shows directly.
    vol = np.full((24, 24, 24), 100.0, np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[8:16, 8:16, 8:16] = True
    vol[mask] = 0.0
    alone = smooth_in_mask(vol, mask, sigma=1.075, border=0)
    np.testing.assert_array_equal(alone[mask], 0.0)  # the fill smoothed with itself alone
    fills = {b: smooth_in_mask(vol, mask, sigma=1.075, border=b) for b in (1, 2, 5, 12, None)}
    edge = fills[None][mask].max()
    assert edge > 10  # all of the tissue: the seam is blended
    for b in (1, 2, 5):
        np.testing.assert_array_equal(fills[b][~mask], vol[~mask])  # known voxels never change
    assert 0 < fills[1][mask].max() < fills[2][mask].max() < fills[5][mask].max() <= edge
    np.testing.assert_allclose(fills[12][mask], fills[None][mask], rtol=0, atol=1e-3)


@pytest.mark.slow
def test_smoothing_border_changes_the_fill_of_a_case(weights, case_data):
    fills = {b: make(weights, smoothing_sigma=1.075, smoothing_border=b)(case_data, seed=4).volume for b in (0, 1, 2, 5)}
    mask = case_data.mask
    for a, b in ((0, 1), (1, 2), (2, 5)):
        assert not np.array_equal(fills[a][mask], fills[b][mask]), (a, b)
        np.testing.assert_array_equal(fills[a][~mask], fills[b][~mask])


def test_setup_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BRAINPAINT_WEIGHTS", raising=False)
    with pytest.raises(InferenceSetupError, match="weights file not found") as err:
        resolve_weights(str(tmp_path / "absent.safetensors"))
    assert "\n" not in str(err.value)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_weights(str(tmp_path)) == tmp_path / "model.safetensors"
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(InferenceSetupError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ConfigError, match="unknown infer.sampler 'euler'"):  # checked when the parameters load
        DiffusionInpainter(Config.from_dict({"infer": {"sampler": "euler"}}))
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(InferenceSetupError, match="cannot load weights"):
        DiffusionInpainter(Config.from_dict({"infer": {"weights": str(garbage), "device": "cpu"}}))


@pytest.mark.slow
def test_cli_end_to_end_with_report(tmp_path, weights):
    from brainpaint.cli import app

    data = tmp_path / "data"
    ids = ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    for k, cid in enumerate(ids):
        synth.write_case(data, cid, seed=k, labels=False, radius=3 + k, centre=(24, 24, 10))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"infer": {"steps": 2, "ensemble": 2}}))
    out, reports = tmp_path / "pred", tmp_path / "reports"
    result = CliRunner().invoke(
        app,
        ["infer", "--data-path", str(data), "--output-path", str(out), "--parameters-file", str(params),
         "--weights", str(weights), "--device", "cpu", "--report-path", str(reports)],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"{cid}-t1n-inference.nii.gz" for cid in ids]
    for cid in ids:
        src = nib.load(str(data / cid / f"{cid}-t1n-voided.nii.gz"))
        mask = np.asanyarray(nib.load(str(data / cid / f"{cid}-mask.nii.gz")).dataobj).astype(bool)
        pred = nib.load(str(out / f"{cid}-t1n-inference.nii.gz"))
        assert pred.shape == src.shape and pred.get_data_dtype() == src.get_data_dtype()
        np.testing.assert_array_equal(pred.affine, src.affine)
        np.testing.assert_array_equal(np.asanyarray(pred.dataobj)[~mask], np.asanyarray(src.dataobj)[~mask])
        assert (reports / f"{cid}-qa.png").is_file()
        assert (reports / f"{cid}-std.nii.gz").is_file()


@pytest.mark.slow
def test_cli_temperature_and_sampler_options(tmp_path, weights):
    from brainpaint.cli import app

    data = tmp_path / "data"
    synth.write_case(data, CASE, seed=1, labels=False, radius=4, centre=(24, 22, 9))

    def run(out, *extra):
        return CliRunner().invoke(
            app, ["infer", "--data-path", str(data), "--output-path", str(tmp_path / out), "--weights", str(weights),
                  "--device", "cpu", "--steps", "3", *extra],
        )

    name = f"{CASE}-t1n-inference.nii.gz"
    for out, seed in (("a", "1"), ("b", "2")):
        result = run(out, "--sampler", "dpm2m", "--temperature", "0", "--seed", seed)
        assert result.exit_code == 0, result.output
    a = np.asanyarray(nib.load(str(tmp_path / "a" / name)).dataobj)
    b = np.asanyarray(nib.load(str(tmp_path / "b" / name)).dataobj)
    np.testing.assert_array_equal(a, b)  # temperature 0: the seed plays no part

    bad = run("c", "--temperature", "-1")
    assert bad.exit_code != 0
    assert "infer.temperature must be >= 0, got -1.0" in bad.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_parameters_overridden_by_the_weights_are_named_in_one_warning(tmp_path, capsys):
    weights = write_weights(tmp_path / "h.safetensors", prior="harmonic", context_slices=1)
    params = {"model": {"preset": "tiny", "context_slices": 0}, "data": {"prior": "harmonic", "flip_prob": 0.1},
              "infer": {"weights": str(weights), "device": "cpu", "steps": 4}}
    capsys.readouterr()
    inpainter = DiffusionInpainter(Config.from_dict(params))
    assert inpainter.data_cfg.prior == "harmonic" and inpainter.layout.context_slices == 1  # the weights' own settings
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "model.context_slices=1" in warnings[0] and "data.flip_prob" in warnings[0]
    assert "model.preset" not in warnings[0] and "data.prior" not in warnings[0]  # same values: not overridden
    DiffusionInpainter(Config.from_dict({"infer": params["infer"]}))  # nothing set: nothing to say
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.slow
def test_weights_with_the_atlas_channel_fill_from_the_atlas_they_carry(tmp_path, case_data):
    brain = synth.make_brain(seed=3)
    atlas = build_atlas([brain])
    dark = atlas.copy()
    dark[40:80, 50:95, 40:80] *= 0.3  # the population says: darker where the mask lies
    run = lambda w: make(w, temperature=0.0, steps=1)(case_data, seed=0).volume  # noqa: E731
    kw = dict(crop_size=16, prior="harmonic", prediction="x0", seed=4)
    plain, bright, darker = (run(write_weights(tmp_path / f"{name}.safetensors", atlas=a, **kw))
                             for name, a in (("plain", None), ("bright", atlas), ("dark", dark)))
    mask = case_data.mask
    for volume in (plain, bright, darker):
        np.testing.assert_array_equal(volume[~mask], case_data.voided[~mask])
    inpainter = make(tmp_path / "dark.safetensors")
    np.testing.assert_array_equal(inpainter.atlas, dark)
    assert make(tmp_path / "plain.safetensors").atlas is None
    # the network reads the carried atlas through its residual channel
    assert np.abs(darker[mask] - bright[mask]).max() > 1.0


def test_a_case_fills_the_same_whichever_way_round_it_is_stored(tmp_path, case_data):
    """The network works in RAS axes: the LPS-stored case and the same brain stored RAS give
    the same fill voxel for voxel (turned back to each file's own array order), and the
    network sees the RAS-turned slices."""
    w = write_weights(tmp_path / "w.safetensors", crop_size=16, prior="harmonic", prediction="x0", seed=5)
    inpainter = make(w, temperature=0.0, steps=1)
    assert nib.aff2axcodes(case_data.affine) == ("L", "P", "S")
    ras = case_data.in_ras()
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    lps_fill, ras_fill = inpainter(case_data, seed=0).volume, inpainter(ras, seed=0).volume
    np.testing.assert_array_equal(ras_fill, lps_fill[::-1, ::-1, :])
    np.testing.assert_array_equal(lps_fill[~case_data.mask], case_data.voided[~case_data.mask])

    seen = []
    real = inpainter.sample_slices
    inpainter.sample_slices = lambda cond, *a, **k: seen.append(cond) or real(cond, *a, **k)
    inpainter(case_data, seed=0)
    def first(data):  # the conditioning of the first batch of the (window, slice) pairs filled
        vin = inpainter.volume_inputs(data)
        pairs = [(box, z) for box, _, zs in inpainter.plan(data) for z in zs][: len(seen[0])]
        return np.stack([inpainter.layout.build(vin, z, box) for box, z in pairs])

    np.testing.assert_array_equal(seen[0], first(ras))  # the RAS slices, not the stored ones
    assert not np.array_equal(seen[0], first(case_data))


@pytest.mark.slow
def test_flip_average_is_the_mean_of_the_fill_and_the_mirrored_fill(tmp_path, case_data):
    w = write_weights(tmp_path / "w.safetensors", crop_size=16, prior="harmonic", prediction="x0", seed=6)
    plain, both = (make(w, temperature=0.0, steps=1, flip_average=f) for f in (False, True))
    _, _, _, cond = plain.conditioning(case_data.in_ras())
    one = plain.sample_slices(cond, seed=0, member=0)
    mirrored = plain.sample_slices(np.ascontiguousarray(cond[:, :, ::-1]), seed=0, member=0)[:, ::-1]
    np.testing.assert_allclose(both.sample_slices(cond, seed=0, member=0), (one + mirrored) / 2, atol=1e-6)
    assert np.abs(one - mirrored).max() > 1e-3  # an untrained network is not symmetric
    mask = case_data.mask
    filled = both(case_data, seed=0).volume
    np.testing.assert_array_equal(filled[~mask], case_data.voided[~mask])
    assert not np.array_equal(filled[mask], plain(case_data, seed=0).volume[mask])


@pytest.mark.slow
def test_weights_of_the_affine_fit_register_their_atlas_onto_each_case(tmp_path):
    shape = (60, 72, 60)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = ((grid[0] / 0.8) ** 2 + (grid[1] / 0.85) ** 2 + (grid[2] / 0.8) ** 2) < 1.0
    blobs = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal(shape), 4.0)
    brain = ((600.0 + 4000.0 * blobs) * inside).clip(0, None).round()
    mask = synth.make_mask(shape, centre=(30, 36, 30), radius=4).astype(bool)
    folder = tmp_path / "data" / CASE
    folder.mkdir(parents=True)
    synth.save(np.where(mask, 0, brain), folder / f"{CASE}-t1n-voided.nii.gz", dtype=np.int16)
    synth.save(mask, folder / f"{CASE}-mask.nii.gz", dtype=np.uint8)
    case_data = load_case(discover_cases(tmp_path / "data")[0][0])
    ras = case_data.in_ras()
    tilted = ndimage.rotate(to_ras(brain, case_data.affine), 12.0, axes=(0, 1), reshape=False, order=1).clip(0, None)
    atlas = build_atlas([tilted])  # a population turned against this brain: the affine fit turns it back
    kw = dict(crop_size=16, prior="harmonic", prediction="x0", seed=4, atlas=atlas)
    box, affine = (make(write_weights(tmp_path / f"{fit}.safetensors", atlas_fit=fit, **kw), temperature=0.0, steps=1)
                   for fit in ("box", "affine"))
    b = IntensityMap.fit(ras.voided).normalize(ras.voided)
    brain_ras = (ras.voided != 0) | ras.mask
    for inpainter, fit in ((box, "box"), (affine, "affine")):
        np.testing.assert_array_equal(inpainter.volume_inputs(ras).atlas, atlas_residual(atlas, b, ras.mask, brain_ras, fit))
    assert np.abs(affine.volume_inputs(ras).atlas - box.volume_inputs(ras).atlas).max() > 0.01
    filled = affine(case_data, seed=0).volume
    np.testing.assert_array_equal(filled[~case_data.mask], case_data.voided[~case_data.mask])
    assert np.abs(filled - box(case_data, seed=0).volume).max() > 0.1


def test_a_batch_prepares_each_case_ahead_times_its_stages_and_fills_as_one_case_alone(tmp_path, capsys):
    """`run_infer` prepares the next case in a background thread (`DiffusionInpainter.prepare`):
    the predictions are those of each case filled alone, and `--profile` names every stage
    (the affine fit's registration included) and counts the network's windows and passes."""
    from brainpaint.infer.batch import case_seed, run_infer

    atlas = build_atlas([synth.make_brain(seed=3)])
    w = write_weights(tmp_path / "w.safetensors", crop_size=16, prior="harmonic", prediction="x0", seed=7, mirror=True,
                      context_slices=1, atlas=atlas, atlas_fit="affine")
    ids = ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"]
    for k, cid in enumerate(ids):
        synth.write_case(tmp_path / "data", cid, seed=k, labels=False, radius=4 + k)
    inpainter = make(w, temperature=0.0, steps=1)
    assert run_infer(inpainter.cfg, tmp_path / "data", tmp_path / "out", predictor=inpainter, profile=True) == 0
    err = capsys.readouterr().err
    for cid in ids:
        data = load_case(next(c for c in discover_cases(tmp_path / "data")[0] if c.id == cid))
        alone = make(w, temperature=0.0, steps=1)(data, seed=case_seed(0, cid)).volume
        written = np.asanyarray(nib.load(str(tmp_path / "out" / f"{cid}-t1n-inference.nii.gz")).dataobj)
        np.testing.assert_array_equal(written[data.mask], np.rint(alone[data.mask]).astype(written.dtype))
        line = next(x for x in err.splitlines() if x.startswith(f"{cid}: ok ("))
        names = re.findall(r"(?:; |, )([a-z]+) \d+\.\d\d", line)
        assert names == ["load", "intensity", "harmonic", "midline", "registration", "conditioning", "network", "write"], line
        assert re.search(r"network \d+\.\d\d \(\d+ windows, \d+ passes\)", line), line


def test_the_brats_size_benchmark_builds_its_cases_and_skips_loudly_without_the_scans(tmp_path, capsys):
    bench = synth.load_benchmark("bench_infer")
    assert bench.main(["--brats-size", "--brats18", str(tmp_path / "absent")]) == 0
    assert "SKIPPED" in capsys.readouterr().err
    # a glioma brain in the layout of ../shared/data/brats18-t1: its tumour and a healthy mask voided
    subject = tmp_path / "brats18" / "Brats18_X_1"
    subject.mkdir(parents=True)
    brain = synth.make_brain((48, 48, 40), seed=2)
    tumour = synth.make_mask((48, 48, 40), centre=(16, 24, 20), radius=5).astype(bool)
    synth.save(brain.round(), subject / "Brats18_X_1_t1.nii.gz", dtype=np.int16)
    synth.save(tumour, subject / "Brats18_X_1_seg.nii.gz", dtype=np.uint8)
    folder = bench.build_brats_size_case(tmp_path / "brats18", "Brats18_X_1", tmp_path / "val", total_cm3=3.0,
                                         min_healthy_cm3=0.5)
    data = load_case(discover_cases(tmp_path / "val", labels=True)[0][0], labels=True)
    assert folder.name == data.id == "BraTS-SIZE-Brats18-X-1"
    grown = ndimage.binary_dilation(tumour, iterations=2) & (brain > 0)  # the files' own array order
    assert data.mask.sum() >= 3000 and data.mask_healthy.sum() >= 500
    np.testing.assert_array_equal(data.mask & ~data.mask_healthy, grown)  # the tumour, voided too, not scored
    assert not (data.mask_healthy & ndimage.binary_dilation(grown, iterations=2)).any()  # clear of it
    np.testing.assert_array_equal(data.voided[data.mask], 0)
