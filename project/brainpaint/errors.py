"""Every error the package reports to a user, in one place.

Each one's `str()` is a single line meant to be printed as it is (`error: <message>`): the
command-line layers catch these and only these, so any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations


def one_line(text) -> str:
    """`text` (or an exception's message) on one line: every run of whitespace becomes one space.

    An exception without a message gives its type name.
    """
    line = " ".join(str(text).split())
    return line or (type(text).__name__ if isinstance(text, BaseException) else line)


class ConfigError(ValueError):
    """A parameters file (or option) that cannot be used; names the `section.key` at fault."""


class CaseError(Exception):
    """A problem with one case; `str()` is one line: '<case_id>: <problem>'."""

    def __init__(self, case_id: str, problem: str):
        self.case_id = str(case_id)
        self.problem = one_line(problem)
        super().__init__(f"{self.case_id}: {self.problem}")


class InputError(CaseError, ValueError):
    """Volumes given to the Python API (`brainpaint.Inpainter`) that cannot be inpainted: a
    ValueError whose `str()` is one line naming the input and the problem."""


class PrepareError(ValueError):
    """A problem with one input file of `prepare`; `str()` is one line naming the file."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = one_line(problem)
        super().__init__(f"{self.source}: {self.problem}")


class MaskPlacementError(ValueError):
    """No valid position was found for a mask (brain too small, or `avoid` too large)."""


class BatchSetupError(RuntimeError):
    """A batch run as a whole cannot start (bad shard string, unusable folders)."""


class InferenceSetupError(RuntimeError):
    """The predictor cannot be built (missing weights, unusable device); the message is one line."""


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message is one line."""


class DeviceError(InferenceSetupError, TrainError):
    """A device setting this machine cannot honour: a set-up error of inference and training alike."""


class FallbackWarning(UserWarning):
    """The Python API's warning for a fill that fell back on something else (atlas placed by its
    box, solver short of its tolerance, midline at the grid's centre); `brainpaint infer` prints
    the same lines under the case's line."""
