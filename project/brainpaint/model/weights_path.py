"""Which weights file inference loads: the explicit setting, $BRAINPAINT_WEIGHTS, or the shipped one.

Kept apart from `weights.py` (which loads torch) so that the command line can name, check and
report the weights file before any network code is imported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from brainpaint.errors import InferenceSetupError

WEIGHTS_NAME = "model.safetensors"
# Where the shipped weights live (repo checkout and MLCube workspace alike); overridable by
# `infer.weights` / `--weights`, or the BRAINPAINT_WEIGHTS environment variable (the container
# image sets it to the weights it carries).
WEIGHTS_ENV = "BRAINPAINT_WEIGHTS"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[3] / "workspace" / "additional_files" / WEIGHTS_NAME


def default_weights() -> Path:
    """The weights file used when none is given: $BRAINPAINT_WEIGHTS, else the shipped file."""
    return Path(os.environ[WEIGHTS_ENV]) if os.environ.get(WEIGHTS_ENV) else DEFAULT_WEIGHTS


def resolve_weights(setting: Optional[str | os.PathLike]) -> Path:
    """The weights file to load: the explicit setting, else $BRAINPAINT_WEIGHTS, else the default.

    A folder is accepted when it holds `model.safetensors` or exactly one `*.safetensors` file,
    so `--weights workspace/additional_files` works as well as the file itself.
    """
    path = Path(setting) if setting else default_weights()
    if path.is_dir():
        preferred = path / WEIGHTS_NAME
        found = [preferred] if preferred.is_file() else sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise InferenceSetupError(
                f"weights folder {path} must hold model.safetensors or exactly one *.safetensors file"
            )
        path = found[0]
    if not path.is_file():
        raise InferenceSetupError(f"weights file not found: {path} (set infer.weights, --weights or ${WEIGHTS_ENV})")
    return path
