"""One LSTM time step's pointwise update, fused: gates -> (h, c) for every row at once.

    gates = x_gates + h_gates                    (nn.LSTM's order: i, f, g, o along the last dim)
    c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)

The LSTM's all-members path (lm/models/lstm.py, "fused") runs a Python loop over time steps:
one kernels.rank1_linear call for every member's recurrent product, then this update. In
eager PyTorch the update is about ten elementwise kernels forward and twenty backward per
step; here it is one launch each way, with the gate activations kept in float32 for the
backward. Layout as in kernels/rank1.py: eager reference, Triton kernels, autograd Function
and the dispatcher `lstm_cell` side by side; `python -m kernels.compile_check` compiles both
kernels for sm_90 and sm_80.

Rows are (A, B) pairs of the leading dims, so a time step sliced out of a (K, B, T, 4H)
tensor is read in place through its two row strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import rank1
from kernels.rank1 import IMPLS, SUPPORTED_DTYPES, interpreting


# --------------------------------------------------------------------------------------
# Eager reference.
# --------------------------------------------------------------------------------------
def lstm_cell_eager(x_gates: torch.Tensor, h_gates: torch.Tensor,
                    c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h in the gates' dtype, c in at least float32) from (..., 4H) gates and a (..., H) cell."""
    cell_dtype = torch.promote_types(x_gates.dtype, torch.float32)
    i, f, g, o = (x_gates + h_gates).to(cell_dtype).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c_prev.to(cell_dtype) + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h.to(x_gates.dtype), c


# --------------------------------------------------------------------------------------
# Autotune configs (rows x hidden units per program). The interpreter cannot time configs and
# its cost grows with the number of programs, so it gets one large tile.
# --------------------------------------------------------------------------------------
def _config(block_r: int, block_h: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_R": block_r, "BLOCK_H": block_h}, num_warps=warps)


CELL_CONFIGS = [_config(4, 256, 4), _config(8, 128, 4), _config(16, 64, 4), _config(32, 128, 8)]
INTERPRETER_CONFIG = _config(64, 128, 4)
_KEY = ["R", "H"]


def _active_configs() -> list[triton.Config]:
    return [INTERPRETER_CONFIG] if interpreting() else CELL_CONFIGS


# --------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: libdevice's tanh has no CPU-interpreter implementation. Exact at the
    # saturated ends; near 0 its absolute error is about float32's epsilon.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _row_offsets(rows, B, stride_a, stride_b):
    return (rows // B) * stride_a + (rows % B) * stride_b


@triton.autotune(configs=_active_configs(), key=_KEY)
@triton.jit
def _lstm_cell_fwd_kernel(
    xg_ptr, hg_ptr, c_prev_ptr, h_ptr, c_ptr, act_ptr,
    R, B, H,
    stride_xa, stride_xb, stride_ha, stride_hb, stride_ca, stride_cb,
    SAVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    xg = xg_ptr + _row_offsets(rows, B, stride_xa, stride_xb)[:, None] + cols[None, :]
    hg = hg_ptr + _row_offsets(rows, B, stride_ha, stride_hb)[:, None] + cols[None, :]
    i = tl.sigmoid(tl.load(xg, mask=mask).to(tl.float32) + tl.load(hg, mask=mask).to(tl.float32))
    f = tl.sigmoid(tl.load(xg + H, mask=mask).to(tl.float32) + tl.load(hg + H, mask=mask).to(tl.float32))
    g = _tanh(tl.load(xg + 2 * H, mask=mask).to(tl.float32) + tl.load(hg + 2 * H, mask=mask).to(tl.float32))
    o = tl.sigmoid(tl.load(xg + 3 * H, mask=mask).to(tl.float32) + tl.load(hg + 3 * H, mask=mask).to(tl.float32))
    c_prev = tl.load(c_prev_ptr + _row_offsets(rows, B, stride_ca, stride_cb)[:, None] + cols[None, :], mask=mask)
    c = f * c_prev.to(tl.float32) + i * g
    h = o * _tanh(c)
    out = rows[:, None] * H + cols[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + out, c, mask=mask)
    if SAVE:
        act = act_ptr + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(act, i, mask=mask)
        tl.store(act + H, f, mask=mask)
        tl.store(act + 2 * H, g, mask=mask)
        tl.store(act + 3 * H, o, mask=mask)


@triton.autotune(configs=_active_configs(), key=_KEY)
@triton.jit
def _lstm_cell_bwd_kernel(
    dh_ptr, dc_ptr, act_ptr, c_prev_ptr, c_ptr, dgates_ptr, dc_prev_ptr,
    R, H,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    cell = rows[:, None] * H + cols[None, :]
    gate = rows[:, None] * (4 * H) + cols[None, :]
    i = tl.load(act_ptr + gate, mask=mask)
    f = tl.load(act_ptr + gate + H, mask=mask)
    g = tl.load(act_ptr + gate + 2 * H, mask=mask)
    o = tl.load(act_ptr + gate + 3 * H, mask=mask)
    tanh_c = _tanh(tl.load(c_ptr + cell, mask=mask))
    dh = tl.load(dh_ptr + cell, mask=mask).to(tl.float32)
    dc = tl.load(dc_ptr + cell, mask=mask) + dh * o * (1.0 - tanh_c * tanh_c)
    c_prev = tl.load(c_prev_ptr + cell, mask=mask)
    out_ty = dgates_ptr.dtype.element_ty
    tl.store(dgates_ptr + gate, (dc * g * i * (1.0 - i)).to(out_ty), mask=mask)
    tl.store(dgates_ptr + gate + H, (dc * c_prev * f * (1.0 - f)).to(out_ty), mask=mask)
    tl.store(dgates_ptr + gate + 2 * H, (dc * i * (1.0 - g * g)).to(out_ty), mask=mask)
    tl.store(dgates_ptr + gate + 3 * H, (dh * tanh_c * o * (1.0 - o)).to(out_ty), mask=mask)
    tl.store(dc_prev_ptr + cell, dc * f, mask=mask)


# --------------------------------------------------------------------------------------
# Launchers and the autograd Function.
# --------------------------------------------------------------------------------------
def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 3-D (A, B, width) view with unit stride along width (a copy only where none exists)."""
    t = t.unsqueeze(0) if t.dim() == 2 else t.reshape(-1, *t.shape[-2:]) if t.dim() > 3 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(meta, rows: int, hidden: int):
    return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(hidden, meta["BLOCK_H"])


class LSTMCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_gates, h_gates, c_prev, save: bool):
        xg, hg, cp = _as_rows(x_gates), _as_rows(h_gates), _as_rows(c_prev.float())
        batch, hidden = xg.shape[1], c_prev.shape[-1]
        rows = xg.shape[0] * batch
        h = rank1.output_buffer((rows, hidden), x_gates.dtype, x_gates.device)
        c = rank1.output_buffer((rows, hidden), torch.float32, x_gates.device)
        act = rank1.output_buffer((rows, 4 * hidden), torch.float32, x_gates.device) if save else c
        _lstm_cell_fwd_kernel[lambda meta: _grid(meta, rows, hidden)](
            xg, hg, cp, h, c, act, rows, batch, hidden,
            xg.stride(0), xg.stride(1), hg.stride(0), hg.stride(1), cp.stride(0), cp.stride(1), SAVE=save,
        )
        if save:
            ctx.save_for_backward(act, cp.reshape(rows, hidden).contiguous(), c)
            ctx.gates_dtype, ctx.c_prev_dtype = x_gates.dtype, c_prev.dtype
        shape = c_prev.shape
        return h.view(shape), c.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dc):
        act, c_prev, c = ctx.saved_tensors
        rows, hidden = c.shape
        dgates = rank1.output_buffer((rows, 4 * hidden), ctx.gates_dtype, c.device)
        dc_prev = rank1.output_buffer((rows, hidden), torch.float32, c.device)
        _lstm_cell_bwd_kernel[lambda meta: _grid(meta, rows, hidden)](
            dh.reshape(rows, hidden).contiguous(), dc.float().reshape(rows, hidden).contiguous(),
            act, c_prev, c, dgates, dc_prev, rows, hidden,
        )
        gates_shape = (*dh.shape[:-1], 4 * hidden)
        dgates = dgates.view(gates_shape)
        return dgates, dgates, dc_prev.view(dh.shape).to(ctx.c_prev_dtype), None


# --------------------------------------------------------------------------------------
# Dispatcher.
# --------------------------------------------------------------------------------------
def _validate(x_gates, h_gates, c_prev) -> None:
    for name, t in (("x_gates", x_gates), ("h_gates", h_gates), ("c_prev", c_prev)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lstm_cell: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise ValueError(f"lstm_cell: {name} has dtype {t.dtype}; use float32, bfloat16 or float16")
        if t.device != x_gates.device:
            raise ValueError(f"lstm_cell: {name} is on {t.device} but x_gates is on {x_gates.device}; use one device")
    if x_gates.dim() < 2 or x_gates.shape[-1] % 4:
        raise ValueError(f"lstm_cell: x_gates must be (..., 4H), got shape {tuple(x_gates.shape)}")
    if h_gates.shape != x_gates.shape:
        raise ValueError(f"lstm_cell: h_gates must have x_gates' shape {tuple(x_gates.shape)}, got {tuple(h_gates.shape)}")
    if h_gates.dtype != x_gates.dtype:
        raise ValueError(f"lstm_cell: h_gates has dtype {h_gates.dtype} but x_gates has {x_gates.dtype}; use one dtype")
    expected = (*x_gates.shape[:-1], x_gates.shape[-1] // 4)
    if tuple(c_prev.shape) != expected:
        raise ValueError(f"lstm_cell: c_prev must be {expected} (the gates' rows, H), got {tuple(c_prev.shape)}")


def lstm_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, c_prev: torch.Tensor, *,
              impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step for every row: gates (..., 4H) in nn.LSTM's (i, f, g, o) order, c_prev (..., H).

    Returns h in the gates' dtype and c in float32 (float64 for float64 inputs), shapes (..., H).
    impl: "triton" (fused kernels), "eager" (the PyTorch reference), "auto" (triton on CUDA
    tensors or under TRITON_INTERPRET=1, eager otherwise). float64 runs with "eager" only.
    Differentiable in all three inputs.
    """
    if impl not in IMPLS:
        raise ValueError(f"lstm_cell: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    _validate(x_gates, h_gates, c_prev)
    if impl == "auto":
        impl = "triton" if (x_gates.is_cuda or interpreting()) and x_gates.dtype != torch.float64 else "eager"
    if impl == "eager":
        return lstm_cell_eager(x_gates, h_gates, c_prev)
    if not (x_gates.is_cuda or interpreting()):
        raise ValueError("lstm_cell: impl='triton' needs CUDA tensors or TRITON_INTERPRET=1; use impl='eager' on CPU")
    if x_gates.dtype == torch.float64:
        raise ValueError("lstm_cell: impl='triton' takes float32, bfloat16 or float16; float64 runs with impl='eager'")
    # The gate activations are kept for a backward only when one can follow.
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_gates, h_gates, c_prev))
    return LSTMCellFunction.apply(x_gates, h_gates, c_prev, save)
