"""What a script does differently when a launcher (torchrun, accelerate launch) runs it once per
process: one process speaks, and the others leave without repeating it.

Kept free of torch and Accelerate, so that `train_lm.py --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import IO, NoReturn

# A launcher stops every process once one exits: a silent process that fails waits this long, so
# that the speaking one has printed its line before the launcher stops it.
SILENT_EXIT_DELAY_S = 2.0


def speaks() -> bool:
    """Whether this process prints messages: the only one, or process 0 of a launch (known from
    the launcher's environment before any Accelerator exists)."""
    return os.environ.get("RANK", "0") == "0"


def leave_silently() -> None:
    """Called by a process that does not speak before it exits on an error."""
    if not speaks():
        time.sleep(SILENT_EXIT_DELAY_S)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with help and usage errors printed by the speaking process only (each process
    parses the same command line, so a launch of 8 would otherwise print them 8 times)."""

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if speaks():
            super()._print_message(message, file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            leave_silently()
        super().exit(status, message)


def exit_process(code: int) -> NoReturn:
    """Exit a command-line entry point with `code`.

    In a multi-process run (torchrun, accelerate launch) the interpreter's own finalisation is
    skipped, after flushing: there, native teardown after a finished gloo run aborted some
    workers ("terminate called without an active exception"; 2 of 15 and 9 of 40 runs of
    `torchrun --nproc_per_node 2 -m lm.evaluate`, 0 of 40 with this exit), turning a run whose
    results were complete and written into a failed command.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
