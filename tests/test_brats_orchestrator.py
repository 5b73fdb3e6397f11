"""The container's two contracts with the BraTS orchestrator (`brats` package), without Docker.

The orchestrator starts an inpainting container in one of two ways, chosen by the algorithm's
year (`brats.core.docker.run_container`):

- 2024 and earlier: the MLCube-style command line `infer --data_path=/mlcube_io0
  --output_path=/mlcube_io2 [--<additional files parameter>=/mlcube_io1[/path]]
  [--parameters_file=/mlcube_io3/<file>]` with data, additional files, output and parameters
  mounted at /mlcube_io0..3;
- 2025 and later: only /input and /output mounted, no command (the image's entrypoint runs).

Both run as the calling uid, with no network and a 4 GB /dev/shm. The input folder holds one
folder per case, `BraTS-GLI-0000k-000/BraTS-GLI-0000k-000-t1n-voided.nii.gz` and `-mask.nii.gz`
(its inpainting `input_name_schema`); the orchestrator then finds each case's result in the
output folder by the `0000k-000` part of its ID and loads every file there as NIfTI.

Here project/mlcube.py gets exactly those calls with the mount points replaced by temporary
folders (the 2025 entrypoint reads them from BRAINPAINT_INPUT / BRAINPAINT_OUTPUT). The last
test drives the orchestrator's own code (when `brats` is installed, see requirements-extra.txt)
with a stand-in Docker client that runs the entrypoint the same way.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import synth

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "project" / "mlcube.py"
REGISTRY = REPO / "mlcube" / "brats_algorithms.yml"
MLCUBE_MOUNTS = {"/mlcube_io0": "data", "/mlcube_io1": "additional_files", "/mlcube_io2": "output", "/mlcube_io3": "parameters"}


def _smoke_case():
    spec = importlib.util.spec_from_file_location("brainpaint_smoke_case", REPO / "scripts" / "smoke_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = _smoke_case()  # the orchestrator-style input and the output checks the container smoke test uses


@pytest.fixture(scope="module")
def image_weights(tmp_path_factory):
    """Stands in for the weights the image carries ($BRAINPAINT_WEIGHTS in the Dockerfile)."""
    return synth.tiny_weights(tmp_path_factory.mktemp("image") / "model.safetensors", crop_size=32)


def _container(argv: list[str], mounts: dict[str, Path], image_weights: Path) -> subprocess.CompletedProcess:
    """The entrypoint as the container runs it: `argv` with every mount point replaced by its
    folder; no GPU, no home, the image's environment."""
    def host(arg: str) -> str:
        return re.sub(r"/(mlcube_io\d|input|output)\b", lambda m: str(mounts[m.group(0)]), arg)

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HOME="/nonexistent-home",
               BRAINPAINT_WEIGHTS=str(image_weights), PYTHONPATH=str(REPO / "project"))
    if "/input" in mounts:
        env.update(BRAINPAINT_INPUT=str(mounts["/input"]), BRAINPAINT_OUTPUT=str(mounts["/output"]))
    return subprocess.run([sys.executable, str(ENTRYPOINT), *map(host, argv)], cwd=mounts[next(iter(mounts))],
                          env=env, capture_output=True, text=True, timeout=300)


def _check(input_folder: Path, output: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    try:
        SMOKE.check_output(input_folder, output)
    except SystemExit:
        pytest.fail(f"output check failed for {output}")
    for path in output.iterdir():  # the orchestrator's own sanity check loads every output file
        assert np.count_nonzero(nib.load(str(path)).get_fdata()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("additional_files", [True, False], ids=["weights-mounted", "image-weights"])
def test_the_2023_2024_call_mlcube_style(tmp_path, image_weights, additional_files):
    mounts = {point: tmp_path / name for point, name in MLCUBE_MOUNTS.items()}
    for folder in mounts.values():
        folder.mkdir()
    SMOKE.brats_input(mounts["/mlcube_io0"])
    argv = ["infer", "--data_path=/mlcube_io0", "--output_path=/mlcube_io2"]
    if additional_files:  # `param_name: [weights]` of the registry: the folder, or a file in it
        synth.tiny_weights(mounts["/mlcube_io1"] / "model.safetensors", crop_size=32, seed=1)
        argv.append("--weights=/mlcube_io1")
    result = _container(argv, mounts, image_weights)
    _check(mounts["/mlcube_io0"], mounts["/mlcube_io2"], result)
    used = mounts["/mlcube_io1"] / "model.safetensors" if additional_files else image_weights
    assert f"weights {used}" in result.stderr


@pytest.mark.slow
def test_the_2025_call_input_output_and_no_command(tmp_path, image_weights):
    mounts = {"/input": tmp_path / "input", "/output": tmp_path / "output"}
    mounts["/output"].mkdir()  # the orchestrator creates it before the run
    SMOKE.brats_input(mounts["/input"])
    result = _container([], mounts, image_weights)
    _check(mounts["/input"], mounts["/output"], result)
    assert f"inference on {mounts['/input']} into {mounts['/output']}" in result.stderr
    assert f"weights {image_weights}" in result.stderr


def test_the_registry_entries_describe_this_image():
    cube = yaml.safe_load((REPO / "mlcube" / "mlcube.yaml").read_text())
    entries = yaml.safe_load(REGISTRY.read_text())["algorithms"]
    years = sorted(entry["meta"]["year"] for entry in entries.values())
    assert years[0] <= 2024 < 2025 <= years[-1], "one entry per container contract"
    for name, entry in entries.items():
        run = entry["run_args"]
        assert run["docker_image"] == cube["docker"]["image"], name
        assert run["input_name_schema"] == "BraTS-GLI-{id:05d}-000"
        assert run["requires_root"] is False and run["cpu_compatible"] is True and run["parameters_file"] is False
        assert run["shm_size"] == "4gb" and entry["additional_files"] is None
    # The entrypoint has no command to wait for: the image must not set one either.
    assert not any(line.startswith("CMD") for line in (REPO / "Dockerfile").read_text().splitlines())


class _StandInContainers:
    """`docker.from_env().containers` as the orchestrator uses it, running the entrypoint."""

    def __init__(self, image_weights: Path):
        self.image_weights, self.calls = image_weights, []

    def run(self, image, volumes, command=None, **options):
        self.calls.append({"image": image, "volumes": volumes, "command": command, **options})
        mounts = {spec["bind"]: Path(host) for host, spec in volumes.items()}
        return _StandInContainer(_container(shlex.split(command or ""), mounts, self.image_weights))


class _StandInContainer:
    def __init__(self, result: subprocess.CompletedProcess):
        self.result = result

    def attach(self, **_):
        return [line.encode() for line in (self.result.stdout + self.result.stderr).splitlines()]

    def wait(self):
        return {"StatusCode": self.result.returncode}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["brainpaint", "brainpaint_mlcube"])
def test_the_orchestrator_runs_the_registered_algorithm(tmp_path, monkeypatch, image_weights, name):
    pytest.importorskip("brats", reason="the BraTS orchestrator is a dev-only extra (requirements-extra.txt)")
    import brats.core.docker as brats_docker
    from brats import Inpainter
    from brats.utils.algorithm_config import load_algorithms

    containers = _StandInContainers(image_weights)
    client = type("Client", (), {"containers": containers, "images": type("Images", (), {"list": lambda self, name: [name]})()})
    monkeypatch.setattr(brats_docker, "client", client())
    monkeypatch.setattr(brats_docker, "_is_cuda_available", lambda: False)
    monkeypatch.chdir(tmp_path)

    inpainter = Inpainter(cuda_devices="0")
    inpainter.algorithm = load_algorithms(REGISTRY)[name]
    data = tmp_path / "cases"
    SMOKE.brats_input(data)
    voided, mask = (data / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1n-voided", "mask"))
    inpainter.infer_single(t1n=voided, mask=mask, output_file=tmp_path / "single.nii.gz")
    inpainter.infer_batch(data_folder=data, output_folder=tmp_path / "batch")

    call = containers.calls[0]
    assert call["user"] == f"{os.getuid()}:{os.getgid()}" and call["network_mode"] == "none" and call["shm_size"] == "4gb"
    binds = sorted(spec["bind"] for spec in call["volumes"].values())
    if name == "brainpaint":
        assert call["command"] is None and binds == ["/input", "/output"]
    else:
        assert call["command"].startswith("infer --data_path=/mlcube_io0 --output_path=/mlcube_io2")
        assert binds == sorted(MLCUBE_MOUNTS)
    inside = np.asanyarray(nib.load(str(mask)).dataobj) > 0
    known = np.asanyarray(nib.load(str(voided)).dataobj)[~inside]
    for result in (tmp_path / "single.nii.gz", tmp_path / "batch" / "BraTS-GLI-00001-000.nii.gz"):
        assert np.asanyarray(nib.load(str(result)).dataobj)[~inside].tobytes() == known.tobytes()
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["BraTS-GLI-00000-000.nii.gz", "BraTS-GLI-00001-000.nii.gz"]


def test_the_container_smoke_test_makes_both_calls():
    """scripts/container_smoke.sh runs the real image the same two ways (it needs root and a
    Docker engine of its own, so CI runs it after the test suite)."""
    script = (REPO / "scripts" / "container_smoke.sh").read_text().replace("\\\n", " ")
    calls = {m.group(1): m.group(2).split() for m in re.finditer(r"^brats_run (\S+) (.*)$", script, re.M)}
    assert calls["2025-style"] == ["-v", '"$N/input:/input:rw"', "-v", '"$N/output:/output:rw"', '"$IMAGE"']
    mlcube = calls["2024-style"]
    assert [a.split(":")[1] for a in mlcube if a.startswith('"$M/')] == sorted(MLCUBE_MOUNTS)
    assert mlcube[mlcube.index('"$IMAGE"') + 1 :] == ["infer", "--data_path=/mlcube_io0", "--output_path=/mlcube_io2",
                                                      "--weights=/mlcube_io1"]
    assert 'docker run --rm --network=none --shm-size=4gb -u "$SMOKE_UID:$SMOKE_UID" "$@"' in script
    assert script.count("smoke_case.py\" check-output") == 2
