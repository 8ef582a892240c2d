"""Byte LSTM language model: embedding -> n-layer LSTM -> linear decoder over the vocabulary.

The paper's enwik8 model is 1 layer x 500 units, about 1.56M parameters. With vocabulary 256
the count is 256*E + 4H(E + H) + 8H + 257H + 256 = 2256*E + 1,132,256 for H = 500, so
embed_dim 190 (the default) gives 1,560,896.

Late-phase factors sit on the input-to-hidden and hidden-to-hidden matrices of every layer,
with per-member biases (as edward2's LSTMCellRank1); embedding and decoder are shared.

One member (an int: plain, rank1 and the sequential schedule) runs the fused nn.LSTM (cuDNN on
GPU, oneDNN on CPU): its weights W * (r_k s_k^T) are folded once per forward and handed to the
nn.LSTM through torch.func.functional_call, so autograd reaches W, r and s.

All members at once ("parallel", "all") run one of two ways (`model.lstm_members`):
- fused: kernels.rank1_linear applies every member's factors to the shared W_ih in one call for
  the input projections of all time steps, then kernels.rank1_lstm runs the recurrence of all
  members together: each step one matmul over all K x B rows with the shared W_hh, and one
  autograd node for the window (backpropagation through time by hand, weight gradients from
  all steps at once). A window costs T steps for all members instead of K x T.
- folded: one nn.LSTM per member on its rows (the fused recurrence, K times).
`auto` picks fused for the CPU's parallel schedule from CPU_FUSED_FROM_HIDDEN units and folded
otherwise, as measured (docs/benchmarks/training_cpu.md). On CUDA folded beat the earlier fused path (a per-step
autograd graph) on an H100; the present one is not yet measured there (training.md).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from kernels import rank1_lstm
from lm.config import ModelConfig
from lm.late_phase import Member, Rank1Factors, check_member

LSTMState = tuple[torch.Tensor, torch.Tensor]


def _cudnn_would_run_in_float16(x: torch.Tensor) -> bool:
    """Whether CUDA autocast would run a cuDNN LSTM in float16 where the run asked for bfloat16.

    CUDA autocast casts every cuDNN RNN to float16, whatever its own dtype
    (aten/src/ATen/cudnn/AutocastRNN.cpp): a bf16 run would train its LSTM in float16 without
    the loss scaling float16 needs, and small gradients would underflow. CPU autocast keeps bf16.
    """
    return x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16


def _run_lstm(lstm: nn.LSTM, weights: dict[str, torch.Tensor] | None, x: torch.Tensor,
             state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
    """nn.LSTM on (x, state), with `weights` in place of its own unless None (autograd reaches
    them). Under bf16 autocast on CUDA it runs in float32 (TF32 matmuls when train.tf32 is on):
    see _cudnn_would_run_in_float16."""
    if _cudnn_would_run_in_float16(x):
        with torch.autocast("cuda", enabled=False):
            return _run_lstm(lstm, weights, x.float(), None if state is None else tuple(s.float() for s in state))
    if weights is None:
        return lstm(x, state)
    with warnings.catch_warnings():
        # Folded weights are fresh tensors on every call, so cuDNN's "weights are not part of a
        # single contiguous chunk" advice (call flatten_parameters) cannot apply to them.
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
        return functional_call(lstm, weights, (x, state))


class LatePhaseLSTM(nn.Module):
    """An nn.LSTM (batch_first) whose weight matrices optionally carry rank-1 member factors.

    Plain (num=0): the nn.LSTM as it is. Factored: the nn.LSTM holds the shared matrices; its
    own bias slots are emptied because each member has its own biases (in the factors).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, num: int):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.num_layers = num_layers
        self.num = num  # stored members; 0 = plain
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
        """One member on the whole batch: x (B, T, E) -> out (B, T, H), state (layers, B, H) pair."""
        return _run_lstm(self.lstm, None if self.factors is None else self.member_weights(member), x, state)

    def all_members(self, x: torch.Tensor, state: LSTMState | None, shared_input: bool,
                    how: str, cuda_graphs: bool = True) -> tuple[torch.Tensor, LSTMState]:
        """Every member at once; how = "fused" | "folded" (see the module docstring), fused on
        CUDA replaying its windows from CUDA graphs unless `cuda_graphs` is False.

        x: (B, T, E) shared by every member, or (K, B, T, E) with member k's rows in x[k].
        Returns out (K, B, T, H) and a state pair of (K, layers, B, H) tensors.
        """
        if how == "folded":
            runs = [self(x if shared_input else x[k], None if state is None else _unstack(state, k), k)
                    for k in range(self.num)]
            return torch.stack([out for out, _ in runs]), _stack([st for _, st in runs])
        return self._all_members_fused(x, state, shared_input, cuda_graphs)

    def _all_members_fused(self, x: torch.Tensor, state: LSTMState | None, shared_input: bool,
                           cuda_graphs: bool) -> tuple[torch.Tensor, LSTMState]:
        K, H = self.num, self.lstm.hidden_size
        batch, steps = x.shape[-3:-1]
        if state is None:
            zeros = x.new_zeros(K, self.num_layers, batch, H)
            state = (zeros, zeros)
        h_last, c_last = [], []
        for layer in range(self.num_layers):
            ih, hh = self.factors[f"ih_l{layer}"], self.factors[f"hh_l{layer}"]
            rows = x.reshape(-1, x.shape[-1]) if shared_input and layer == 0 else x.reshape(K, -1, x.shape[-1])
            # Input projections of every step at once; both member biases ride in its epilogue.
            x_gates = ih.all_members(rows, getattr(self.lstm, f"weight_ih_l{layer}"), ih.bias + hh.bias)
            x, h, c = rank1_lstm(x_gates.view(K, batch, steps, 4 * H), getattr(self.lstm, f"weight_hh_l{layer}"),
                                 hh.r, hh.s, state[0][:, layer], state[1][:, layer], impl=hh.kernel_impl,
                                 cuda_graphs=cuda_graphs)
            h_last.append(h)
            c_last.append(c)  # float32, as the kernel keeps it: no rounding between windows
        return x, (torch.stack(h_last, dim=1), torch.stack(c_last, dim=1))

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

    def forward(self, inputs: torch.Tensor, state: LSTMState | None = None,
                member: Member = 0) -> tuple[torch.Tensor, LSTMState]:
        check_member(member, self.num, inputs.shape[0])
        if member == "all" and self.num == 0:
            logits, new_state = self.forward(inputs, None if state is None else _unstack(state, 0), 0)
            return logits.unsqueeze(0), _stack([new_state])
        x = self.embed(inputs)
        if isinstance(member, int):
            out, new_state = self.rnn(x, state, member)
            return self.decoder(out), new_state
        how = all_members_way(self.cfg.lstm_members, member, self.cfg.hidden_size, x.device.type)
        if member == "all":
            out, new_state = self.rnn.all_members(x, state, shared_input=True, how=how,
                                                  cuda_graphs=self.cfg.lstm_cuda_graphs)
            return self.decoder(out), new_state
        return self._forward_parallel(x, state, how)

    def _forward_parallel(self, x: torch.Tensor, state: LSTMState | None, how: str):
        """Row b through member b % K; state keeps the batch layout (layers, B, H)."""
        K = self.num
        member_state = None if state is None else tuple(_rows_to_members(s, 1, K) for s in state)
        out, (h, c) = self.rnn.all_members(_rows_to_members(x, 0, K), member_state, shared_input=False, how=how,
                                           cuda_graphs=self.cfg.lstm_cuda_graphs)
        out = out.movedim(0, 1).flatten(0, 1)
        h, c = (s.movedim(0, 2).flatten(1, 2) for s in (h, c))
        return self.decoder(out), (h, c)


# Hidden units from which fused beat folded for the parallel schedule on the CPU (2 cores,
# batch 120 x 150, K=10, so 12 rows per member; cost per byte against plain, fused vs folded):
# 1.29 vs 1.12 at 256 units, 1.19 vs 1.13 at 384, 1.19 vs 1.27 at 500, 1.19 vs 1.38 at 750.
# Fused's per-step elementwise work weighs less as the recurrent matmul grows; folded's oneDNN
# LSTMs on B/K rows each lose more. With every member on all rows (member="all", ensemble
# evaluation) folded's LSTMs are wide: at 500 units and 64 rows it took 1.3 s per window
# against fused's 2.0 s, so "all" stays folded.
CPU_FUSED_FROM_HIDDEN = 500


def all_members_way(setting: str, member: str, hidden_size: int, device_type: str) -> str:
    """model.lstm_members resolved for member "parallel" or "all": "auto" takes the way that
    measured faster (module docstring)."""
    if setting != "auto":
        return setting
    fused = device_type == "cpu" and member == "parallel" and hidden_size >= CPU_FUSED_FROM_HIDDEN
    return "fused" if fused else "folded"


def _rows_to_members(t: torch.Tensor, dim: int, members: int) -> torch.Tensor:
    """Batch dim `dim` of size B -> a leading member dim: row b = j*K + k is row j of member k."""
    return t.unflatten(dim, (-1, members)).movedim(dim + 1, 0)


def _stack(states) -> LSTMState:
    """Per-member states -> one (K, layers, B, H) pair (the opaque state of member='all')."""
    return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])


def _unstack(state: LSTMState, member: int) -> LSTMState:
    # cuDNN takes only contiguous (h, c); a parallel-schedule state regrouped by member is strided.
    return state[0][member].contiguous(), state[1][member].contiguous()
