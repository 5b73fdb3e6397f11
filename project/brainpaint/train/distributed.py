"""Process set-up of training: ranks under torchrun (DDP), stop signals, weight digests.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every rank trains on its own
shard of the slices through DistributedDataParallel (NCCL on GPU, gloo on CPU); only rank 0
writes files. Without torchrun everything here degrades to a single process.
"""
from __future__ import annotations

import hashlib
import os
import signal
from typing import Callable

import torch
from torch import nn

from brainpaint.errors import TrainError


class DistEnv:
    """Rank layout from the torchrun environment (a single process when absent)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            torch.distributed.init_process_group(backend=backend, **kwargs)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank (so all stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, value) -> list:
        """`value` of every rank, in rank order, on every rank (any picklable object)."""
        if not self.enabled:
            return [value]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def on_main(self, device: torch.device, what: str, action: Callable[[], None]) -> None:
        """Run `action` on rank 0; when it fails, every rank raises (none is left at a barrier).

        An OSError (full disk, permissions, a folder in the way) becomes a one-line TrainError
        "cannot <what>: ..."; the other ranks raise "rank 0 could not <what>".
        """
        failure = None
        if self.is_main:
            try:
                action()
            except OSError as exc:
                failure = TrainError(f"cannot {what}: {exc}")
            except Exception as exc:
                failure = exc
        if self.any(failure is not None, device):
            raise failure if failure is not None else TrainError(f"rank 0 could not {what}; stopping this rank too")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name order): equal digests = identical weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class StopSignal:
    """SIGTERM (a scheduler's pre-emption) asks for a checkpoint and a clean exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
