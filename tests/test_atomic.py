"""Atomic writes: the final name holds complete content or nothing; temporaries name their writer."""
from __future__ import annotations

import os

import pytest

from brainpaint.io.atomic import atomic_folder, atomic_write, temp_owner, temp_path, write_text


def test_temporary_names_keep_the_extension_and_name_their_writer(tmp_path):
    final = tmp_path / "case-t1n-inference.nii.gz"
    tmp = temp_path(final, pid=4711)
    assert tmp.name == ".case-t1n-inference.nii.gz.tmp-4711.nii.gz"
    assert temp_owner(tmp, final.name) == 4711
    assert temp_owner(temp_path(tmp_path / "log.csv", pid=12), "log.csv") == 12
    assert temp_owner(tmp_path / ".case-t1n-inference.nii.gz.tmp-x.nii.gz", final.name) is None
    assert temp_owner(tmp_path / ".other.nii.gz.tmp-1.nii.gz", final.name) is None


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with atomic_write(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


def test_folders_replace_their_predecessor_only_when_complete(tmp_path):
    final = tmp_path / "case"
    with atomic_folder(final) as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as tmp:
            (tmp / "two").write_text("2")
            raise RuntimeError("crash")
    assert os.listdir(final) == ["one"] and os.listdir(tmp_path) == ["case"]
    with atomic_folder(final) as tmp:
        (tmp / "two").write_text("2")
    assert os.listdir(final) == ["two"] and os.listdir(tmp_path) == ["case"]
    with atomic_folder(final, replace=False) as tmp:
        (tmp / "three").write_text("3")
    assert os.listdir(final) == ["two"] and os.listdir(tmp_path) == ["case"]
