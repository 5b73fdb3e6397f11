"""pyproject.toml declares what `pip install .` needs, consistent with the pins of requirements.txt.

The real check, a fresh virtual environment with `pip install .` and a harmonic run of the
installed `brainpaint` command, is scripts/install_check.sh (network, minutes; run by CI).
"""
from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]}


def test_pyproject_declares_every_pinned_runtime_dependency_and_the_pins_satisfy_it():
    pins, declared = _pins(), _declared()
    assert set(declared) == set(pins)
    for name, requirement in declared.items():
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not in {requirement}"


def test_the_package_imports_only_declared_third_party_modules():
    import ast
    import sys

    imported = set()
    for path in (REPO / "project" / "brainpaint").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - set(sys.stdlib_module_names) if m != "brainpaint"}
    distribution = {"PIL": "pillow", "yaml": "pyyaml"}
    assert {canonicalize_name(distribution.get(m, m)) for m in third_party} <= set(_declared())


def test_the_console_script_is_the_cli():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"brainpaint": "brainpaint.cli:main"}


def test_no_two_tracked_paths_differ_only_by_case():
    """A checkout on a case-insensitive file system (macOS, Windows) would keep one of them."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    paths = [p for p in listed.split("\0") if p]
    # every folder of every path counts too: docs/A/x and docs/a/y clash as folders
    names = {prefix for p in paths for prefix in ("/".join(p.split("/")[: i + 1]) for i in range(p.count("/") + 1))}
    seen: dict[str, str] = {}
    clashes = []
    for name in sorted(names):
        other = seen.setdefault(name.lower(), name)
        if other != name:
            clashes.append((other, name))
    assert not clashes, f"paths that differ only by case: {clashes}"
