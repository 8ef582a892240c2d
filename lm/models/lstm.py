"""Byte LSTM language model: embedding -> n-layer LSTM -> linear decoder over the vocabulary.

The paper's enwik8 model is 1 layer x 500 units, about 1.56M parameters. With vocabulary 256
the count is 256*E + 4H(E + H) + 8H + 257H + 256 = 2256*E + 1,132,256 for H = 500, so
embed_dim 190 (the default) gives 1,560,896.

Late-phase factors sit on the input-to-hidden and hidden-to-hidden matrices of every layer,
with per-member biases (as edward2's LSTMCellRank1); embedding and decoder are shared.
All modes run the fused nn.LSTM (cuDNN on GPU, the fused CPU kernel otherwise): a member's
weights W * (r_k s_k^T) are folded once per forward and handed to the nn.LSTM through
torch.func.functional_call, so autograd reaches W, r and s. "parallel" and "all" run one
folded LSTM per member (on that member's rows / on the whole batch): a single call over all
members would need a Python loop over time steps with rank-1 products, giving up the fused
recurrence, which costs far more than K kernel launches per window.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from lm.config import ModelConfig
from lm.late_phase import Member, Rank1Factors, check_member

# Folded weights are fresh tensors on every call, so cuDNN's "weights are not part of a single
# contiguous chunk" advice (call flatten_parameters) cannot apply to them.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")

LSTMState = tuple[torch.Tensor, torch.Tensor]


class LatePhaseLSTM(nn.Module):
    """An nn.LSTM (batch_first) whose weight matrices optionally carry rank-1 member factors.

    Plain (num=0): the nn.LSTM as it is. Factored: the nn.LSTM holds the shared matrices; its
    own bias slots are emptied because each member has its own biases (in the factors).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, num: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.num_layers = num_layers
        if num == 0:
            self.factors = None
            return
        factors = {}
        for layer in range(num_layers):
            for kind in ("ih", "hh"):
                weight = getattr(self.lstm, f"weight_{kind}_l{layer}")
                bias = getattr(self.lstm, f"bias_{kind}_l{layer}")
                factors[f"{kind}_l{layer}"] = Rank1Factors(num, weight.shape[0], weight.shape[1], bias_init=bias)
                setattr(self.lstm, f"bias_{kind}_l{layer}", None)
        self.factors = nn.ModuleDict(factors)

    def member_weights(self, member: int) -> dict[str, torch.Tensor]:
        """Member k's folded nn.LSTM parameters, by the nn.LSTM's own names."""
        weights = {}
        for name, f in self.factors.items():
            kind, layer = name.split("_")
            weights[f"weight_{kind}_{layer}"] = f.fold(getattr(self.lstm, f"weight_{kind}_{layer}"), member)
            weights[f"bias_{kind}_{layer}"] = f.member_bias(member)
        return weights

    def forward(self, x: torch.Tensor, state: LSTMState | None, member: int) -> tuple[torch.Tensor, LSTMState]:
        if self.factors is None:
            return self.lstm(x, state)
        return functional_call(self.lstm, self.member_weights(member), (x, state))

    def averaged_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, f in self.factors.items():
            kind, layer = name.split("_")
            state[f"lstm.weight_{kind}_{layer}"] = f.mean_fold(getattr(self.lstm, f"weight_{kind}_{layer}"))
            state[f"lstm.bias_{kind}_{layer}"] = f.mean_bias()
        return state


class LSTMLM(nn.Module):
    """Byte LSTM LM. forward(inputs (B, T), state, member) -> (logits, state); see lm/models/__init__.py."""

    def __init__(self, cfg: ModelConfig, num: int):
        super().__init__()
        self.cfg = cfg
        self.num = num  # stored members; 0 = plain model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.rnn = LatePhaseLSTM(cfg.embed_dim, cfg.hidden_size, cfg.num_layers, num)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, inputs: torch.Tensor, state=None, member: Member = 0):
        check_member(member, max(self.num, 1))
        if isinstance(member, str) and self.num == 0:
            if member == "parallel":
                raise ValueError("member='parallel' needs a late-phase model; a plain model has one member (0)")
            logits, new_state = self.forward(inputs, None if state is None else _unstack(state, 0), 0)
            return logits.unsqueeze(0), _stack([new_state])
        x = self.embed(inputs)
        if isinstance(member, int):
            out, new_state = self.rnn(x, state, member)
            return self.decoder(out), new_state
        if member == "all":
            outs, states = zip(*(self.rnn(x, None if state is None else _unstack(state, k), k) for k in range(self.num)))
            return self.decoder(torch.stack(outs)), _stack(states)
        return self._forward_parallel(x, state)

    def _forward_parallel(self, x: torch.Tensor, state: LSTMState | None):
        """Row b through member b % K; state keeps the batch layout (layers, B, H)."""
        batch, K = x.shape[0], self.num
        if batch % K:
            raise ValueError(f"member='parallel' needs a batch that is a multiple of K={K}, got {batch} rows")
        outs, states = [], []
        for k in range(K):
            member_state = None if state is None else (state[0][:, k::K], state[1][:, k::K])
            out, st = self.rnn(x[k::K], member_state, k)
            outs.append(out)
            states.append(st)
        out = torch.stack(outs, dim=1).flatten(0, 1)  # (B/K, K, T, H) -> (B, T, H), row b = member b % K
        h = torch.stack([s[0] for s in states], dim=2).flatten(1, 2)
        c = torch.stack([s[1] for s in states], dim=2).flatten(1, 2)
        return self.decoder(out), (h, c)


def _stack(states) -> LSTMState:
    """Per-member states -> one (K, layers, B, H) pair (the opaque state of member='all')."""
    return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])


def _unstack(state: LSTMState, member: int) -> LSTMState:
    return state[0][member], state[1][member]
