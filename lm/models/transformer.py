"""Byte Transformer LM: decoder-only, pre-norm, causal attention, rotary or learned positions.

nanoGPT-like: blocks of x + attn(ln(x)), x + mlp(ln(x)), MLP 4x with GELU, a final LayerNorm
and an untied linear head. Attention goes through F.scaled_dot_product_attention (flash /
memory-efficient kernels where available).

Late-phase factors sit on every linear layer of every block (qkv, attention output, MLP in and
out), each with per-member biases, and optionally on the LayerNorm gains
(ModelConfig.layernorm_factors). The embedding, position table, final LayerNorm and head are
shared: they are not inside the blocks the members should specialise, and the head's 256 rows
gain little from a rank-1 modulation.

Activations have shape (B, T, C) for one member, and (K, B', T, C) once several members run:
"parallel" interleaves the batch (row b -> member b % K, B' = B / K) before the embedding;
"all" starts with the shared (B, T, C) embedding, which the first factored layer of block 0
turns into K copies (kernels.rank1_linear's shared-input path); from there on both are the
same stacked layout through kernels.rank1_linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig
from lm.late_phase import Member, LatePhaseLayerNorm, LatePhaseLinear, check_member


def _layer_member(member: Member, x: torch.Tensor) -> Member:
    """A layer's member argument: stacked activations (K, B, T, C) go member-by-row."""
    if isinstance(member, int):
        return member
    return "parallel" if x.dim() == 4 else "all"


def _rotary_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) = (first half, second half) of every head by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, num: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = LatePhaseLinear(cfg.d_model, 3 * cfg.d_model, num)
        self.proj = LatePhaseLinear(cfg.d_model, cfg.d_model, num, init_std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor, member: Member, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        qkv = self.qkv(x, _layer_member(member, x))
        *lead, T, _ = qkv.shape
        q, k, v = qkv.view(-1, T, 3, self.n_heads, qkv.shape[-1] // (3 * self.n_heads)).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            cos, sin = rotary[0][:T], rotary[1][:T]
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(*lead, T, -1)
        return self.proj(y, _layer_member(member, y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, num: int):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.d_model
        self.fc = LatePhaseLinear(cfg.d_model, hidden, num)
        self.proj = LatePhaseLinear(hidden, cfg.d_model, num, init_std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor, member: Member) -> torch.Tensor:
        h = F.gelu(self.fc(x, _layer_member(member, x)))
        return self.proj(h, _layer_member(member, h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, num: int):
        super().__init__()
        self.ln1 = LatePhaseLayerNorm(cfg.d_model, num, cfg.layernorm_factors)
        self.attn = Attention(cfg, num)
        self.ln2 = LatePhaseLayerNorm(cfg.d_model, num, cfg.layernorm_factors)
        self.mlp = MLP(cfg, num)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, member: Member, rotary) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x, _layer_member(member, x)), member, rotary))
        return x + self.dropout(self.mlp(self.ln2(x, _layer_member(member, x)), member))


class TransformerLM(nn.Module):
    """Byte Transformer LM. forward(inputs (B, T), state, member) -> (logits, None); see lm/models/__init__.py."""

    def __init__(self, cfg: ModelConfig, num: int):
        super().__init__()
        if cfg.d_model % cfg.n_heads or (cfg.positions == "rotary" and (cfg.d_model // cfg.n_heads) % 2):
            raise ValueError(f"model.d_model ({cfg.d_model}) must be n_heads ({cfg.n_heads}) times a head size, "
                             f"an even one with rotary positions")
        if cfg.positions not in ("rotary", "learned"):
            raise ValueError(f"model.positions must be 'rotary' or 'learned', got {cfg.positions!r}")
        self.cfg = cfg
        self.num = num  # stored members; 0 = plain model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            cos, sin = _rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, num) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        for module in (self.embed, self.head) + ((self.pos_embed,) if cfg.positions == "learned" else ()):
            nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor, state: None = None, member: Member = 0) -> tuple[torch.Tensor, None]:
        B, T = inputs.shape
        check_member(member, self.num, B)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if member == "all" and self.num == 0:
            return self.forward(inputs, None, 0)[0].unsqueeze(0), None
        if member == "parallel":
            inputs = inputs.view(B // self.num, self.num, T).transpose(0, 1)  # (K, B/K, T), row b -> b % K
        x = self.embed(inputs)
        rotary = None
        if self.cfg.positions == "learned":
            x = x + self.pos_embed.weight[:T]
        else:
            rotary = (self.rotary_cos, self.rotary_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, member, rotary)
        logits = self.head(self.ln_f(x))
        if member == "parallel":
            logits = logits.transpose(0, 1).reshape(B, T, -1)
        return logits, None
