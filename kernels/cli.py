"""Argument types shared by the command-line tools (kernels.bench, kernels.compile_check, lm.evaluate)."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an int >= 1, else argparse's one-line error naming the flag."""
    value = int(text)  # a ValueError reads "argument --rows: invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
