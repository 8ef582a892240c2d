"""lm.files: crash-safe writes of files and directories."""
from __future__ import annotations

import os

import pytest

from lm.files import atomic_path, replace_directory, writable_directory_problem, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_text_atomically(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    write_text_atomically(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_replacing_a_directory_keeps_the_old_copy_whole_until_the_new_one_is_in(tmp_path, monkeypatch):
    target, new = tmp_path / "final", tmp_path / "final.tmp"
    target.mkdir()
    (target / "model").write_text("old")
    new.mkdir()
    (new / "model").write_text("new")

    real_replace = os.replace
    def replace_then_die(src, dst):
        if str(src) == str(new):
            raise KeyboardInterrupt  # killed between moving the old copy aside and moving the new one in
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(new, target)
    [aside] = tmp_path.glob("final.old-*")
    assert (aside / "model").read_text() == "old"  # nothing of the old copy was deleted

    monkeypatch.setattr(os, "replace", real_replace)
    real_replace(aside, target)
    replace_directory(new, target)
    assert (target / "model").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_writable_directory_problem_says_why_and_leaves_nothing_behind(tmp_path, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert writable_directory_problem(a_file) == f"{a_file} is a file, not a directory"
    assert writable_directory_problem(a_file / "run") == f"{a_file} is a file, not a directory"
    assert writable_directory_problem(tmp_path / "new" / "run") is None
    assert sorted(tmp_path.iterdir()) == [a_file]  # the directories it made to try are gone
    existing = tmp_path / "existing"
    existing.mkdir()
    assert writable_directory_problem(existing) is None and existing.is_dir() and not list(existing.iterdir())

    def refuse(self, *args, **kwargs):  # a read-only mount (root ignores permission bits)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.touch", refuse)
    assert writable_directory_problem(tmp_path / "ro" / "run") == "Permission denied"
    assert not (tmp_path / "ro").exists()
