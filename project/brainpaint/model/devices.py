"""The one device selector of inference and training."""
from __future__ import annotations

import sys

import torch

from brainpaint.errors import DeviceError


def select_device(setting: str = "auto", local_rank: int = 0, announce: bool = False) -> torch.device:
    """The torch device for a `*.device` setting: `auto`, `cpu`, `cuda` or `cuda:N`.

    `auto` is this process's GPU (`cuda:<local_rank>`, the rank's own under torchrun) when
    CUDA is available, else the CPU, which `announce` says on stderr. An explicit CUDA device
    that this machine does not have is a DeviceError (one line). A CUDA device becomes the
    current device of the process.
    """
    setting = (setting or "auto").strip().lower()
    if setting == "auto":
        if not torch.cuda.is_available():
            if announce:
                print("brainpaint: no CUDA device available, running on the CPU", file=sys.stderr)
            return torch.device("cpu")
        setting = f"cuda:{local_rank}"
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device '{setting}' (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"unsupported device '{setting}' (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{setting}' requested but CUDA is not available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{setting}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    torch.cuda.set_device(device)
    return device
