"""Training slices and the per-volume inputs shared with inference (tiny synthetic volumes)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import synth
from brainpaint.data import slices as ds_mod
from brainpaint.data import masks
from brainpaint.data.atlas_build import atlas_from_cases, build_atlas
from brainpaint.conditioning.atlas import atlas_residual
from brainpaint.io.brats import to_ras
from brainpaint.config.settings import Config
from brainpaint.data.slices import draw_sample, SliceDataset
from brainpaint.data.stream import TrainStream
from brainpaint.conditioning.inputs import VolumeInputs, volume_inputs
from brainpaint.conditioning.layout import InputLayout
from brainpaint.conditioning.target import decode_sample, encode_target
from brainpaint.errors import ConfigError
from brainpaint.conditioning.harmonic import harmonic_fill
from brainpaint.conditioning.intensity import IntensityMap

torch.set_num_threads(1)


def _cfg(**data) -> Config:
    base = {"slice_size": 48, "flip_prob": 0.0}
    base.update(data)
    return Config.from_dict({"model": {"preset": "tiny"}, "data": base})


def _volume(seed=0):
    brain = synth.make_brain(seed=seed)
    mask = synth.make_mask(radius=4).astype(bool)
    return brain, mask, np.where(mask, 0, brain).astype(np.float32)


# --------------------------------------------------------------------------- shared functions
def test_volume_inputs_prior_none_voids_the_mask_and_uses_the_metric_scale():
    _, mask, voided = _volume()
    vin = volume_inputs(voided, mask, _cfg().data)
    assert vin.imap == IntensityMap.fit(voided)
    assert vin.b.dtype == np.float32 and vin.mask.dtype == np.float32
    assert np.all(vin.b[mask] == 0)
    np.testing.assert_array_equal(vin.b[~mask], vin.imap.normalize(voided)[~mask])
    np.testing.assert_array_equal(vin.mask, mask.astype(np.float32))


def test_volume_inputs_harmonic_prior_holds_the_normalised_fill():
    _, mask, voided = _volume()
    vin = volume_inputs(voided, mask, _cfg(prior="harmonic").data)
    expected = vin.imap.normalize(harmonic_fill(voided, mask))
    np.testing.assert_allclose(vin.b, expected, atol=1e-6)
    assert vin.b[mask].min() > 0.1  # tissue intensities inside, not the zeros of the voided image


def test_the_atlas_gain_adds_that_share_of_the_atlas_residual_to_the_harmonic_fill():
    brain, mask, voided = _volume()
    atlas = build_atlas([synth.make_brain(seed=5)])
    cfg = lambda gain: Config.from_dict({"model": {"preset": "tiny", "atlas": True},  # noqa: E731
                                         "data": {"prior": "harmonic", "atlas_gain": gain}})
    plain, guided = (volume_inputs(voided, mask, cfg(g).data, atlas=atlas) for g in (0.0, 0.5))
    np.testing.assert_array_equal(guided.atlas, plain.atlas)
    assert np.abs(plain.atlas[mask]).max() > 0.05
    np.testing.assert_allclose(guided.b, np.clip(plain.b + 0.5 * plain.atlas, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(guided.b[~mask], plain.b[~mask])
    with pytest.raises(ConfigError, match="data.atlas_gain needs model.atlas: true and data.prior: harmonic"):
        Config.from_dict({"data": {"prior": "harmonic", "atlas_gain": 0.5}})


def test_unknown_prior_is_rejected():
    _, mask, voided = _volume()
    with pytest.raises(ValueError, match="unknown data.prior 'laplace'"):
        volume_inputs(voided, mask, _cfg(prior="laplace").data)


@pytest.mark.parametrize("prior", ["none", "harmonic"])
def test_encode_decode_round_trip_numpy_and_torch(prior):
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 1, (8, 8)).astype(np.float32)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    b = np.where(mask, rng.uniform(0, 1, (8, 8)), gt).astype(np.float32) if prior == "harmonic" else gt * ~mask
    x0 = encode_target(gt, b, prior)
    np.testing.assert_allclose(decode_sample(x0, b, prior), gt, atol=1e-6)
    back = decode_sample(torch.from_numpy(x0), torch.from_numpy(b), prior)
    np.testing.assert_allclose(back.numpy(), gt, atol=1e-6)
    if prior == "none":
        np.testing.assert_allclose(x0, 2 * gt - 1)
    else:
        assert np.all(x0[~mask] == 0)  # residual over the fill: nothing to learn outside the mask
        np.testing.assert_allclose(x0[mask], 2 * (gt - b)[mask], atol=1e-6)


def test_decode_clips_to_unit_range():
    b = np.full((2, 2), 0.9, np.float32)
    assert decode_sample(np.full((2, 2), 2.0), b, "none").max() == 1.0
    assert decode_sample(np.full((2, 2), 1.0), b, "harmonic").max() == 1.0
    assert decode_sample(np.full((2, 2), -4.0), b, "harmonic").min() == 0.0


def test_slice_conditioning_channels_neighbours_and_box():
    shape = (6, 5, 4)
    b = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    m = (b % 3 == 0).astype(np.float32)
    vin = VolumeInputs(imap=IntensityMap(0, 1), b=b, mask=m)
    box = (slice(1, 5), slice(0, 5))
    plain = InputLayout().build(vin, 2, box)
    assert plain.shape == (2, 4, 5) and plain.dtype == np.float32
    np.testing.assert_array_equal(plain[0], b[1:5, :, 2])
    np.testing.assert_array_equal(plain[1], m[1:5, :, 2])

    ctx = InputLayout(context_slices=2).build(vin, 0, box)
    assert ctx.shape == (10, 4, 5)
    # order: z, z-1, z+1, z-2, z+2 (b then m); z-1 and z-2 are outside the volume -> zeros
    np.testing.assert_array_equal(ctx[0], b[1:5, :, 0])
    assert not ctx[2].any() and not ctx[3].any()
    np.testing.assert_array_equal(ctx[4], b[1:5, :, 1])
    np.testing.assert_array_equal(ctx[5], m[1:5, :, 1])
    assert not ctx[6].any() and not ctx[7].any()
    np.testing.assert_array_equal(ctx[8], b[1:5, :, 2])



# --------------------------------------------------------------------------- the data set
def _ras(volume: np.ndarray) -> np.ndarray:
    """A synthetic (LPS-stored, as BraTS stores) volume in the data set's RAS axes."""
    return to_ras(volume, synth.default_affine())


@pytest.fixture
def cases(tmp_path):
    root = tmp_path / "data"
    synth.write_case(root, "case-a", seed=1, radius=4)
    synth.write_case(root, "case-b", seed=2, radius=3, centre=(20, 26, 8))
    return root


def test_pairs_are_exactly_the_slices_with_mask(cases):
    ds = SliceDataset(cases, _cfg())
    assert [c.id for c in ds.cases] == ["case-a", "case-b"] and not ds.errors
    for u, unit in enumerate(ds.units):
        mask = synth.make_mask(radius=[4, 3][u], centre=[None, (20, 26, 8)][u]).astype(bool)
        assert list(unit.z_slices) == list(np.flatnonzero(mask.any(axis=(0, 1))))
    assert len(ds) == sum(len(u.z_slices) for u in ds.units)


@pytest.mark.parametrize("prior", ["none", "harmonic"])
def test_sample_matches_the_ground_truth_and_keeps_the_tumour_visible(cases, prior):
    ds = SliceDataset(cases, _cfg(prior=prior), augment=False)
    unit, z = ds.pairs[len(ds.units[0].z_slices) // 2]
    sample = ds[ds.pairs.index((unit, z))]
    x0, cond = sample["x0"].numpy(), sample["cond"].numpy()
    assert x0.shape == (1, 48, 48) and cond.shape == (2, 48, 48)

    t1n = _ras(synth.make_brain(seed=1).round())  # the data set works in RAS axes
    mask = _ras(synth.make_mask(radius=4).astype(bool))
    imap = IntensityMap.fit(np.where(mask, 0, t1n))  # b = t1n with mask-healthy voided
    gt = imap.normalize(t1n)[:, :, z]
    np.testing.assert_allclose(decode_sample(x0[0], cond[0], prior), gt, atol=1e-5)
    np.testing.assert_array_equal(cond[1], mask[:, :, z])
    np.testing.assert_allclose(cond[0][~mask[:, :, z]], gt[~mask[:, :, z]], atol=1e-6)
    if prior == "none":
        assert np.all(cond[0][mask[:, :, z]] == 0)


def test_flip_mirrors_target_and_conditioning_together(cases):
    plain = SliceDataset(cases, _cfg(flip_prob=0.0)).sample((0, 10), random.Random(0))
    flipped = SliceDataset(cases, _cfg(flip_prob=1.0)).sample((0, 10), random.Random(0))
    for key in ("x0", "cond"):
        np.testing.assert_array_equal(flipped[key].numpy(), plain[key].numpy()[:, ::-1])
    assert not np.array_equal(flipped["x0"].numpy(), plain["x0"].numpy())


def test_crops_have_the_crop_size_and_contain_the_mask_centre(cases):
    ds = SliceDataset(cases, _cfg(crop_size=16, flip_prob=0.0))
    rng = random.Random(1)
    for pair in ds.pairs:
        entry = ds.prepared(pair[0])
        mask2d = entry.vin.mask[:, :, pair[1] - entry.z0] > 0
        coords = np.argwhere(mask2d)
        centre = (coords.min(0) + coords.max(0)) // 2
        for _ in range(5):
            box = ds.crop_box(mask2d, draw_sample(rng, ds.cfg.data, augment=True).jitter)
            assert [s.stop - s.start for s in box] == [16, 16]
            assert all(s.start <= c < s.stop for s, c in zip(box, centre))
        sample = ds.sample(pair, rng)
        assert sample["x0"].shape == (1, 16, 16) and sample["cond"][1].sum() > 0


def test_cache_decodes_each_volume_once(cases):
    ds = SliceDataset(cases, _cfg(cache_volumes=2))
    for i in range(len(ds)):
        ds[i]
    for i in reversed(range(len(ds))):
        ds[i]
    assert ds.decode_count == 2


def test_stream_visits_volumes_group_by_group_with_a_small_cache(cases):
    ds = SliceDataset(cases, _cfg(cache_volumes=1))
    stream = iter(TrainStream(ds, seed=3))
    for _ in range(2 * len(ds)):  # two epochs
        next(stream)
    # at most once per volume and epoch despite a 1-volume cache (3 when an epoch starts with
    # the volume the previous one ended with); pair-by-pair shuffling would decode ~every sample
    assert 3 <= ds.decode_count <= 4


def test_stream_shards_cases_disjointly(tmp_path):
    for i in range(5):
        synth.write_case(tmp_path, f"c{i}", seed=i, radius=3)
    ds = SliceDataset(tmp_path, _cfg())
    stream = TrainStream(ds, seed=0, rank=0, world_size=2)
    seen = []
    for shard in range(2):
        pairs = [p for g in stream.shard_pairs(epoch=0, shard=shard, n_shards=2) for p in g]
        seen.append({ds.units[u].case_index for u, _ in pairs})
        assert sorted(pairs) == sorted(set(pairs))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5))
    # every epoch reshuffles, but a shard keeps its cases (so its cache stays valid)
    orders = [stream.shard_pairs(e, 0, 2) for e in range(4)]
    assert len({str(o) for o in orders}) > 1
    for groups in orders:
        assert {ds.units[u].case_index for g in groups for u, _ in g} == seen[0]


def test_stream_with_a_cache_for_all_its_cases_decodes_them_once_per_run(cases):
    ds = SliceDataset(cases, _cfg(cache_volumes=2))
    stream = iter(TrainStream(ds, seed=3))
    for _ in range(3 * len(ds)):  # three epochs
        next(stream)
    assert ds.decode_count == 2


def test_stream_with_fewer_cases_than_shards_deals_out_pairs(cases):
    ds = SliceDataset(cases, _cfg())
    stream = TrainStream(ds)
    shards = [set(stream.shard_pairs(0, s, 4)[0]) for s in range(4)]
    assert set().union(*shards) == set(ds.pairs)
    assert sum(len(s) for s in shards) == len(ds.pairs)


def test_loader_with_two_workers_yields_batches(cases):
    from torch.utils.data import DataLoader

    ds = SliceDataset(cases, _cfg(crop_size=16, flip_prob=0.5))
    loader = DataLoader(TrainStream(ds, seed=0), batch_size=4, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    for batch in batches:
        assert batch["x0"].shape == (4, 1, 16, 16) and batch["cond"].shape == (4, 2, 16, 16)
        assert torch.all(batch["cond"][:, 1].flatten(1).sum(1) > 0)  # every crop holds mask voxels
    del it


def test_bad_case_is_reported_in_one_line_and_skipped(cases):
    (cases / "case-a" / "case-a-mask-healthy.nii.gz").write_bytes(b"not a nifti")
    ds = SliceDataset(cases, _cfg())
    assert [c.id for c in ds.cases] == ["case-b"]
    assert len(ds.errors) == 1
    message = str(ds.errors[0])
    assert message.startswith("case-a: cannot read case-a-mask-healthy.nii.gz") and "\n" not in message
    assert all(ds.case_of(p) == "case-b" for p in ds.pairs)


def test_context_slices_add_neighbour_channels(cases):
    cfg = Config.from_dict({"model": {"preset": "tiny", "context_slices": 1}, "data": {"slice_size": 48, "flip_prob": 0}})
    ds = SliceDataset(cases, cfg)
    sample = ds[0]
    assert sample["cond"].shape == (6, 48, 48)
    unit, z = ds.pairs[0]  # first mask slice: the slice below holds no mask, the one above does
    entry = ds.prepared(unit)
    np.testing.assert_array_equal(sample["cond"][2].numpy(), entry.vin.b[:, :, z - 1 - entry.z0])


def test_extra_generated_masks_add_pairs_with_the_real_generator(tmp_path):
    # 4 mm voxels: the generator's 5-200 cm³ are 78-3125 voxels, room enough in a 48x48x20 brain.
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    for i, case_id in enumerate(("case-a", "case-b")):
        synth.write_case(tmp_path, case_id, seed=i + 1, radius=3, affine=affine)
    ds = SliceDataset(tmp_path, _cfg(extra_masks_per_volume=2), seed=3)
    assert [(u.case_index, u.k) for u in ds.units] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    healthy = synth.make_mask(radius=3).astype(bool)
    brain = synth.make_brain(seed=1).round() != 0
    again = masks.generate_masks(
        brain | healthy, 2, seed=ds_mod._stable_seed(3, "case-a"), avoid=healthy, voxel_volume_mm3=64.0
    )
    for k, expected in enumerate(again, start=1):
        assert expected.any() and not (expected & healthy).any() and (expected & brain).sum() == expected.sum()
        assert list(ds.units[k].z_slices) == list(np.flatnonzero(expected.any(axis=(0, 1))))
        z = ds.units[k].z_slices[len(ds.units[k].z_slices) // 2]
        sample = ds.sample((k, z), random.Random(0), augment=False)
        np.testing.assert_array_equal(sample["cond"][1].numpy(), expected[:, :, z])
        assert np.all(sample["cond"][0].numpy()[expected[:, :, z]] == 0)
    assert not np.array_equal(again[0], again[1])


def test_a_brain_without_room_for_extra_masks_keeps_its_healthy_mask(cases):
    messages = []
    ds = SliceDataset(cases, _cfg(extra_masks_per_volume=1), log=messages.append)  # 1 mm: 5 cm³ do not fit
    assert [(u.case_index, u.k) for u in ds.units] == [(0, 0), (1, 0)]
    assert len(messages) == 2 and all("no extra masks" in m for m in messages)


def test_the_atlas_residual_is_the_last_channel_and_no_scan_augmentation_touches_it(cases, tmp_path):
    cfg = Config.from_dict({"model": {"preset": "tiny", "atlas": True},
                            "data": {"slice_size": 48, "flip_prob": 0, "prior": "harmonic", "gamma_aug": 0.3,
                                     "bias_aug": 0.2, "cache_dir": str(tmp_path / "cache")}})
    ds = SliceDataset(cases, cfg, augment=False)
    with pytest.raises(RuntimeError, match="no atlas"):
        ds[0]
    ds.atlas = atlas_from_cases(ds.cases)
    unit, z = ds.pairs[len(ds.units[0].z_slices) // 2]
    plain = ds.sample((unit, z), random.Random(3))["cond"].numpy()
    assert plain.shape == (3, 48, 48) == (ds.channels, 48, 48)

    # the residual of the atlas over its harmonic fill, inside the mask only
    t1n = synth.make_brain(seed=1).round()
    mask = _ras(synth.make_mask(radius=4).astype(bool))
    voided = np.where(mask, 0, _ras(t1n)).astype(np.float32)
    expected = atlas_residual(ds.atlas, IntensityMap.fit(voided).normalize(voided), mask, (voided != 0) | mask)
    np.testing.assert_allclose(plain[2], expected[:, :, z], atol=1e-6)
    assert np.abs(plain[2][mask[:, :, z]]).max() > 0 and not plain[2][~mask[:, :, z]].any()

    # the gamma and bias field of another scanner change the scan's channels, not the population's
    augmented = SliceDataset(cases, cfg, augment=True)
    augmented.atlas = ds.atlas
    cond = augmented.sample((unit, z), random.Random(3))["cond"].numpy()
    assert not np.allclose(cond[0], plain[0]) and np.array_equal(cond[2], plain[2])

    # the cached residual (data.cache_dir) is the one computed
    cached = SliceDataset(cases, cfg, augment=False)
    cached.atlas = ds.atlas
    np.testing.assert_array_equal(cached.sample((unit, z), random.Random(3))["cond"].numpy(), plain)
    (entry,) = (tmp_path / "cache").glob("case-a-000-*-atlas*.npz")
    with np.load(entry) as stored:
        np.testing.assert_allclose(stored["atlas"], expected[mask], atol=1e-6)
