"""Progress on stderr: bars where a person watches (stderr is a terminal), plain lines always.

`CaseProgress` draws one bar over the cases of a run when stderr is a terminal and nothing
otherwise (CI logs, pipes, files), while the one line per finished case that commands print
through `say` appears in both. `show_sampling_steps` adds the sampler's own per-step bar for
the slices of the case being inpainted.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

from tqdm import tqdm


def interactive(stream=None) -> bool:
    """Whether `stream` (stderr by default) is a terminal someone is watching."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class CaseProgress:
    """A bar over `total` cases (terminal only) and one line per finished case (always)."""

    def __init__(self, total: int, what: str, enabled: Optional[bool] = None):
        self.enabled = interactive() if enabled is None else enabled
        self.total = total
        self.done = 0
        self.bar = tqdm(total=total, desc=what, unit="case", file=sys.stderr, dynamic_ncols=True,
                        disable=not self.enabled or total == 0)

    def say(self, line: str) -> None:
        """Print one line on stderr without breaking the bar."""
        if self.enabled:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def finished(self, line: str) -> None:
        """One case is done: its line, with the count, and the bar moves on."""
        self.done += 1
        self.say(f"{line} [{self.done}/{self.total}]")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "CaseProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def show_sampling_steps(predictor) -> None:
    """Turn on the per-step bar of a diffusion predictor's sampler (one bar per slice batch).

    The predictor samples through `predictor.diffusion.sample`, whose `progress` flag draws a
    bar over the sampling steps; this sets that flag for this one predictor instance. Other
    predictors (the harmonic fill, test doubles) have no steps and are left as they are.
    """
    diffusion = getattr(predictor, "diffusion", None)
    sample = getattr(diffusion, "sample", None)
    if sample is not None and not isinstance(sample, functools.partial):
        diffusion.sample = functools.partial(sample, progress=True)
