"""Test-wide setup.

- Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable must be set
  before triton is first imported, because `triton.jit` reads it when a kernel is decorated.
- On a machine with CUDA the interpreter stays off, so that tests/test_gpu.py checks the compiled
  kernels; the modules marked `interpreter` (Triton on CPU tensors) are then skipped unless
  TRITON_INTERPRET=1 is set by hand. Without Triton (macOS, Windows: it ships for Linux) they
  are skipped too.
- One intra-op thread per process: the suite's tensors are tiny, and the multi-process tests
  start two workers on a 2-core machine, where more threads only oversubscribe the cores.
  Subprocesses inherit both variables.
"""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from kernels.optional_triton import TRITON_INSTALLED
    from kernels.rank1 import interpreting

    if interpreting():
        return
    skip = pytest.mark.skip(reason="runs Triton on CPU tensors: set TRITON_INTERPRET=1 (automatic without CUDA)"
                            if TRITON_INSTALLED else "runs Triton on CPU tensors, and Triton is not installed")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer our kernels store into starts as NaN; returns the allocations' shapes."""
    from kernels import rank1

    allocations = []

    def poisoned(shape, dtype, device):
        allocations.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rank1, "output_buffer", poisoned)
    return allocations
