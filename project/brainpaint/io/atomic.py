"""Atomic writes: a file or folder appears under its final name only when it is complete.

Everything is written to a hidden temporary name in the destination folder (same file
system), flushed to disk, then renamed into place with `os.replace`; a crash at any moment
leaves either the old content or the new one, plus at worst a temporary that the next run
can recognise by its name:

    .<name>.tmp-<pid><ext>      e.g. .case-t1n-inference.nii.gz.tmp-4711.nii.gz

`<ext>` repeats the final name's extension (`.nii.gz` counts as one), so writers that choose a
format by extension (nibabel, pillow) see the right one. `temp_owner` reads the pid back, which
is how a batch run tells a stale temporary of a killed run from one still being written.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

TEMP_MARK = ".tmp-"


def extension(name: str) -> str:
    """The extension a temporary keeps: `.nii.gz` as one, else the last suffix (may be '')."""
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def temp_path(path: Path, pid: Optional[int] = None) -> Path:
    """The temporary name this process uses for `path`."""
    path = Path(path)
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.name}{TEMP_MARK}{pid}{extension(path.name)}")


def temp_owner(candidate: Path, final_name: str) -> Optional[int]:
    """The pid in `candidate`'s name if it is a temporary of `final_name`, else None."""
    prefix = f".{final_name}{TEMP_MARK}"
    name = Path(candidate).name
    if not name.startswith(prefix):
        return None
    match = re.fullmatch(r"(\d+)" + re.escape(extension(final_name)), name[len(prefix):])
    return int(match.group(1)) if match else None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the OS refuses)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s content to; on success it replaces `path`.

    The caller writes the whole file to the yielded path with any writer it likes. When the
    block raises, the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = temp_path(path)
    _discard(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        _discard(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `path`.

    An existing `path` is moved aside first and removed once the new folder is in place (with
    `replace=False` it is kept and the new folder discarded).
    """
    path = Path(path)
    tmp = temp_path(path)
    _discard(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for entry in tmp.rglob("*"):
            if entry.is_file():
                _fsync(entry)
        _fsync(tmp)
        if path.exists():
            if not replace:
                return
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _discard(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _discard(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        _discard(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)
