"""The command line as a new user meets it: help, option checks, what a run prints."""
from __future__ import annotations

import re

import numpy as np

import pytest
import typer.main
from typer.testing import CliRunner

import synth
from brainpaint.infer import progress
from brainpaint.infer.batch import run_infer
from brainpaint.io.brats import prediction_name
from brainpaint.cli import app
from brainpaint.config.settings import Config
from brainpaint.infer.prediction import Prediction

COMMANDS = ["infer", "evaluate", "train", "prepare", "export"]


def _run(*args: str, env=None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    click_command = typer.main.get_command(app).get_command(None, command)
    for param in click_command.params:
        if param.name == "help":
            continue
        assert param.help, f"{command} {param.opts[0]} has no help text"
        shows_default = "[default:" in param.help or (param.show_default and param.default is not None)
        assert param.required or shows_default, f"{command} {param.opts[0]} shows no default"
    text = _run(command, "--help", env={"COLUMNS": "80"}).stdout
    assert "…" not in text
    for param in click_command.params:
        for name in param.opts + param.secondary_opts:
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", text, re.M), f"{name} cut from the help"


def test_help_is_wider_than_80_columns_without_a_terminal():
    text = _run("infer", "--help", env={"COLUMNS": "80"}).stdout
    assert max(len(line) for line in text.splitlines()) > 80
    assert "--parameters-file, --parameters_file" in text and "[default: 1]" in text


@pytest.mark.parametrize(
    "options, message",
    [
        (["--method", "foo"], "unknown infer.method 'foo' (expected one of diffusion, harmonic)"),
        (["--steps", "-1"], "infer.steps must be >= 1, got -1"),
        (["--sampler", "euler"], "unknown infer.sampler 'euler'"),
        (["--ensemble", "0"], "infer.ensemble must be >= 1, got 0"),
        (["--device", "gpu"], "infer.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["--shard", "3/2"], "invalid shard '3/2'"),
        (["--weights", "absent.safetensors"], "weights file not found: absent.safetensors"),
    ],
)
def test_invalid_options_stop_before_any_case_and_before_the_output_folder(tmp_path, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    synth.write_case(tmp_path / "data", "a", labels=False)
    result = _run("infer", "--data-path", "data", "--output-path", "out", *options)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_run_says_what_it_runs_and_how_each_case_ended(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for cid in ("a", "b"):
        synth.write_case(data, cid, labels=False)
    synth.write_case(data, "c", labels=False).joinpath("stray.txt").write_text("x")
    result = _run("infer", "--data-path", str(data), "--output-path", str(out), "--method", "harmonic")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "infer: method harmonic (classical 3D fill, no network), device cpu"
    assert re.fullmatch(r"a: ok \(\d+\.\d s, 11 slices\) \[1/3\]", lines[1])
    assert re.fullmatch(r"b: ok \(\d+\.\d s, 11 slices\) \[2/3\]", lines[2])
    assert lines[3].startswith("error: c: unexpected file 'stray.txt'") and lines[3].endswith("[3/3]")
    assert lines[-1] == "3 cases: 2 ok, 1 failed, 0 skipped"
    assert "\r" not in result.stderr and "%|" not in result.stderr  # no bars without a terminal

    again = _run("infer", "--data-path", str(data), "--output-path", str(out), "--method", "harmonic")
    assert f"a: {prediction_name('a')} exists, skipped (use --overwrite to recompute) [1/3]" in again.stderr
    assert again.stderr.rstrip().endswith("3 cases: 0 ok, 1 failed, 2 skipped")


def test_the_diffusion_settings_line_names_sampler_device_and_weights(tmp_path):
    from brainpaint.infer.batch import settings_lines

    cfg = Config().override({"infer.steps": 8, "infer.temperature": 1, "infer.ensemble": 4, "infer.smoothing_sigma": 1.075})

    class Built:
        device, weights = "cpu", tmp_path / "model.safetensors"

    first, second = settings_lines(cfg, Built())
    assert first == (
        "infer: method diffusion, sampler ddim, 8 steps, eta 0, temperature 1, ensemble 4, filter sigma 1.075, seed 0"
    )
    assert second == f"infer: device cpu, weights {tmp_path / 'model.safetensors'}"
    assert settings_lines(cfg, None) == [first]  # nothing built (every case done): no device line


def test_progress_bars_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda stream=None: True)
    data = tmp_path / "data"
    synth.write_case(data, "a", labels=False)
    steps_shown = []

    class Diffusion:
        def sample(self, *args, progress=False):
            steps_shown.append(progress)

    def predictor(case_data, seed):
        predictor.diffusion.sample()
        return Prediction(case_data.voided + 1.0)

    predictor.diffusion = Diffusion()
    assert run_infer(Config(), data, tmp_path / "out", predictor=predictor) == 0
    err = capsys.readouterr().err
    assert "infer: 100%" in err and "1/1" in err and re.search(r"a: ok \(\d+\.\d s, 0 slices\) \[1/1\]", err)
    assert steps_shown == [True]  # the sampler's own per-step bar is switched on


def test_interactive_means_a_terminal():
    class Tty:
        def isatty(self):
            return True

    assert progress.interactive(Tty()) and not progress.interactive(object())


@pytest.mark.parametrize("source, message", [
    ("absent", "absent is not a folder: give a training run's output folder or one of its checkpoints"),
    ("run", "no checkpoint found in"),
    ("broken", "ema.safetensors: "),
    ("good", "cannot write"),
])
def test_export_problems_are_one_line_errors(tmp_path, source, message):
    from safetensors.numpy import save_file

    (tmp_path / "run").mkdir()  # a run folder without checkpoints
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ema.safetensors").write_bytes(b"not a weights file")
    (tmp_path / "good").mkdir()
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "good" / "ema.safetensors"))
    (tmp_path / "file").write_text("x")  # the output's folder is a file: nothing can be written there
    result = _run("export", str(tmp_path / source), str(tmp_path / "file" / "model.safetensors"))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    if source == "good":  # the same checkpoint, copied under its own name, exports to a usable place
        assert _run("export", str(tmp_path / source), str(tmp_path / "out" / "model.safetensors")).exit_code == 0
        assert (tmp_path / "out" / "model.safetensors").is_file()
