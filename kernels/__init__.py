"""Triton kernels: the fused rank-1 late-phase linear layer (all K members in one pass) and the
fused LSTM cell update of the LSTM's all-members path."""
from kernels.lstm import lstm_cell, lstm_cell_eager
from kernels.rank1 import rank1_linear, rank1_linear_eager

__all__ = ["lstm_cell", "lstm_cell_eager", "rank1_linear", "rank1_linear_eager"]
