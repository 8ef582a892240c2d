"""An LSTM layer's recurrence over a window for all K rank-1 members at once.

Member k's recurrent matrix is W_hh * (r_k s_kᵀ) (the paper's rank-1 form), so one time step is

    gates = x_gates[:, :, t] + ((h * s_k) @ W_hhᵀ) * r_k        (nn.LSTM's order: i, f, g, o)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)

for every member's rows in one matmul over all K x B rows (W_hh is shared) instead of K
narrow ones. `rank1_lstm` runs the whole window in one autograd node with a hand-written
backward through time: per step only the recurrent products (forward: h -> gates, backward:
dgates -> dh) and the cell; the weight gradients dW, dr, ds come after the loop from all steps
at once (one batched matmul over K x B x T rows), as cuDNN does for its own weight gradient.
An autograd graph per step would instead compute them T times and add ~20 nodes per step.

Two implementations of the same steps: "triton" (CUDA, or the CPU interpreter in tests) runs
one kernel per step each way, the recurrent product with the cell update (or its gradient)
in the epilogue, so the gates never go through memory and a window of T steps costs 2T + 1
launches; "eager" runs PyTorch ops (the CPU path and the float64 reference). On CUDA those
launches are replayed from CUDA graphs, one per set of shapes (`_WindowGraphs`), since each is
too small for its host-side cost. Layout as in
kernels/rank1.py: eager reference, Triton kernels, the autograd Function and the dispatcher
side by side; `python -m kernels.compile_check` compiles the step kernels for sm_90 and sm_80.

Rows are (A, B) pairs of the leading dims, so a time step sliced out of a (K, B, T, 4H)
tensor, or a state regrouped by member, is read in place through its two row strides.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from kernels import rank1
from kernels.optional_triton import tl, triton
from kernels.rank1 import IMPLS, SUPPORTED_DTYPES, mma, resolve_impl


# --------------------------------------------------------------------------------------
# Eager reference: the cell's update and its gradient in PyTorch ops.
# --------------------------------------------------------------------------------------
def _cell_eager(gates, c_prev, h_out, c_out, act_out) -> None:
    """The cell update from the summed pre-activation gates, written into the given buffers."""
    hidden = c_prev.shape[-1]
    torch.sigmoid(gates, out=act_out)
    torch.tanh(gates[..., 2 * hidden:3 * hidden], out=act_out[..., 2 * hidden:3 * hidden])
    i, f, g, o = act_out.chunk(4, dim=-1)
    torch.addcmul(f * c_prev, i, g, out=c_out)
    torch.mul(o, torch.tanh(c_out), out=h_out)


def _cell_backward_eager(act: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor, dh: torch.Tensor,
                         dc: torch.Tensor, dgates_out: torch.Tensor) -> torch.Tensor:
    """Writes d gates (..., 4H) into `dgates_out` and returns d c_prev, from the saved activations."""
    hidden = c.shape[-1]
    i, f, g, o = act.chunk(4, dim=-1)
    tanh_c = torch.tanh(c)
    dh = dh.to(c.dtype)
    dc = torch.addcmul(dc, dh * o, 1 - tanh_c * tanh_c)
    # d gate = (what multiplies the gate) * (its activation's derivative): a(1-a), or 1-g^2 for tanh.
    upstream = torch.empty_like(act)
    for index, (a, b) in enumerate(((dc, g), (dc, c_prev), (dc, i), (dh, tanh_c))):
        torch.mul(a, b, out=upstream[..., index * hidden:(index + 1) * hidden])
    derivative = torch.addcmul(act, act, act, value=-1)
    torch.addcmul(torch.ones_like(g), g, g, value=-1, out=derivative[..., 2 * hidden:3 * hidden])
    torch.mul(upstream, derivative, out=dgates_out)
    return dc * f


# --------------------------------------------------------------------------------------
# Autotune configs (rows x hidden units per program, and the reduction chunk: BLOCK_D over
# the H inputs forward, BLOCK_N over the 4H gates backward). Each program owns a block of
# hidden units and all four of their gates, so the cell update runs in the recurrent product's
# epilogue. The paper's LSTM in the parallel schedule has K x B = 120 rows of 500 units: small
# tiles give enough programs to spread over the GPU. The interpreter cannot time configs and
# its cost grows with the number of programs, so it gets one large tile.
# --------------------------------------------------------------------------------------
def _config(block_r: int, block_h: int, block_k: int, warps: int, stages: int, reduce: str) -> triton.Config:
    return triton.Config({"BLOCK_R": block_r, "BLOCK_H": block_h, reduce: block_k}, num_warps=warps,
                         num_stages=stages)


STEP_FWD_CONFIGS = [_config(16, 32, 64, 4, 3, "BLOCK_D"), _config(32, 32, 64, 4, 3, "BLOCK_D"),
                    _config(32, 64, 32, 4, 3, "BLOCK_D"), _config(64, 64, 32, 8, 3, "BLOCK_D")]
STEP_BWD_CONFIGS = [_config(16, 32, 64, 4, 3, "BLOCK_N"), _config(32, 32, 64, 4, 3, "BLOCK_N"),
                    _config(32, 64, 64, 4, 3, "BLOCK_N"), _config(64, 64, 32, 8, 3, "BLOCK_N")]
_INTERPRETER_FWD = _config(64, 64, 64, 4, 1, "BLOCK_D")
_INTERPRETER_BWD = _config(64, 64, 64, 4, 1, "BLOCK_N")


# --------------------------------------------------------------------------------------
# Triton kernels: one launch per time step each way.
# --------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: libdevice's tanh has no CPU-interpreter implementation. Exact at the
    # saturated ends; near 0 its absolute error is about float32's epsilon.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _row_offsets(rows, B, stride_a, stride_b, ALIGN: tl.constexpr):
    """Offsets of rows (a, b) = (row // B, row % B) as a column, each a multiple of ALIGN."""
    return tl.multiple_of(((rows // B) * stride_a + (rows % B) * stride_b)[:, None], [ALIGN, ALIGN])


# SAVE (training or evaluation windows) and DOT_PRECISION (TF32 or IEEE) may favour different tiles.
@triton.autotune(configs=rank1.active_configs(STEP_FWD_CONFIGS, _INTERPRETER_FWD), key=["R", "B", "H", "SAVE", "DOT_PRECISION"])
@triton.jit
def _lstm_step_fwd_kernel(
    xg_ptr, h_ptr, c_prev_ptr, w_ptr, r_ptr, s_ptr, h_out_ptr, c_ptr, act_ptr,
    R, B, H,
    stride_xa, stride_xb, stride_ha, stride_hb, stride_ca, stride_cb, stride_oa, stride_ob,
    SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One step: gates = x_gates + ((h * s_k) @ W_hhᵀ) * r_k for this program's rows and units
    (four accumulators, one per gate), then the cell update on them in float32.

    Row `row` is (member, stream) = (row // B, row % B), so a tile may span members: s and r
    are gathered per row. h goes straight into its time step of the (K, B, T, H) output; c and
    the activations (when SAVE) into the step's own contiguous buffers.
    """
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = rows < R
    mask_u = tl.max_constancy(units < H, [ALIGN])
    member = rows // B

    h_ptrs = h_ptr + _row_offsets(rows, B, stride_ha, stride_hb, ALIGN) + offs_d[None, :]
    s_ptrs = s_ptr + tl.multiple_of(member[:, None] * H, [ALIGN, ALIGN]) + offs_d[None, :]
    # (BLOCK_D, BLOCK_H) tiles of W_hhᵀ for the input gate; the others start H x H further on.
    wt_ptrs = w_ptr + tl.multiple_of(units[None, :] * H, [ALIGN, ALIGN]) + offs_d[:, None]
    gate_step = H * H
    acc_i = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, H, BLOCK_D):
        mask_d = tl.max_constancy(offs_d < H - d0, [ALIGN])
        mask_rd = mask_r[:, None] & mask_d[None, :]
        h = tl.load(h_ptrs, mask=mask_rd, other=0.0)
        s = tl.load(s_ptrs, mask=mask_rd, other=0.0)
        hs = (h.to(tl.float32) * s.to(tl.float32)).to(w_ptr.dtype.element_ty)
        mask_w = mask_d[:, None] & mask_u[None, :]
        acc_i = mma(hs, tl.load(wt_ptrs, mask=mask_w, other=0.0), acc_i, DOT_PRECISION, UPCAST)
        acc_f = mma(hs, tl.load(wt_ptrs + gate_step, mask=mask_w, other=0.0), acc_f, DOT_PRECISION, UPCAST)
        acc_g = mma(hs, tl.load(wt_ptrs + 2 * gate_step, mask=mask_w, other=0.0), acc_g, DOT_PRECISION,
                           UPCAST)
        acc_o = mma(hs, tl.load(wt_ptrs + 3 * gate_step, mask=mask_w, other=0.0), acc_o, DOT_PRECISION,
                           UPCAST)
        h_ptrs += BLOCK_D
        s_ptrs += BLOCK_D
        wt_ptrs += BLOCK_D

    mask = mask_r[:, None] & mask_u[None, :]
    xg = xg_ptr + _row_offsets(rows, B, stride_xa, stride_xb, ALIGN) + units[None, :]
    rg = r_ptr + member[:, None] * (4 * H) + units[None, :]
    i = tl.sigmoid(tl.load(xg, mask=mask).to(tl.float32) + acc_i * tl.load(rg, mask=mask).to(tl.float32))
    f = tl.sigmoid(tl.load(xg + H, mask=mask).to(tl.float32) + acc_f * tl.load(rg + H, mask=mask).to(tl.float32))
    g = _tanh(tl.load(xg + 2 * H, mask=mask).to(tl.float32) + acc_g * tl.load(rg + 2 * H, mask=mask).to(tl.float32))
    o = tl.sigmoid(tl.load(xg + 3 * H, mask=mask).to(tl.float32) + acc_o * tl.load(rg + 3 * H, mask=mask).to(tl.float32))
    c_prev = tl.load(c_prev_ptr + _row_offsets(rows, B, stride_ca, stride_cb, 1) + units[None, :], mask=mask)
    c = f * c_prev.to(tl.float32) + i * g
    h = o * _tanh(c)
    tl.store(h_out_ptr + _row_offsets(rows, B, stride_oa, stride_ob, ALIGN) + units[None, :],
             h.to(h_out_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + rows[:, None] * H + units[None, :], c, mask=mask)
    if SAVE:
        act = act_ptr + rows[:, None] * (4 * H) + units[None, :]
        tl.store(act, i, mask=mask)
        tl.store(act + H, f, mask=mask)
        tl.store(act + 2 * H, g, mask=mask)
        tl.store(act + 3 * H, o, mask=mask)


@triton.autotune(configs=rank1.active_configs(STEP_BWD_CONFIGS, _INTERPRETER_BWD),
                 key=["R", "B", "H", "RECURRENT", "DOT_PRECISION"])
@triton.jit
def _lstm_step_bwd_kernel(
    dgn_ptr, dh_ptr, w_ptr, r_ptr, s_ptr, dout_ptr, dc_ptr, act_ptr, c_prev_ptr, c_ptr, dgates_ptr, dc_prev_ptr,
    R, B, H,
    stride_na, stride_nb, stride_oa, stride_ob, stride_ca, stride_cb, stride_ga, stride_gb,
    RECURRENT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One step back: dh = dout_t + (RECURRENT: ((dgates_{t+1} * r_k) @ W_hh) * s_k, else the
    gradient of the window's last h), then the cell's gradient for this program's rows and
    units: d gates into their time step of the (K, B, T, 4H) gradient, d c_prev to its buffer.
    """
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_r = rows < R
    mask_u = tl.max_constancy(units < H, [ALIGN])
    mask = mask_r[:, None] & mask_u[None, :]
    member = rows // B
    cell = rows[:, None] * H + units[None, :]

    if RECURRENT:
        offs_n = tl.arange(0, BLOCK_N)
        dg_ptrs = dgn_ptr + _row_offsets(rows, B, stride_na, stride_nb, ALIGN) + offs_n[None, :]
        r_ptrs = r_ptr + tl.multiple_of(member[:, None] * (4 * H), [ALIGN, ALIGN]) + offs_n[None, :]
        w_ptrs = w_ptr + tl.multiple_of(offs_n[:, None] * H, [ALIGN, ALIGN]) + units[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        for n0 in range(0, 4 * H, BLOCK_N):
            mask_n = tl.max_constancy(offs_n < 4 * H - n0, [ALIGN])
            mask_rn = mask_r[:, None] & mask_n[None, :]
            dg = tl.load(dg_ptrs, mask=mask_rn, other=0.0)
            r = tl.load(r_ptrs, mask=mask_rn, other=0.0)
            dgr = (dg.to(tl.float32) * r.to(tl.float32)).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_u[None, :], other=0.0)
            acc = mma(dgr, w, acc, DOT_PRECISION, UPCAST)
            dg_ptrs += BLOCK_N
            r_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * H
        s = tl.load(s_ptr + member[:, None] * H + units[None, :], mask=mask, other=0.0)
        dh = acc * s.to(tl.float32)
    else:
        dh = tl.load(dh_ptr + cell, mask=mask).to(tl.float32)

    dh += tl.load(dout_ptr + _row_offsets(rows, B, stride_oa, stride_ob, 1) + units[None, :], mask=mask).to(tl.float32)
    gate = rows[:, None] * (4 * H) + units[None, :]
    i = tl.load(act_ptr + gate, mask=mask)
    f = tl.load(act_ptr + gate + H, mask=mask)
    g = tl.load(act_ptr + gate + 2 * H, mask=mask)
    o = tl.load(act_ptr + gate + 3 * H, mask=mask)
    tanh_c = _tanh(tl.load(c_ptr + cell, mask=mask))
    dc = tl.load(dc_ptr + cell, mask=mask) + dh * o * (1.0 - tanh_c * tanh_c)
    c_prev = tl.load(c_prev_ptr + _row_offsets(rows, B, stride_ca, stride_cb, 1) + units[None, :], mask=mask)
    out_ty = dgates_ptr.dtype.element_ty
    dgates = dgates_ptr + _row_offsets(rows, B, stride_ga, stride_gb, ALIGN) + units[None, :]
    tl.store(dgates, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
    tl.store(dgates + H, (dc * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
    tl.store(dgates + 2 * H, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
    tl.store(dgates + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(out_ty), mask=mask)
    tl.store(dc_prev_ptr + cell, dc * f, mask=mask)


# --------------------------------------------------------------------------------------
# The steps of the recurrence, in Triton and in eager PyTorch (same signatures).
# --------------------------------------------------------------------------------------
def _grid(meta, rows: int, hidden: int):
    return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(hidden, meta["BLOCK_H"])


class _TritonSteps:
    """One launch per time step each way; the gradient of h0 takes one more (rank1's dx kernel)."""

    @staticmethod
    def forward(x_gates, h, c_prev, weight, r, s, h_out, c_out, act_out) -> None:
        members, batch, hidden = c_prev.shape
        rows = members * batch
        act = act_out if act_out is not None else c_out  # any valid pointer; SAVE=False never writes it
        _lstm_step_fwd_kernel[lambda meta: _grid(meta, rows, hidden)](
            x_gates, h, c_prev, weight, r, s, h_out, c_out, act, rows, batch, hidden,
            x_gates.stride(0), x_gates.stride(1), h.stride(0), h.stride(1), c_prev.stride(0), c_prev.stride(1),
            h_out.stride(0), h_out.stride(1),
            SAVE=act_out is not None,
            ALIGN=rank1.alignment(hidden, *x_gates.stride()[:2], *h.stride()[:2], *h_out.stride()[:2]),
            **rank1.dot_args(x_gates.dtype),
        )

    @staticmethod
    def backward(dout, dh_last, dgates_next, dc, act, c_prev, c, weight, r, s, dgates_out) -> torch.Tensor:
        members, batch, hidden = c.shape
        rows = members * batch
        dc_prev = rank1.output_buffer(c.shape, torch.float32, c.device)
        recurrent = dgates_next is not None
        # Any valid pointer stands in for the operand the branch does not read.
        dgn = dgates_next if recurrent else dgates_out
        dh = dc if recurrent else dh_last.contiguous()
        _lstm_step_bwd_kernel[lambda meta: _grid(meta, rows, hidden)](
            dgn, dh, weight, r, s, dout, dc, act, c_prev, c, dgates_out, dc_prev, rows, batch, hidden,
            dgn.stride(0), dgn.stride(1), dout.stride(0), dout.stride(1), c_prev.stride(0), c_prev.stride(1),
            dgates_out.stride(0), dgates_out.stride(1),
            RECURRENT=recurrent,
            ALIGN=rank1.alignment(hidden, *dgn.stride()[:2], *dgates_out.stride()[:2]),
            **rank1.dot_args(dout.dtype),
        )
        return dc_prev

    @staticmethod
    def recurrent_grad(dgates, weight, r, s) -> torch.Tensor:
        return rank1.backward_dx(dgates, weight, r, s, shared=False)

    @staticmethod
    def param_grads(h_prev, dgates, weight, r, s):
        dw, dr, ds, _ = rank1.backward_params(h_prev, dgates, weight, r, s, None, shared=False)
        return dw, dr, ds


class _EagerSteps:
    """The same steps in PyTorch ops, writing into the same buffers."""

    @staticmethod
    def forward(x_gates, h, c_prev, weight, r, s, h_out, c_out, act_out) -> None:
        gates = torch.addcmul(x_gates, torch.matmul(h * s.unsqueeze(-2), weight.t()), r.unsqueeze(-2))
        gates = gates.to(c_out.dtype)
        _cell_eager(gates, c_prev, h_out, c_out, act_out if act_out is not None else torch.empty_like(gates))

    @staticmethod
    def backward(dout, dh_last, dgates_next, dc, act, c_prev, c, weight, r, s, dgates_out) -> torch.Tensor:
        dh = dh_last if dgates_next is None else _EagerSteps.recurrent_grad(dgates_next, weight, r, s)
        return _cell_backward_eager(act, c_prev, c, dout + dh, dc, dgates_out)

    @staticmethod
    def recurrent_grad(dgates, weight, r, s) -> torch.Tensor:
        """d h_{t-1} from step t's d gates: ((dgates * r_k) @ W) * s_k."""
        return torch.matmul(dgates * r.unsqueeze(-2), weight) * s.unsqueeze(-2)

    @staticmethod
    def param_grads(h_prev, dgates, weight, r, s):
        # dL/dW_k for each member's folded W_k = W * r_k s_kᵀ (one batched matmul over all
        # steps), then the chain rule through the fold: K x 4H x H elementwise, no pass over rows.
        member_grads = torch.bmm(dgates.transpose(1, 2), h_prev)
        through_weight = member_grads * weight
        dr = torch.bmm(through_weight, s.unsqueeze(-1)).squeeze(-1)
        ds = torch.bmm(through_weight.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)
        dw = member_grads.mul_(r.unsqueeze(-1)).mul_(s.unsqueeze(-2)).sum(dim=0)
        return dw, dr, ds


_STEPS = {"triton": _TritonSteps, "eager": _EagerSteps}


# --------------------------------------------------------------------------------------
# A window forward and backward, as plain functions of tensors (the autograd Function and
# the CUDA graphs below both run them).
# --------------------------------------------------------------------------------------
def _forward_window(steps, save: bool, x_gates, weight, r, s, h0, c0) -> list[torch.Tensor]:
    """[out, c_T] without `save`; [out, c_0 .. c_T, act_0 .. act_{T-1}] with it.

    Each step writes its h straight into the window's output, so nothing is stacked
    afterwards. Cells and gate activations are kept per step: on CPU, buffers under glibc's
    mmap threshold (32 MB) come back from the heap already mapped, while a fresh whole-window
    buffer page-faults on every write (on the paper LSTM, 120 ms of a 700 ms forward + backward).
    """
    members, batch, length, gates = x_gates.shape
    alloc = lambda shape, dtype: rank1.output_buffer(shape, dtype, x_gates.device)
    out = alloc((members, batch, length, gates // 4), x_gates.dtype)
    h, cells, acts = h0, [c0], []
    for t in range(length):
        c = alloc(c0.shape, c0.dtype)
        act = alloc((members, batch, gates), c0.dtype) if save else None
        steps.forward(x_gates[:, :, t], h, cells[-1], weight, r, s, out[:, :, t], c, act)
        h = out[:, :, t]
        if save:
            cells.append(c)
            acts.append(act)
        else:  # without a backward to feed, only the latest cell is kept
            cells = [c]
    return [out, *cells, *acts]


def _backward_window(steps, param_grads: bool, weight, r, s, h0, out, *per_step_and_grads):
    """[d x_gates, dW, dr, ds, d h0, d c0] (the weight gradients None without `param_grads`)
    from the saved window and the gradients of (out, h_T, c_T)."""
    length = out.shape[2]
    cells, acts = per_step_and_grads[:length + 1], per_step_and_grads[length + 1:2 * length + 1]
    dout, dh, dc = per_step_and_grads[2 * length + 1:]
    dgates = rank1.output_buffer((*out.shape[:3], acts[0].shape[-1]), out.dtype, out.device)
    dc = dc.to(cells[0].dtype).contiguous()
    # The loss's gradient may arrive in any layout (the parallel schedule regroups rows);
    # one copy makes every step's slice a cheap strided read.
    dout = dout.contiguous()
    for t in reversed(range(length)):
        # d h_t comes from step t + 1's d gates, or at the last step from the caller.
        dgates_next = dgates[:, :, t + 1] if t + 1 < length else None
        dc = steps.backward(dout[:, :, t], dh, dgates_next, dc, acts[t], cells[t], cells[t + 1], weight, r, s,
                            dgates[:, :, t])
    dh = steps.recurrent_grad(dgates[:, :, 0], weight, r, s)
    dw = dr = ds = None
    if param_grads:
        h_prev = torch.cat([h0.unsqueeze(2), out[:, :, :-1]], dim=2)
        dw, dr, ds = steps.param_grads(h_prev.flatten(1, 2), dgates.flatten(1, 2), weight, r, s)
        dw, dr, ds = dw.to(weight.dtype), dr.to(r.dtype), ds.to(s.dtype)
    return [dgates, dw, dr, ds, dh, dc]


# --------------------------------------------------------------------------------------
# CUDA graphs of whole windows.
# --------------------------------------------------------------------------------------
def _capture(run: Callable[[], list]) -> tuple[Callable[[], None], list]:
    """Record `run` (which reads fixed input buffers) as a CUDA graph: (replay, its outputs).
    The tests swap in an emulation, since capturing needs a GPU."""
    graph = torch.cuda.CUDAGraph()
    # Other threads (data loading, DDP's communication, autograd's workers) may call CUDA during
    # a capture: only this thread's capture-unsafe calls are errors. The capture stream is made
    # here, on the current device: torch's default one is created once, on the first device used.
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
        outputs = run()
    return graph.replay, outputs


class _WindowGraph:
    """One window's forward and backward loops as CUDA graphs, for one set of shapes.

    On a GPU a window's 2T + 1 small launches cost more on the host (the Python launcher and
    the autotuner's dispatch, each call) than on the device; a graph replays them all in one
    host call. A graph reads and writes fixed buffers: inputs are copied in, outputs cloned
    out, and the activations a backward needs stay in the graph's buffers, so a graph holds
    one window at a time, from a forward that saves until its backward, or until the autograd
    graph holding it is freed (`holder` is a weak reference to a token the autograd context
    keeps). Each loop runs once outside a capture first, on the same buffers (inputs and
    incoming gradients alike), so that every kernel compiles and autotunes (which times it) for
    exactly the pointers and strides the capture will see. Both loops are captured in a
    forward, on the caller's thread: a backward runs on autograd's worker thread, which only
    replays. After its backward a window's activations stay in place until the graph's next
    window, so a second backward (retain_graph=True) works until then.
    """

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        self.inputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
        self.grads: list[torch.Tensor] = []  # the gradients of (out, h_T, c_T), from the first backward
        self.holder: Callable[[], object] = lambda: None
        self.released = True  # the held window has had its backward: the graph may take another
        self.saved: list[torch.Tensor] = []
        self.forward_graph: tuple | None = None  # (replay, outputs)
        self.forward_warm = False
        self.backward_graphs: dict[bool, tuple] = {}  # param_grads -> (replay, outputs)
        self.backward_warm: set[bool] = set()

    def busy(self) -> bool:
        return not self.released and self.holder() is not None

    def forward(self, steps, save: bool, param_grads: bool,
                inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        """This window's [out, cells..., acts...] (in the graph's buffers), and a token that holds them."""
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        if not self.forward_warm:
            self.forward_warm = True
            outputs = _forward_window(steps, save, *self.inputs)
        else:
            if self.forward_graph is None:
                self.forward_graph = _capture(lambda: _forward_window(steps, save, *self.inputs))
            replay, outputs = self.forward_graph
            if save and param_grads in self.backward_warm and param_grads not in self.backward_graphs:
                self._capture_backward(steps, param_grads, outputs)
            replay()
        token = torch.empty(0)
        if save:
            self.saved, self.holder, self.released = outputs, weakref.ref(token), False
        return outputs, token

    def _capture_backward(self, steps, param_grads: bool, outputs: list[torch.Tensor]) -> None:
        saved = [*self.inputs[1:5], *outputs]
        replay, results = _capture(lambda: _backward_window(steps, param_grads, *saved, *self.grads))
        self.backward_graphs[param_grads] = replay, results

    def backward(self, steps, token: object, param_grads: bool, grads: list[torch.Tensor]) -> list:
        """The gradients of the window this graph holds for `token`."""
        if self.holder() is not token:
            raise RuntimeError("rank1_lstm: this window's CUDA graph has run a later window since, so its "
                               "activations are gone; a second backward through a window (retain_graph=True) "
                               "needs cuda_graphs=False (config: model.lstm_cuda_graphs=false)")
        if not self.grads:
            self.grads = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
        for static, g in zip(self.grads, grads):
            static.copy_(g)
        graph = self.backward_graphs.get(param_grads)
        if graph is not None:  # captured by an earlier forward, from this graph's buffers
            replay, outputs = graph
            replay()
            result = [None if g is None else g.clone() for g in outputs]
        else:
            self.backward_warm.add(param_grads)
            result = _backward_window(steps, param_grads, *self.inputs[1:5], *self.saved, *self.grads)
        self.released = True
        return result


# Graphs of one set of shapes that may hold windows at once (an LSTM's layers of equal sizes
# all wait for their backward together); a window finding them all busy runs without one.
GRAPHS_PER_SHAPE = 8
# Sets of shapes remembered at once. A graph keeps its inputs and outputs (at the paper's size,
# a K=10 ensemble window's input projections alone are 768 MB), so the least recently used
# set is forgotten when a new one comes (a window waiting for its backward holds its graph).
MAX_SHAPES = 8


class _WindowGraphs:
    """Every set of shapes' graphs, most recently used last.

    A set of shapes gets graphs from its second window on: the first runs without one, so a
    shape that comes once (a split's last, shorter evaluation window) holds no buffers.
    """

    def __init__(self) -> None:
        self.by_shape: dict[tuple, list[_WindowGraph]] = {}

    def acquire(self, impl: str, save: bool, inputs: list[torch.Tensor]) -> _WindowGraph | None:
        # float32 dots follow torch's TF32 setting when a graph is captured (rank1.dot_args). A
        # graph's buffers are reused in the order of one stream's work, so each stream has its own.
        stream = torch.cuda.current_stream(inputs[0].device).cuda_stream if inputs[0].is_cuda else None
        key = (impl, save, rank1.tf32_matmuls(), stream, *((t.shape, t.dtype, t.device) for t in inputs))
        graphs = self.by_shape.pop(key, None)
        if graphs is None:
            self.by_shape[key] = []
            while len(self.by_shape) > MAX_SHAPES:
                del self.by_shape[next(iter(self.by_shape))]
            return None
        self.by_shape[key] = graphs
        free = next((g for g in graphs if not g.busy()), None)
        if free is None and len(graphs) < GRAPHS_PER_SHAPE:
            free = _WindowGraph(inputs)
            graphs.append(free)
        return free


_GRAPHS = _WindowGraphs()


class Rank1LSTMFunction(torch.autograd.Function):
    """The window's recurrence forward, and backpropagation through time by hand, each run
    directly or (`graphed`) through a `_WindowGraph`. The weight gradients are computed once,
    after the backward loop, from all steps."""

    @staticmethod
    def forward(ctx, x_gates, weight, r, s, h0, c0, impl: str, save: bool, graphed: bool):
        steps = _STEPS[impl]
        inputs = [x_gates, weight, r, s, h0, c0]
        graph = _GRAPHS.acquire(impl, save, inputs) if graphed else None
        if graph is None:
            outputs, token = _forward_window(steps, save, *inputs), None
        else:
            outputs, token = graph.forward(steps, save, any(ctx.needs_input_grad[1:4]), inputs)
        out, c = outputs[0], outputs[1 + x_gates.shape[2] if save else 1]
        if save:
            ctx.steps, ctx.graph, ctx.token = steps, graph, token
            if graph is None:
                ctx.save_for_backward(weight, r, s, h0, *outputs)
        # A graph's buffers are rewritten by its next window: the caller gets copies.
        return out if graph is None else out.clone(), out[:, :, -1].clone(), c.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh, dc):
        param_grads = any(ctx.needs_input_grad[1:4])
        if ctx.graph is None:
            grads = _backward_window(ctx.steps, param_grads, *ctx.saved_tensors, dout, dh, dc)
        else:
            grads = ctx.graph.backward(ctx.steps, ctx.token, param_grads, [dout, dh, dc])
        return (*grads, None, None, None)


# --------------------------------------------------------------------------------------
# Dispatcher.
# --------------------------------------------------------------------------------------
def _validate(x_gates, weight, r, s, h0, c0) -> None:
    tensors = (("x_gates", x_gates), ("weight", weight), ("r", r), ("s", s), ("h0", h0), ("c0", c0))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"rank1_lstm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise ValueError(f"rank1_lstm: {name} has dtype {t.dtype}; use float32, bfloat16 or float16")
        if t.device != x_gates.device:
            raise ValueError(f"rank1_lstm: {name} is on {t.device} but x_gates is on {x_gates.device}; use one device")
    if x_gates.dim() != 4 or x_gates.shape[-1] % 4:
        raise ValueError(f"rank1_lstm: x_gates must be (K, B, T, 4H), got shape {tuple(x_gates.shape)}")
    members, batch, steps, gates = x_gates.shape
    if steps < 1:
        raise ValueError("rank1_lstm: x_gates has no time steps (T = 0); pass a window of at least one step")
    hidden = gates // 4
    expected = {"weight": (gates, hidden), "r": (members, gates), "s": (members, hidden),
                "h0": (members, batch, hidden), "c0": (members, batch, hidden)}
    for name, t in tensors[1:]:
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"rank1_lstm: {name} must be {expected[name]} for x_gates of shape "
                             f"{tuple(x_gates.shape)}, got {tuple(t.shape)}")
    for name, t in tensors[1:5]:
        if t.dtype != x_gates.dtype:
            raise ValueError(f"rank1_lstm: {name} has dtype {t.dtype} but x_gates has {x_gates.dtype}; use one dtype")


def rank1_lstm(x_gates: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
               h0: torch.Tensor, c0: torch.Tensor, *, impl: str = "auto",
               cuda_graphs: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over a window for all K members: member k's recurrent matrix is weight * (r_k s_kᵀ).

    x_gates: (K, B, T, 4H), the input projections with both biases added (nn.LSTM's i, f, g, o
    order); weight: (4H, H); r: (K, 4H); s: (K, H); h0, c0: (K, B, H).
    Returns out (K, B, T, H) and h_T in the gates' dtype, c_T (K, B, H) in float32 (float64 for
    float64 inputs). Differentiable in every tensor argument.
    impl: "triton" (kernels), "eager" (PyTorch ops), "auto" (triton on CUDA tensors or under
    TRITON_INTERPRET=1, eager otherwise). float64 runs with "eager" only. Under autocast every
    input but c0 is cast to the autocast dtype first.
    cuda_graphs: with impl "triton" on CUDA, replay each window's launches from a CUDA graph per
    set of shapes (captured at the third window of those shapes; see `_WindowGraphs`).
    """
    if impl not in IMPLS:
        raise ValueError(f"rank1_lstm: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if isinstance(x_gates, torch.Tensor) and torch.is_autocast_enabled(x_gates.device.type):
        dtype = torch.get_autocast_dtype(x_gates.device.type)
        cast = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x_gates, weight, r, s, h0)]
        with torch.autocast(x_gates.device.type, enabled=False):
            return rank1_lstm(*cast, c0, impl=impl, cuda_graphs=cuda_graphs)
    if isinstance(c0, torch.Tensor) and isinstance(x_gates, torch.Tensor) and c0.is_floating_point():
        # The cell runs in float32 (float64 for float64 gates) whatever the gates' dtype.
        c0 = c0.to(torch.promote_types(x_gates.dtype, torch.float32))
    _validate(x_gates, weight, r, s, h0, c0)
    impl = resolve_impl("rank1_lstm", impl, x_gates)
    # Activations are kept for a backward only when one can follow.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_gates, weight, r, s, h0, c0))
    # The kernels read rows of x_gates, h0 and c0 through their (K, B) strides but need unit
    # stride along the last dim; weight, r and s they index as contiguous.
    x_gates, h0, c0 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_gates, h0, c0))
    weight, r, s = (t.contiguous() for t in (weight, r, s))
    graphed = cuda_graphs and impl == "triton" and x_gates.is_cuda
    # Triton launches and graph captures go to the current device (autograd's backward sets it).
    with rank1.on_device(x_gates.device):
        return Rank1LSTMFunction.apply(x_gates, weight, r, s, h0, c0, impl, save, graphed)
