"""Crash-safe writes: a reader sees the old file (or directory) or the new one, never a torn one.

Every file lm/ writes whole (results, config, exported models, checkpoints, plots, a trimmed
metrics.jsonl) goes through here; metrics.jsonl lines are appended, and a torn last line is
dropped when a run resumes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write to; when the block ends without an error it
    replaces `path` in one rename, and on any error (Ctrl-C included) it is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`. An existing `target` is renamed aside and
    removed only once `new` is in place, so a crash never leaves the old copy half-deleted."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old)


def writable_directory_problem(path: Path) -> str | None:
    """Why a file cannot be written in directory `path` (created if missing), in words, or None
    if it can. Tried for real, since permissions alone miss read-only mounts; leaves nothing
    behind: directories this made are removed again."""
    missing: list[Path] = []
    try:
        # os.path.exists, unlike Path.exists, is False (not an error) under an unsearchable directory.
        missing = [d for d in (path, *path.parents) if not os.path.exists(d)]
        existing = next(d for d in (path, *path.parents) if os.path.exists(d))
        if not existing.is_dir():
            return f"{existing} is a file, not a directory"
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
    return None
