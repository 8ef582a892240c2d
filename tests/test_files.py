"""lm.files: crash-safe writes of files and directories."""
from __future__ import annotations

import os

import pytest

from lm.files import atomic_path, replace_directory, write_text_atomically


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
