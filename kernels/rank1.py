"""Rank-1 late-phase linear layer: out[k] = ((x[k] * s[k]) @ weight.T) * r[k] + bias[k].

PLACEHOLDER (eager only) until the Triton kernels land; the public signature is final.
"""
from __future__ import annotations

import torch


def rank1_linear_eager(x, weight, r, s, bias=None):
    if x.dim() == 2:
        x = x.unsqueeze(0)
    out = torch.matmul(x * s.unsqueeze(1), weight.t()) * r.unsqueeze(1)
    if bias is not None:
        out = out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
    return out


def rank1_linear(x, weight, r, s, bias=None, *, impl="auto"):
    return rank1_linear_eager(x, weight, r, s, bias)
