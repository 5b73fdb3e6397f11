"""The package's layering, checked on its source with `ast` so it stays as designed.

- no import cycles between the package's modules (function-level imports count too);
- subpackages import only downwards: errors and stages (per-case timing), io, config,
  conditioning, model, diffusion, data,
  then train and infer side by side, then the API, the command line and evaluate on top;
  inference never imports training or its data, and the API's closure holds no training code;
- every module imports on its own;
- imports sit at the top of modules (an exception needs a comment saying why);
- the command line, the configuration and the harmonic batch path start without torch;
- no function is longer than 60 lines, and the trainer stays under 300.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "project" / "brainpaint"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Package modules a `from ... import ...` statement in `module` refers to."""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    # `from .. import geometry` needs the submodule; it needs the package's own code only for
    # names that are not submodules (the package __init__ has run before any module in it).
    return found + ([target] if target in MODULES and len(found) < len(node.names) else [])


def _imports(module: str) -> set[str]:
    edges = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom):
            edges.update(_resolve(module, node))
        elif isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in MODULES)
    return edges - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_the_package():
    assert {"brainpaint.cli", "brainpaint.train.trainer", "brainpaint.diffusion.samplers.ddim"} <= set(MODULES)
    assert "brainpaint.diffusion.samplers.base" in GRAPH["brainpaint.diffusion.samplers.ddim"]
    assert "brainpaint.model.weights" in GRAPH["brainpaint.infer.inpainter"]
    assert "brainpaint.infer.inpainter" in GRAPH["brainpaint.infer.predictors"]  # the lazy import counts


def test_no_import_cycles():
    cycles = sorted(m for m in MODULES if m in _reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


# Rank of each layer: a module imports only modules of its own rank or lower. train and infer
# share a rank but never import each other.
RANKS = {"errors": 0, "stages": 0, "io": 1, "config": 2, "conditioning": 3, "model": 4, "diffusion": 5, "data": 6, "train": 7, "infer": 7}
TOP = 9  # api, cli, evaluate, the package itself


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "top"


def test_subpackages_import_only_downwards():
    wrong = []
    for module, edges in GRAPH.items():
        rank = RANKS.get(_layer(module), TOP)
        for target in edges:
            if RANKS.get(_layer(target), TOP) > rank:
                wrong.append(f"{module} -> {target}")
    assert not wrong, f"imports that go up the layers: {wrong}"


def test_inference_and_training_stay_apart():
    for module in GRAPH:
        layer = _layer(module)
        if layer in ("io", "conditioning", "model", "diffusion", "infer"):
            banned = {"data", "train"} | ({"infer"} if layer != "infer" else set())
            reached = sorted(m for m in _reachable(module) if _layer(m) in banned)
            assert not reached, f"{module} reaches {reached}"
        if layer == "train":
            assert not [m for m in _reachable(module) if _layer(m) == "infer"], module


@pytest.mark.slow
def test_the_api_closure_holds_no_training_code():
    reached = _reachable("brainpaint.api") | {"brainpaint.api"}
    assert "brainpaint.infer.inpainter" in reached  # the diffusion predictor, imported when made
    assert not sorted(m for m in reached if _layer(m) in ("data", "train")), "the API reaches training code"
    # At run time too: an Inpainter of the shipped weights loads no training module.
    code = (
        "import sys; from brainpaint import Inpainter; Inpainter.from_weights();"
        "print(sorted(m for m in sys.modules if m.startswith(('brainpaint.train', 'brainpaint.data'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_config_knows_every_sampler():
    from brainpaint.config.settings import SAMPLER_NAMES
    from brainpaint.diffusion.samplers import SAMPLERS

    assert tuple(sorted(SAMPLER_NAMES)) == tuple(sorted(SAMPLERS))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports_on_its_own(module):
    importlib.import_module(module)


@pytest.mark.slow
def test_the_light_paths_do_not_load_torch():
    code = (
        "import sys, brainpaint.cli, brainpaint.config.settings, brainpaint.infer.batch, brainpaint.data.prepare;"
        "print(sorted(m for m in ('torch', 'brainpaint.train.trainer', 'brainpaint.infer.inpainter') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_imports_are_at_the_top_of_modules():
    hidden = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        said_why = "#" in lines[inner.lineno - 1] or lines[inner.lineno - 2].strip().startswith("#")
                        if not said_why:
                            hidden.append(f"{module}:{inner.lineno}")
    assert not hidden, f"imports inside functions without a comment saying why: {hidden}"


def test_no_function_is_longer_than_60_lines_and_train_stays_small():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert len((PACKAGE / "train" / "trainer.py").read_text().splitlines()) < 300
