"""Triton kernels: the fused rank-1 late-phase linear layer (all K members in one pass)."""
from kernels.rank1 import rank1_linear, rank1_linear_eager

__all__ = ["rank1_linear", "rank1_linear_eager"]
