"""Argument types and output-path checks shared by the command-line tools (kernels.bench,
kernels.compile_check, lm.evaluate)."""
from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an int >= 1, else argparse's one-line error naming the flag."""
    value = int(text)  # a ValueError reads "argument --rows: invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class OutputError(Exception):
    """An output file the tool cannot write; the message is the one-line error without its "error: "."""


def cannot_write(path: str, error: OSError, flag: str) -> OutputError:
    """The error for an OSError met writing `path`, which the option `flag` chose."""
    reason = error.strerror or str(error) or type(error).__name__
    return OutputError(f"cannot write {path} ({reason}); pick another {flag}")


def check_writable(path: str, flag: str, make_parent: bool = False) -> None:
    """Raise OutputError unless `path` can be written, so that a bad path fails before a long run
    instead of after it: `path` must not be a directory, and a temporary file beside it is created
    and removed (only that finds out what permissions, read-only mounts and full disks allow).
    With make_parent the missing directories are created, as the tool does when writing."""
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path} (it is a directory); pick another {flag}")
    directory = os.path.dirname(path) or "."
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):  # ends at "/" at the latest
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # os.makedirs would say "File exists" or "Not a directory"
        raise OutputError(f"cannot write {path} ({existing} is not a directory); pick another {flag}")
    if existing != os.path.abspath(directory) and not make_parent:
        raise OutputError(f"cannot write {path} (directory {directory} does not exist); "
                          f"create it or pick another {flag}")
    probe = os.path.join(directory, f"{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise cannot_write(path, e, flag) from None
