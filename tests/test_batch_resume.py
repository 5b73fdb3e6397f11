"""`brainpaint infer` end to end: a SIGKILLed batch resumes to identical files; shards split cases.

The harmonic method is used because the batch machinery, not the network, is under test.
The CLI runs in a subprocess; a small wrapper can make the process SIGKILL itself right
before the N-th prediction is renamed into place, i.e. at the worst moment: mid-write.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import synth

SUFFIX = "-t1n-inference.nii.gz"

# Runs the CLI; with BP_KILL_AT_REPLACE=N the process kills itself with SIGKILL just before
# the N-th prediction file would be renamed to its final name.
WRAPPER = textwrap.dedent(
    """
    import os, signal, sys
    kill_at = int(os.environ.get("BP_KILL_AT_REPLACE", "0"))
    if kill_at:
        real_replace = os.replace
        seen = [0]
        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("%s"):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    from brainpaint.cli import main
    sys.argv = ["brainpaint"] + sys.argv[1:]
    main()
    """
    % SUFFIX
)


def _ids(n: int) -> list[str]:
    return [f"BraTS-GLI-{i:05d}-000" for i in range(1, n + 1)]


def _make_cases(root: Path, n: int) -> list[str]:
    ids = _ids(n)
    for k, cid in enumerate(ids):
        synth.write_case(root, cid, seed=k, labels=False, radius=4 + k % 3, centre=(22 + k, 24, 10))
    return ids


def _infer(data: Path, out: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", WRAPPER, "infer", "--data-path", str(data), "--output-path", str(out),
           "--method", "harmonic", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def _load(path: Path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img.header.get_data_dtype()


@pytest.mark.slow
def test_sigkill_mid_batch_then_resume_gives_identical_files(tmp_path):
    data = tmp_path / "data"
    ids = _make_cases(data, 4)

    reference = tmp_path / "reference"
    done = _infer(data, reference)
    assert done.returncode == 0, done.stderr
    assert _outputs(reference) == ids

    out = tmp_path / "out"
    killed = _infer(data, out, env_extra={"BP_KILL_AT_REPLACE": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Two cases were finished; the third died mid-write and left no file under its final name.
    assert _outputs(out) == ids[:2]
    finished = {cid: os.stat(out / f"{cid}{SUFFIX}").st_mtime_ns for cid in ids[:2]}

    resumed = _infer(data, out)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == ids
    # Nothing partial survives the resume: the killed write's hidden temporary is gone too.
    assert sorted(p.name for p in out.iterdir()) == [f"{cid}{SUFFIX}" for cid in ids]
    # Finished cases were skipped, not recomputed.
    for cid, mtime in finished.items():
        assert os.stat(out / f"{cid}{SUFFIX}").st_mtime_ns == mtime
    # Every file equals the uninterrupted run's voxel for voxel, with the same geometry and dtype.
    for cid in ids:
        got, ref = _load(out / f"{cid}{SUFFIX}"), _load(reference / f"{cid}{SUFFIX}")
        assert got[2] == ref[2] == np.dtype(np.int16)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[0], ref[0])


def test_known_voxels_shape_and_affine_preserved(tmp_path):
    data = tmp_path / "data"
    (cid,) = _make_cases(data, 1)
    out = tmp_path / "out"
    done = _infer(data, out)
    assert done.returncode == 0, done.stderr
    voided = nib.load(str(data / cid / f"{cid}-t1n-voided.nii.gz"))
    mask = np.asanyarray(nib.load(str(data / cid / f"{cid}-mask.nii.gz")).dataobj).astype(bool)
    pred, affine, dtype = _load(out / f"{cid}{SUFFIX}")
    assert pred.shape == voided.shape and dtype == voided.get_data_dtype()
    np.testing.assert_array_equal(affine, voided.affine)
    np.testing.assert_array_equal(pred[~mask], np.asanyarray(voided.dataobj)[~mask])
    assert pred[mask].min() > 0  # the hole was filled with tissue-like values


def _shard_outputs(data: Path, out: Path, *extra: str, env_extra=None) -> list[str]:
    done = _infer(data, out, *extra, env_extra=env_extra)
    assert done.returncode == 0, done.stderr
    return _outputs(out)


@pytest.mark.slow
def test_shards_cover_every_case_exactly_once(tmp_path):
    data = tmp_path / "data"
    ids = _make_cases(data, 5)
    parts = [_shard_outputs(data, tmp_path / f"shard{i}", "--shard", f"{i}/2") for i in range(2)]
    # Cases sorted by id; case k goes to shard k % n.
    assert parts[0] == ids[0::2]
    assert parts[1] == ids[1::2]
    assert sorted(parts[0] + parts[1]) == ids


def test_torchrun_rank_environment_selects_the_shard(tmp_path):
    data = tmp_path / "data"
    ids = _make_cases(data, 5)
    got = _shard_outputs(data, tmp_path / "rank1", env_extra={"RANK": "1", "WORLD_SIZE": "3"})
    assert got == ids[1::3]


@pytest.mark.parametrize("bad", ["3/2", "x/2", "2"])
def test_bad_shard_spec_is_a_clear_error(tmp_path, bad):
    data = tmp_path / "data"
    _make_cases(data, 1)
    done = _infer(data, tmp_path / "out", "--shard", bad)
    assert done.returncode != 0
    assert "shard" in done.stderr.lower()
    assert not (tmp_path / "out").exists() or _outputs(tmp_path / "out") == []
