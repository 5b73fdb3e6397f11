"""benchmarks/stage_curve.py: scores weights and run exports into one CSV, once each, and draws it."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

import synth
from brainpaint.model.weights import read_metadata


def _bench():
    return synth.load_benchmark("stage_curve")


def _export(weights: Path, path: Path, step: int, cpu_seconds: float) -> Path:
    """`weights` saved as a run's EMA export of `step` after `cpu_seconds`."""
    meta = read_metadata(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(weights)), str(path), metadata=dict(meta, step=str(step), cpu_seconds=str(cpu_seconds)))
    return path


def _rows(docs: Path) -> list[dict]:
    with (docs / "stage_curve.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_the_stage_curve_scores_each_point_once_and_draws_it(tmp_path, capsys):
    bench = _bench()
    for i in range(2):
        synth.write_case(tmp_path / "val", f"BraTS-SYN-0000{i}-000", seed=i, radius=4)
    synth.write_case(tmp_path / "val", "BraTS-SYN-00000-001", seed=5, radius=4)  # not a *-000 case: unused
    weights = synth.tiny_weights(tmp_path / "w.safetensors", prior="harmonic")
    docs = tmp_path / "docs"
    common = ["--val", str(tmp_path / "val"), "--docs", str(docs)]

    assert bench.main(["--weights", str(weights), "--stage", "one", "--step", "5", "--minutes", "3",
                       "--start-minutes", "10", *common]) == 0
    (row,) = _rows(docs)
    assert (row["stage"], row["step"], row["minutes"]) == ("one", "5", "13.0")
    assert 0 < float(row["ssim"]) < 1 and float(row["psnr"]) > 0 and row["source"] == str(weights)

    run = tmp_path / "run"
    _export(weights, run / "exports" / "step_00000002.safetensors", 2, 60.0)
    _export(weights, run / "exports" / "step_00000004.safetensors", 4, 120.0)
    assert bench.main(["--run", str(run), "--stage", "two", "--start-minutes", "13", *common]) == 0
    two = [(r["step"], r["minutes"]) for r in _rows(docs) if r["stage"] == "two"]
    assert two == [("2", "14.0"), ("4", "15.0")]
    # the same network, the same cases: the same score as the --weights point
    assert {r["ssim"] for r in _rows(docs)} == {row["ssim"]}

    capsys.readouterr()
    assert bench.main(["--run", str(run), "--stage", "two", "--start-minutes", "13", *common]) == 0
    assert len(_rows(docs)) == 3 and "step" not in capsys.readouterr().out.split("harmonic fill")[0]
    (docs / "stage_curve.png").unlink()
    assert bench.main(["--report-only", *common]) == 0
    assert (docs / "stage_curve.png").read_bytes()[:4] == b"\x89PNG" and len(_rows(docs)) == 3


def test_the_stage_curve_skips_loudly_without_data_and_wants_one_source(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--report-only", "--val", str(tmp_path / "absent"), "--docs", str(tmp_path)]) == 0
    assert "SKIPPED: no validation data" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        bench.main(["--stage", "x", "--val", str(tmp_path)])
    assert exc.value.code == 2 and "give one of --run, --weights or --report-only" in capsys.readouterr().err
