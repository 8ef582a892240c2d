"""`triton` and `triton.language` when Triton is installed, stand-ins when it is not.

Triton ships for Linux only. On macOS or Windows the kernel modules still load, with the
kernels left as plain functions that are never launched: `kernels.rank1.resolve_impl` sends
impl="auto" to eager PyTorch there and refuses impl="triton" with a one-line error.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl

    TRITON_INSTALLED = True
except ImportError:
    TRITON_INSTALLED = False

    class _StandIn:
        """What the kernel modules use of Triton when they load: the decorators, autotune configs
        and cdiv. Everything else is only reached by a launch."""

        @staticmethod
        def jit(fn: Callable) -> Callable:
            return fn

        @staticmethod
        def autotune(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
            return lambda fn: fn

        class Config:
            def __init__(self, kwargs: dict[str, int], **options: Any):
                self.kwargs, self.options = kwargs, options

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = tl = _StandIn()

__all__ = ["TRITON_INSTALLED", "tl", "triton"]
