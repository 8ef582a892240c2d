"""Test-wide setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

The variable must be set before triton is first imported, because `triton.jit`
reads it when a kernel is decorated.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
