"""Triton kernels: the fused rank-1 late-phase linear layer (all K members in one pass) and the
LSTM recurrence of all members at once (one fused kernel per time step each way,
backpropagation through time by hand)."""
from kernels.lstm import rank1_lstm
from kernels.rank1 import rank1_linear, rank1_linear_eager

__all__ = ["rank1_linear", "rank1_linear_eager", "rank1_lstm"]
