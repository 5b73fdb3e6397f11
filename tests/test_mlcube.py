"""The MLCube delivery: mlcube.yaml structure, Dockerfile lint, and the entrypoint without Docker.

The real container run (private dockerd, image build, `mlcube run`) is scripts/container_smoke.sh,
run by CI after the test suite; these tests cover what can be checked without an engine.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import synth

REPO = Path(__file__).resolve().parents[1]
MLCUBE_YAML = REPO / "mlcube" / "mlcube.yaml"
ENTRYPOINT = REPO / "project" / "mlcube.py"
VENV_BIN = Path(sys.executable).parent


def _load_entrypoint():
    spec = importlib.util.spec_from_file_location("brainpaint_mlcube_entry", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cube() -> dict:
    return yaml.safe_load(MLCUBE_YAML.read_text())


# ---------------------------------------------------------------- mlcube.yaml
def test_platform_and_docker_section(cube):
    assert cube["platform"]["accelerator_count"] == 1
    docker = cube["docker"]
    assert docker["build_strategy"] == "auto"
    assert docker["image"] and ":" in docker["image"]
    gpu, cpu = docker["gpu_args"].split(), docker["cpu_args"].split()
    assert "--gpus=all" in gpu and "--rm" in gpu and "--rm" in cpu
    shm = [a for a in gpu if a.startswith("--shm-size=")]
    assert len(shm) == 1 and shm[0] in cpu, "the same --shm-size must be in gpu_args and cpu_args"
    size = shm[0].split("=")[1].lower().rstrip("b")
    assert size.endswith("g") and float(size[:-1]) >= 8, f"--shm-size {size} is not large"
    assert docker["--network"] == "none"


def test_build_context_is_the_repository_root(cube):
    context = (MLCUBE_YAML.parent / cube["docker"]["build_context"]).resolve()
    assert context == REPO
    assert (context / cube["docker"]["build_file"]).resolve() == REPO / "Dockerfile"
    assert (context / "project" / "mlcube.py").is_file()


def test_workspace_is_the_top_level_workspace():
    # mlcube uses <mlcube root>/workspace; the link makes that the repository's workspace/.
    link = MLCUBE_YAML.parent / "workspace"
    assert link.is_symlink() and link.resolve() == (REPO / "workspace").resolve()
    assert (REPO / "workspace" / "parameters.yaml").is_file()


@pytest.mark.parametrize(
    "task, inputs, outputs",
    [
        ("infer", {"data_path": "directory", "parameters_file": "file", "weights": "directory"}, {"output_path": "directory"}),
        ("evaluate", {"predictions": "directory", "labels": "directory", "parameters_file": "file"}, {"output_path": "file"}),
        ("train", {"data_path": "directory", "parameters_file": "file"}, {"output_path": "directory"}),
    ],
)
def test_task_parameters(cube, task, inputs, outputs):
    params = cube["tasks"][task]["parameters"]
    assert {k: v["type"] for k, v in params["inputs"].items()} == inputs
    assert {k: v["type"] for k, v in params["outputs"].items()} == outputs
    assert all(v["opts"] == "ro" for v in params["inputs"].values()), "inputs must be mounted read-only"
    assert all(v["opts"] == "rw" for v in params["outputs"].values())
    assert "entrypoint" not in cube["tasks"][task], "tasks use the image's entrypoint"


def test_infer_weights_come_from_additional_files(cube):
    assert cube["tasks"]["infer"]["parameters"]["inputs"]["weights"]["default"] == "additional_files"


def test_parameters_file_is_a_valid_config():
    from brainpaint.config import Config

    Config.load(REPO / "workspace" / "parameters.yaml")  # raises on unknown sections/keys


# ---------------------------------------------------------------- Dockerfile
def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(VENV_BIN / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_build_paths():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:" in text and "runtime" in text.split("ARG BASE_IMAGE=")[1].split()[0]
    for needed in ("ARG OFFLINE=", "ARG TORCH_CUDA_ARCH=sm_90", "COPY wheels/", "ENTRYPOINT"):
        assert needed in text
    assert "USER root" not in text
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :].count("!wheels/") == 1
    assert (REPO / "wheels" / "README.md").is_file()
    # `COPY wheels/` needs the folder in every clone: its README must be tracked, not ignored.
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "wheels/README.md"], cwd=REPO)
        assert ignored.returncode == 1, "wheels/README.md is git-ignored"


# ---------------------------------------------------------------- the entrypoint without Docker
def test_medperf_forms_translate_to_the_cli():
    entry = _load_entrypoint()
    parser = entry._parser()
    args = parser.parse_args(
        ["infer", "--data_path=/in", "--output_path=/out", "--parameters_file=/p/parameters.yaml", "--weights=/w"]
    )
    assert entry.cli_arguments(args, use_gpu=True) == [
        "infer", "--data-path", "/in", "--output-path", "/out",
        "--parameters-file", "/p/parameters.yaml", "--weights", "/w",
    ]
    assert entry.cli_arguments(args, use_gpu=False)[-2:] == ["--device", "cpu"]
    args = parser.parse_args(
        ["evaluate", "--predictions=/pred", "--labels=/lab", "--parameters_file=/p.yaml", "--output_path=/m/metrics.csv"]
    )
    assert entry.cli_arguments(args, use_gpu=True) == [
        "evaluate", "--predictions", "/pred", "--labels", "/lab",
        "--output-file", "/m/metrics.csv", "--parameters-file", "/p.yaml",
    ]
    args = parser.parse_args(["train", "--data-path", "/d", "--output-path", "/c"])
    assert entry.cli_arguments(args, use_gpu=True) == ["train", "--data-path", "/d", "--output-path", "/c"]


def test_missing_required_option_is_an_error(capsys):
    entry = _load_entrypoint()
    with pytest.raises(SystemExit) as exc:
        entry._parser().parse_args(["infer", "--data_path=/in"])
    assert exc.value.code == 2
    assert "--output_path" in capsys.readouterr().err


def test_prepare_runtime_points_every_cache_at_scratch(tmp_path, monkeypatch):
    entry = _load_entrypoint()
    for name in ["HOME", "TMPDIR", *entry._CACHE_VARIABLES]:
        monkeypatch.setenv(name, "/nonexistent")
    monkeypatch.setattr("tempfile.tempdir", None)
    scratch = entry.prepare_runtime(str(tmp_path))
    try:
        assert scratch.parent == tmp_path
        for name in ["HOME", "TMPDIR", *entry._CACHE_VARIABLES]:
            path = Path(os.environ[name])
            assert path.is_dir() and scratch in path.parents, name
    finally:
        shutil.rmtree(scratch)


def _run_entrypoint(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HOME="/nonexistent-home")
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=240,
    )


def test_infer_task_harmonic_on_cpu(tmp_path):
    """The MedPerf command line, run as MLCube would inside the image, minus Docker."""
    data, out = tmp_path / "data", tmp_path / "predictions"
    case_id = "BraTS-GLI-00007-000"
    folder = synth.write_case(data, case_id, labels=False)
    params = tmp_path / "parameters.yaml"
    params.write_text(yaml.safe_dump({"infer": {"method": "harmonic", "device": "cuda"}}))
    before = sorted(p.name for p in folder.iterdir())

    result = _run_entrypoint(
        tmp_path, "infer", f"--data_path={data}", f"--output_path={out}",
        f"--parameters_file={params}", f"--weights={tmp_path / 'no-weights-needed'}",
    )
    assert result.returncode == 0, result.stderr
    # No GPU here: a `device: cuda` setting falls back to the CPU, with a message.
    assert "no GPU visible" in result.stderr and "on the CPU" in result.stderr
    assert "--device cpu" in result.stderr

    assert sorted(p.name for p in out.iterdir()) == [f"{case_id}-t1n-inference.nii.gz"]
    pred = nib.load(str(out / f"{case_id}-t1n-inference.nii.gz"))
    voided_img = nib.load(str(folder / f"{case_id}-t1n-voided.nii.gz"))
    mask = np.asarray(nib.load(str(folder / f"{case_id}-mask.nii.gz")).dataobj) > 0
    voided = np.asarray(voided_img.dataobj, dtype=np.float32)
    values = np.asarray(pred.dataobj, dtype=np.float32)
    assert values.shape == synth.SMALL_SHAPE
    np.testing.assert_allclose(pred.affine, voided_img.affine)
    np.testing.assert_array_equal(values[~mask], voided[~mask])
    assert values[mask].min() > 0, "the harmonic fill leaves no hole inside the brain"
    assert sorted(p.name for p in folder.iterdir()) == before, "inputs untouched"


def test_bad_parameters_file_fails_with_one_line(tmp_path):
    data = tmp_path / "data"
    synth.write_case(data, labels=False)
    params = tmp_path / "parameters.yaml"
    params.write_text("infer:\n  nonsense: 1\n")
    result = _run_entrypoint(
        tmp_path, "infer", f"--data_path={data}", f"--output_path={tmp_path / 'out'}", f"--parameters_file={params}"
    )
    assert result.returncode != 0
    assert "unknown parameter 'infer.nonsense'" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _smoke_fixture():
    spec = importlib.util.spec_from_file_location("brainpaint_smoke_case", REPO / "scripts" / "smoke_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["infer", "evaluate"])
def test_container_smoke_workspace_holds_every_default_input_of_the_task(cube, tmp_path, task):
    """The smoke test runs tasks with mlcube.yaml's defaults: each input must be in its workspace."""
    workspace = tmp_path / "workspace"
    _smoke_fixture().make(workspace)
    (workspace / "predictions").mkdir()  # written by the infer task before evaluate runs
    for name, spec in cube["tasks"][task]["parameters"]["inputs"].items():
        path = workspace / spec["default"]
        kind = spec["type"]
        assert (path.is_dir() if kind == "directory" else path.is_file()), f"{task}.{name}: {path} missing"
    if task == "evaluate":
        from brainpaint.brats_io import discover_cases

        labels = workspace / cube["tasks"]["evaluate"]["parameters"]["inputs"]["labels"]["default"]
        cases, errors = discover_cases(labels, labels=True)
        assert not errors and [c.id for c in cases] == [_smoke_fixture().CASE_ID]
