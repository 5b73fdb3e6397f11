"""Batch inference: output contract, per-case fault tolerance, shards, output-folder checks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import synth
from brainpaint.infer.batch import Prediction, case_seed, compose_output, parse_shard, run_infer, BatchSetupError
from brainpaint.errors import CaseError
from brainpaint.io.brats import discover_cases, load_case, prediction_name
from brainpaint.config.settings import Config

HARMONIC = Config().override({"infer.method": "harmonic"})


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _read(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def _check_output(data_root, out, cid):
    voided, vimg = _read(data_root / cid / f"{cid}-t1n-voided.nii.gz")
    mask = np.asanyarray(nib.load(str(data_root / cid / f"{cid}-mask.nii.gz")).dataobj).astype(bool)
    pred, pimg = _read(out / prediction_name(cid))
    assert pred.shape == voided.shape
    assert pimg.get_data_dtype() == vimg.get_data_dtype() and pred.dtype == voided.dtype
    np.testing.assert_allclose(pimg.affine, vimg.affine, atol=1e-4)
    assert nib.aff2axcodes(pimg.affine) == nib.aff2axcodes(vimg.affine)
    assert pred[~mask].tobytes() == voided[~mask].tobytes()  # bit-identical outside the mask
    assert np.all(pred[mask] > 0)
    return pred, mask


def test_harmonic_batch_with_one_bad_case(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    synth.write_case(data, "case-a", seed=1, labels=False)
    synth.write_case(data, "case-b", seed=2, labels=True, dtype=np.float32)
    bad = synth.write_case(data, "case-c", seed=3, labels=False)
    synth.save(synth.make_mask() * 3, bad / "case-c-mask.nii.gz", dtype=np.uint8)

    code = run_infer(HARMONIC, data, out)

    assert code == 1
    assert _names(out) == [prediction_name("case-a"), prediction_name("case-b")]
    for cid in ("case-a", "case-b"):
        _check_output(data, out, cid)
    err = capsys.readouterr().err
    assert "error: case-c: case-c-mask.nii.gz is not binary (values other than 0/1: 3)" in err
    assert err.rstrip().splitlines()[-1] == "3 cases: 2 ok, 1 failed, 0 skipped"
    assert any(line.split()[:2] == ["case-c", "failed"] for line in err.splitlines())


def test_harmonic_values_inside_the_mask_are_the_fill(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    synth.write_case(data, "x", labels=False, dtype=np.float32)
    assert run_infer(HARMONIC, data, out) == 0
    pred, mask = _check_output(data, out, "x")
    from brainpaint.conditioning.harmonic import harmonic_fill

    voided = synth.make_brain() * (1 - synth.make_mask())
    np.testing.assert_array_equal(pred[mask], harmonic_fill(voided, mask)[mask])


@pytest.mark.parametrize("dtype", [np.float64, np.uint8])
def test_on_disk_dtype_is_kept(tmp_path, dtype):
    data, out = tmp_path / "data", tmp_path / "out"
    folder = synth.write_case(data, "x", labels=False, dtype=dtype)
    if dtype == np.uint8:  # a brain that fits in uint8
        vol = np.round(synth.make_brain() / 5) * (1 - synth.make_mask())
        synth.save(vol, folder / "x-t1n-voided.nii.gz", dtype=np.uint8)
    assert run_infer(HARMONIC, data, out) == 0
    _check_output(data, out, "x")


def test_prediction_is_rounded_and_clipped_to_the_dtype(tmp_path):
    synth.write_case(tmp_path, "x", labels=False, dtype=np.int16)
    data = load_case(discover_cases(tmp_path)[0][0])
    volume = np.full(data.mask.shape, 1e9, np.float32)
    volume[data.mask.nonzero()[0][0], data.mask.nonzero()[1][0], data.mask.nonzero()[2][0]] = 12.6
    output = compose_output(data, Prediction(volume))
    assert output.dtype == np.int16
    inside = output[data.mask]
    assert inside[0] == 13 and np.all(inside[1:] == 32767)
    np.testing.assert_array_equal(output[~data.mask], data.voided_disk[~data.mask])


def test_bad_prediction_is_a_case_error(tmp_path):
    synth.write_case(tmp_path, "x", labels=False)
    data = load_case(discover_cases(tmp_path)[0][0])
    with pytest.raises(CaseError, match="x: predictor returned NaN/Inf inside the mask"):
        compose_output(data, Prediction(np.full(data.mask.shape, np.nan, np.float32)))
    with pytest.raises(CaseError, match="predictor returned shape"):
        compose_output(data, Prediction(np.zeros((2, 2, 2), np.float32)))


def test_a_crashing_predictor_does_not_stop_other_cases(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    for cid in ("a", "b", "c"):
        synth.write_case(data, cid, labels=False)
    seeds = {}

    def predictor(case_data, seed):
        seeds[case_data.id] = seed
        if case_data.id == "b":
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return Prediction(case_data.voided + 1.0, slices=3)

    assert run_infer(HARMONIC, data, out, predictor=predictor) == 3  # not the input's fault: an internal error
    assert _names(out) == [prediction_name("a"), prediction_name("c")]
    err = capsys.readouterr().err
    assert ("error: b: internal error, not a problem of the input: RuntimeError: CUDA out of memory. "
            "Tried to allocate 2 GiB [2/3]") in err
    assert "Traceback (most recent call last):" in err and err.rstrip().endswith("3 cases: 2 ok, 0 failed, 1 internal error, 0 skipped")
    assert seeds == {cid: case_seed(0, cid) for cid in ("a", "b", "c")}


def _fails_on_the_second_call(monkeypatch, target: str, error: Exception):
    """Patch `module.function` to raise `error` on its second call (the second case of a run)."""
    module_name, name = target.rsplit(".", 1)
    module = __import__(module_name, fromlist=[name])
    real, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


@pytest.mark.parametrize(
    "method, target, error",
    [
        ("harmonic", "brainpaint.infer.prediction.harmonic_fill", ZeroDivisionError("float division by zero")),
        ("diffusion", "brainpaint.infer.inpainter.volume_inputs", AttributeError("'NoneType' object has no attribute 'b'")),
    ],
)
def test_a_bug_deep_in_a_case_is_an_internal_error_with_its_traceback(tmp_path, capsys, monkeypatch, method, target, error):
    data, out = tmp_path / "data", tmp_path / "out"
    for cid in ("a", "b", "c"):
        synth.write_case(data, cid, labels=False)
    cfg = HARMONIC
    if method == "diffusion":
        weights = synth.tiny_weights(tmp_path / "w.safetensors", prediction="x0")
        cfg = Config().override({"infer.weights": str(weights), "infer.device": "cpu"})
    _fails_on_the_second_call(monkeypatch, target, error)
    assert run_infer(cfg, data, out) == 3
    assert _names(out) == [prediction_name("a"), prediction_name("c")]  # nothing of b, not even a temporary
    err = capsys.readouterr().err
    kind = type(error).__name__
    assert f"\nerror: b: internal error, not a problem of the input: {kind}: {error} [2/3]\nTraceback (most recent call last):" in err
    assert f"\n{kind}: {error}\nc: ok (" in err  # the traceback ends where c begins
    assert re.search(r"^b +internal ", err, re.M) and err.rstrip().endswith("3 cases: 2 ok, 0 failed, 1 internal error, 0 skipped")


def test_an_input_error_and_an_internal_error_in_one_run_exit_with_the_internal_status(tmp_path, capsys):
    data = tmp_path / "data"
    for cid in ("a", "b"):
        synth.write_case(data, cid, labels=False)
    synth.save(synth.make_mask() * 3, data / "a" / "a-mask.nii.gz", dtype=np.uint8)

    def predictor(case_data, seed):
        raise KeyError("slices")

    assert run_infer(HARMONIC, data, tmp_path / "out", predictor=predictor) == 3
    err = capsys.readouterr().err
    assert "error: a: a-mask.nii.gz is not binary" in err and "error: b: internal error" in err
    assert err.rstrip().endswith("2 cases: 0 ok, 1 failed, 1 internal error, 0 skipped")


def test_a_bug_outside_any_case_is_an_internal_error_of_the_command(tmp_path, capsys, monkeypatch):
    from brainpaint import cli
    from brainpaint.infer import batch

    synth.write_case(tmp_path / "data", "a", labels=False)
    monkeypatch.setattr(batch, "make_predictor", lambda cfg: cfg.infer.no_such_setting)
    monkeypatch.setattr(sys, "argv", ["brainpaint", "infer", "--data-path", str(tmp_path / "data"), "--output-path",
                                      str(tmp_path / "out"), "--method", "harmonic"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "AttributeError" in err
    assert err.rstrip().splitlines()[-1] == ("error: internal error (AttributeError), a bug in brainpaint: please report "
                                             "it with the traceback above")


def _odd_inputs(root):
    """Volumes that load but stress the fill: they are filled (with warnings where the fill fell
    back on something) or fail in one line, on every path; never an internal error."""
    brain, mask = synth.make_brain().round(), synth.make_mask()

    def case(cid, voided, m, affine=None):
        folder = root / cid
        folder.mkdir(parents=True)
        synth.save(voided, folder / f"{cid}-t1n-voided.nii.gz", affine, np.int16)
        synth.save(m, folder / f"{cid}-mask.nii.gz", affine, np.uint8)

    for cid, shape, radius in (("tiny-grid", (8, 8, 4), 1), ("narrow-x", (6, 40, 20), 2), ("one-slice", (48, 48, 1), 4)):
        m = synth.make_mask(shape, radius=radius)
        case(cid, synth.make_brain(shape).round() * (1 - m), m)
    case("mask-everywhere", np.zeros_like(brain), np.ones_like(mask))
    case("no-brain", np.zeros_like(brain), mask)
    case("flat-brain", (brain > 0) * 500.0 * (1 - mask), mask)
    corner = synth.make_mask(centre=(0, 0, 0), radius=6)
    case("mask-at-a-corner", brain * (1 - corner), corner)
    case("mask-is-the-brain", np.zeros_like(brain), (brain > 0).astype(np.uint8))
    turned = synth.default_affine()
    turned[:3, :3] = turned[:3, :3] @ np.array([[0.94, -0.34, 0], [0.34, 0.94, 0], [0, 0, 1]])
    case("oblique", brain * (1 - mask), mask, turned)
    return {"mask-everywhere"}  # the cases that fail on their input


@pytest.mark.parametrize("method", ["harmonic", "diffusion"])
def test_odd_inputs_are_filled_or_fail_in_one_line_on_both_paths(tmp_path, capsys, method):
    from brainpaint.data.atlas_build import build_atlas

    bad = _odd_inputs(tmp_path / "data")
    cfg = HARMONIC
    if method == "diffusion":  # weights like the shipped ones: harmonic prior, mirror channels, registered atlas
        weights = synth.tiny_weights(tmp_path / "w.safetensors", crop_size=16, prior="harmonic", prediction="x0",
                                     mirror=True, atlas=build_atlas([synth.make_brain(seed=3)]), atlas_fit="affine")
        cfg = Config().override({"infer.weights": str(weights), "infer.device": "cpu"})
    assert run_infer(cfg, tmp_path / "data", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err, err
    failed = {line.split()[0] for line in err.splitlines() if re.match(r"\S+ +failed ", line)}
    assert failed == bad
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {prediction_name(p.name) for p in (tmp_path / "data").iterdir() if p.name not in bad}


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    synth.write_case(data, "a", labels=False)
    synth.write_case(data, "b", labels=False)
    assert run_infer(HARMONIC, data, out) == 0
    stamp = os.stat(out / prediction_name("a")).st_mtime_ns
    capsys.readouterr()
    calls = []

    def predictor(case_data, seed):
        calls.append(case_data.id)
        return Prediction(case_data.voided + 5.0)

    (out / prediction_name("b")).unlink()
    assert run_infer(HARMONIC, data, out, predictor=predictor) == 0
    assert calls == ["b"] and os.stat(out / prediction_name("a")).st_mtime_ns == stamp
    assert capsys.readouterr().err.rstrip().endswith("2 cases: 1 ok, 0 failed, 1 skipped")
    assert run_infer(HARMONIC, data, out, overwrite=True, predictor=predictor) == 0
    assert calls == ["b", "a", "b"]


def test_stale_temporary_from_a_killed_run_is_removed(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    synth.write_case(data, "a", labels=False)
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".{prediction_name('a')}.tmp-{int(dead.stdout)}.nii.gz"
    stale.write_bytes(b"partial")
    assert run_infer(HARMONIC, data, out) == 0
    assert _names(out) == [prediction_name("a")]


def test_shards_partition_sorted_cases(tmp_path):
    data = tmp_path / "data"
    ids = ["c1", "c2", "c3", "c4", "c5"]
    for cid in reversed(ids):
        synth.write_case(data, cid, labels=False, radius=2)
    seen = {}
    for i in range(2):
        run_infer(HARMONIC, data, tmp_path / f"o{i}", shard=f"{i}/2")
        seen[i] = [n.split("-")[0] for n in _names(tmp_path / f"o{i}")]
    assert seen == {0: ["c1", "c3", "c5"], 1: ["c2", "c4"]}


@pytest.mark.parametrize("bad", ["2/2", "a/b", "1", "-1/2", "0/0", "1/2/3"])
def test_invalid_shard_is_a_one_line_error(tmp_path, capsys, bad):
    synth.write_case(tmp_path / "data", "a", labels=False)
    assert run_infer(HARMONIC, tmp_path / "data", tmp_path / "out", shard=bad) == 2
    err = capsys.readouterr().err
    assert err == f"error: invalid shard '{bad}': expected i/n with 0 <= i < n, e.g. 0/4\n"
    assert not (tmp_path / "out").exists()


def test_parse_shard():
    assert parse_shard(None) is None and parse_shard("1/3") == (1, 3)
    with pytest.raises(BatchSetupError):
        parse_shard("3/3")


def test_output_folder_blocked_by_a_file(tmp_path, capsys):
    synth.write_case(tmp_path / "data", "a", labels=False)
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert run_infer(HARMONIC, tmp_path / "data", tmp_path / "blocker" / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output folder") and "cannot be created" in err
    assert len(err.strip().splitlines()) == 1


def test_output_path_is_a_file(tmp_path, capsys):
    synth.write_case(tmp_path / "data", "a", labels=False)
    (tmp_path / "out").write_text("x")
    assert run_infer(HARMONIC, tmp_path / "data", tmp_path / "out") == 2
    assert "output folder" in capsys.readouterr().err


def test_unwritable_output_folder_detected_by_the_probe(tmp_path, capsys, monkeypatch):
    """A folder that passes os.access but refuses files (read-only mount): the probe catches it."""
    synth.write_case(tmp_path / "data", "a", labels=False)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert run_infer(HARMONIC, tmp_path / "data", tmp_path / "out") == 2
    assert capsys.readouterr().err == f"error: output folder {tmp_path / 'out'} is not writable: Read-only file system\n"


def test_read_only_output_folder(tmp_path, capsys):
    synth.write_case(tmp_path / "data", "a", labels=False)
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        undo = lambda: out.chmod(0o755)  # noqa: E731
    else:
        # root ignores permission bits; an immutable folder refuses new files even to root.
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
            pytest.skip("running as root on a file system without chattr +i: cannot make a folder read-only")
        undo = lambda: subprocess.run(["chattr", "-i", str(out)], check=True)  # noqa: E731
    try:
        assert run_infer(HARMONIC, tmp_path / "data", out) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: output folder {out} is not ") and "writable" in err and err.count("\n") == 1
        assert list(out.iterdir()) == []
    finally:
        undo()


def test_missing_data_folder(tmp_path, capsys):
    assert run_infer(HARMONIC, tmp_path / "nope", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err


def test_case_seed_is_stable_across_processes():
    here = case_seed(7, "BraTS-GLI-00001-000")
    code = "from brainpaint.infer.batch import case_seed; print(case_seed(7, 'BraTS-GLI-00001-000'))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(there.stdout) == here
    assert here != case_seed(8, "BraTS-GLI-00001-000") and here != case_seed(7, "BraTS-GLI-00002-000")
    assert 0 <= here < 2**32


def test_report_dir_gets_std_maps_not_the_output_folder(tmp_path):
    data, out, reports = tmp_path / "data", tmp_path / "out", tmp_path / "reports"
    synth.write_case(data, "a", labels=False)

    def predictor(case_data, seed):
        return Prediction(case_data.voided + 1.0, std=np.full(case_data.voided.shape, 0.25, np.float32))

    assert run_infer(HARMONIC, data, out, report_dir=reports, predictor=predictor) == 0
    assert _names(out) == [prediction_name("a")]
    std, img = _read(reports / "a-std.nii.gz")
    assert std.dtype == np.float32 and np.all(std == 0.25)


def test_cli_infer_harmonic(tmp_path):
    from brainpaint.cli import app

    synth.write_case(tmp_path / "data", "a", labels=False)
    result = CliRunner().invoke(
        app, ["infer", "--data-path", str(tmp_path / "data"), "--output-path", str(tmp_path / "out"), "--method", "harmonic"]
    )
    assert result.exit_code == 0, result.output
    _check_output(tmp_path / "data", tmp_path / "out", "a")


def test_profile_puts_the_stage_times_in_each_case_line_the_table_and_the_report(tmp_path, capsys):
    data, out, reports = tmp_path / "data", tmp_path / "out", tmp_path / "reports"
    for cid in ("a", "b"):
        synth.write_case(data, cid, labels=False)
    assert run_infer(HARMONIC, data, out, report_dir=reports, profile=True) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("a: ok ("))
    assert re.search(r"; load \d+\.\d\d, harmonic \d+\.\d\d, write \d+\.\d\d, report \d+\.\d\d s \[1/2\]$", line), line
    assert re.search(r"^case +load +harmonic +write +report +total +windows +passes$", err, re.M)
    assert re.search(r"^median( +\d+\.\d\d){5}$", err, re.M) and "2 cases inpainted in " in err
    saved = json.loads((reports / "a-stages.json").read_text())
    assert list(saved["seconds"]) == ["load", "harmonic", "write", "report"] and min(saved["seconds"].values()) >= 0
    # without --profile the case line is as before
    assert run_infer(HARMONIC, data, tmp_path / "out2") == 0
    assert re.search(r"^a: ok \(\d+\.\d s, \d+ slices\) \[1/2\]$", capsys.readouterr().err, re.M)


class _Prefetched:
    """A predictor with a `prepare` step that records where and when things happen."""

    def __init__(self, out):
        self.out, self.events = out, []

    def prepare(self, data):
        # what the output folder holds while a case is prepared: finished predictions only
        names = sorted(p.name for p in self.out.iterdir()) if self.out.exists() else []
        assert all(n.endswith("-t1n-inference.nii.gz") and not n.startswith(".") for n in names), names
        for n in names:
            assert nib.load(str(self.out / n)).get_fdata().shape == data.voided.shape  # complete files
        self.events.append(("prepare", data.id, threading.current_thread() is threading.main_thread()))
        return {"id": data.id, "fill": data.voided + 7.0}

    def __call__(self, data, seed, prepared=None):
        assert prepared is not None and prepared["id"] == data.id
        self.events.append(("fill", data.id, threading.current_thread() is threading.main_thread()))
        time.sleep(0.2)  # the network: long enough for the next case to be prepared meanwhile
        return Prediction(prepared["fill"], slices=1)


def test_the_next_case_is_prepared_in_the_background_and_outputs_stay_the_same(tmp_path):
    data = tmp_path / "data"
    for cid in ("a", "b", "c"):
        synth.write_case(data, cid, labels=False)
    synth.save(synth.make_mask() * 3, synth.write_case(data, "bad", labels=False) / "bad-mask.nii.gz", dtype=np.uint8)
    prefetched = _Prefetched(tmp_path / "out")
    assert run_infer(HARMONIC, data, tmp_path / "out", predictor=prefetched) == 1  # the bad case fails alone
    plain = lambda case_data, seed: Prediction(case_data.voided + 7.0, slices=1)  # noqa: E731
    assert run_infer(HARMONIC, data, tmp_path / "plain", predictor=plain) == 1
    assert _names(tmp_path / "out") == _names(tmp_path / "plain") == [prediction_name(c) for c in ("a", "b", "c")]
    for name in _names(tmp_path / "out"):
        assert _read(tmp_path / "out" / name)[0].tobytes() == _read(tmp_path / "plain" / name)[0].tobytes()
    events = prefetched.events
    assert [e for e in events if e[0] == "fill"] == [("fill", c, True) for c in ("a", "b", "c")]
    assert all(not on_main for kind, _, on_main in events if kind == "prepare")  # the background thread
    # b is prepared before a's fill ends, c before b's: one case ahead, never more
    assert events.index(("prepare", "b", False)) < events.index(("fill", "b", True))
    assert events.index(("prepare", "c", False)) > events.index(("fill", "a", True))
