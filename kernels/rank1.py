"""Rank-1 late-phase linear layer for all K members at once.

    out[k] = ((x[k] * s[k]) @ weight.T) * r[k] + bias[k]

Member k's effective weight is W_k = W * (r_k s_kᵀ) (the paper's rank-1 form, as in BatchEnsemble); the kernels never
build it. Layout follows the Triton tutorials: the eager reference, the Triton kernels, the
autograd wrapper and the dispatcher `rank1_linear` live side by side in this file; the
benchmark is `python -m kernels.bench` and the ahead-of-time GPU compile check is
`python -m kernels.compile_check`.

Kernels (each one launch for all members):
  forward  grid (M tiles x d_out tiles, K): s is applied to each x tile as it is loaded, r and
           the bias in the epilogue on the float32 accumulator.
  dx       grid (M tiles x d_in tiles, K), or (.., 1) for shared x: dy tiles are scaled by r
           as loaded and s is applied in the epilogue. For shared x one program loops over
           the members and sums dx_k in registers, so no (K, M, d_in) temporary exists.
  dW/dr/ds grid (d_out tiles x d_in tiles, K x row splits): see `_rank1_dw_kernel`.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.autograd.function import once_differentiable

from kernels.optional_triton import TRITON_INSTALLED, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "eager")
LINEAR_IMPLS = IMPLS + ("folded",)  # rank1_linear also takes the folded form by name


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, Triton installed)."""
    return TRITON_INSTALLED and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes a CUDA tensor's device the current one (Triton launches there), else does nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Eager reference: three PyTorch ops.
# --------------------------------------------------------------------------------------
def rank1_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    r: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch reference: x is (K, M, d_in) or shared (M, d_in); returns (K, M, d_out)."""
    xs = x.unsqueeze(-3) * s.unsqueeze(-2) if x.dim() == 2 else x * s.unsqueeze(-2)
    return _plus_bias(torch.matmul(xs, weight.t()) * r.unsqueeze(-2), bias)


def _plus_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(K, M, d_out) + a (d_out,) or per-member (K, d_out) bias."""
    return out if bias is None else out + (bias.unsqueeze(-2) if bias.dim() == 2 else bias)


# Rows per member from which building each member's weight beats scaling every row by s and r:
# rows * (d_in + d_out) >= FOLD_ROWS_FACTOR * d_in * d_out. Forward + backward on the 2-core CPU
# VM (torch 2.13) crossed over at 2.5-5x the break-even row count d_in*d_out/(d_in+d_out)
# (K=4 128->512, K=8 512->2048, K=10 190->2000 and 500->2000; 128 to 4096 rows per member).
FOLD_ROWS_FACTOR = 4


def rank1_linear_folded(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's result through each member's weight W * (r_k s_kᵀ), built explicitly.

    K x d_out x d_in extra memory, one batched matmul: on CPU cheaper than the reference's
    passes over every row once members have many rows (see FOLD_ROWS_FACTOR)."""
    member_weights = weight * r.unsqueeze(-1) * s.unsqueeze(-2)
    return _plus_bias(torch.matmul(x, member_weights.transpose(-1, -2)), bias)


def folding_pays(rows: int, d_in: int, d_out: int) -> bool:
    """Whether `rank1_linear_folded` beats the row-scaling reference at this many rows per member."""
    return rows * (d_in + d_out) >= FOLD_ROWS_FACTOR * d_in * d_out


# --------------------------------------------------------------------------------------
# Autotune configs. On a GPU several candidates are timed per shape; the CPU interpreter
# cannot time configs, so it gets one config. Its tiles are large because the interpreter's
# cost grows with the number of programs, not with the tile size (a K=4, 256-row,
# 128 -> 512 layer: 3 s forward with 64-wide tiles, 100 s with 16-wide ones).
# --------------------------------------------------------------------------------------
def _config(block_m: int, block_n: int, block_d: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "GROUP": 8},
        num_warps=warps,
        num_stages=stages,
    )


# (BLOCK_M rows, BLOCK_N d_out cols, BLOCK_D d_in cols, warps, stages). The forward reduces
# over d_in (BLOCK_D), dx over d_out (BLOCK_N), dW over rows (BLOCK_M).
FORWARD_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 32, 4, 4),
]
DX_CONFIGS = [
    _config(128, 64, 128, 8, 3),
    _config(64, 64, 128, 4, 4),
    _config(64, 32, 64, 4, 4),
]
DW_CONFIGS = [
    _config(64, 128, 128, 8, 3),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 64, 4, 4),
]
INTERPRETER_CONFIG = _config(64, 64, 64, 4, 1)


def active_configs(gpu_configs: list[triton.Config],
                   interpreter_config: triton.Config = INTERPRETER_CONFIG) -> list[triton.Config]:
    return [interpreter_config] if interpreting() else gpu_configs


# MEMBERS (the grid's second dimension) is an argument only so that it keys the tuning: the best
# tile for K members differs from one member's. TF32 and IEEE dots may favour different tiles.
_KEY = ["M", "N", "D", "MEMBERS", "DOT_PRECISION"]


# --------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Tile coordinates in GROUP-row bands so neighbouring programs share operand tiles in L2."""
    width = GROUP * num_cols
    group_id = pid // width
    first_row = group_id * GROUP
    group_rows = tl.minimum(num_rows - first_row, GROUP)
    row = first_row + (pid % width) % group_rows
    col = (pid % width) // group_rows
    return row, col


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST works around the CPU interpreter (triton 3.9), which multiplies
    bfloat16 operands as their raw uint16 bits: products of bf16 values are exact in float32,
    so the upcast dot gives what the GPU's bf16 dot with float32 accumulation gives."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.autotune(configs=active_configs(FORWARD_CONFIGS), key=_KEY)
@triton.jit
def _rank1_fwd_kernel(
    x_ptr, w_ptr, r_ptr, s_ptr, b_ptr, y_ptr,
    M, N, D, MEMBERS,
    stride_xk, stride_xm, stride_xd,
    stride_wn, stride_wd,
    stride_rk, stride_rn,
    stride_sk, stride_sd,
    stride_bk, stride_bn,
    stride_yk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    k = tl.program_id(1).to(tl.int64)
    # 64-bit rows: row * stride passes 2^31 elements once a member's input reaches 8 GB in float32.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # stride_xk is 0 for shared x: every member reads the same rows. Row starts are multiples of
    # ALIGN elements (see `alignment`).
    x_rows = tl.multiple_of(k * stride_xk + offs_m[:, None] * stride_xm, [ALIGN, ALIGN])
    x_ptrs = x_ptr + x_rows + offs_d[None, :] * stride_xd
    wt_rows = tl.multiple_of(offs_n[None, :] * stride_wn, [ALIGN, ALIGN])
    wt_ptrs = w_ptr + wt_rows + offs_d[:, None] * stride_wd  # (BLOCK_D, BLOCK_N) of Wᵀ
    s_ptrs = s_ptr + k * stride_sk + offs_d * stride_sd

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = tl.max_constancy(offs_d < D - d0, [ALIGN])
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        s = tl.load(s_ptrs, mask=mask_d, other=0.0)
        xs = (x.to(tl.float32) * s.to(tl.float32)[None, :]).to(w_ptr.dtype.element_ty)
        wt = tl.load(wt_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        acc = mma(xs, wt, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_D * stride_xd
        wt_ptrs += BLOCK_D * stride_wd
        s_ptrs += BLOCK_D * stride_sd

    r = tl.load(r_ptr + k * stride_rk + offs_n * stride_rn, mask=mask_n, other=0.0)
    acc = acc * r.to(tl.float32)[None, :]
    if HAS_BIAS:
        # stride_bk is 0 for a bias shared by all members.
        b = tl.load(b_ptr + k * stride_bk + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + k * stride_yk + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=active_configs(DX_CONFIGS), key=_KEY + ["MEMBERS_PER_PROGRAM"])
@triton.jit
def _rank1_dx_kernel(
    dy_ptr, w_ptr, r_ptr, s_ptr, dx_ptr,
    M, N, D, MEMBERS, MEMBERS_PER_PROGRAM,
    stride_dyk, stride_dym, stride_dyn,
    stride_wn, stride_wd,
    stride_rk, stride_rn,
    stride_sk, stride_sd,
    stride_dxk, stride_dxm, stride_dxd,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """dx_k = ((dy_k * r_k) @ W) * s_k.

    Per-member x: MEMBERS_PER_PROGRAM = 1 and the grid has K members. Shared x: one program
    loops over all K members and writes Σ_k dx_k, so the sum never exists K times in memory.
    """
    pid_m, pid_d = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_D), GROUP)
    group = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit as in the forward
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_d = tl.max_constancy(offs_d < D, [ALIGN])
    w_rows = tl.multiple_of(offs_n[:, None] * stride_wn, [ALIGN, ALIGN])

    total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for kk in range(0, MEMBERS_PER_PROGRAM):
        k = group * MEMBERS_PER_PROGRAM + kk
        dy_rows = tl.multiple_of(k * stride_dyk + offs_m[:, None] * stride_dym, [ALIGN, ALIGN])
        dy_ptrs = dy_ptr + dy_rows + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + w_rows + offs_d[None, :] * stride_wd
        r_ptrs = r_ptr + k * stride_rk + offs_n * stride_rn
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            mask_n = tl.max_constancy(offs_n < N - n0, [ALIGN])
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            r = tl.load(r_ptrs, mask=mask_n, other=0.0)
            dyr = (dy.to(tl.float32) * r.to(tl.float32)[None, :]).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = mma(dyr, w, acc, DOT_PRECISION, UPCAST)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
            r_ptrs += BLOCK_N * stride_rn
        s = tl.load(s_ptr + k * stride_sk + offs_d * stride_sd, mask=mask_d, other=0.0)
        total += acc * s.to(tl.float32)[None, :]

    dx_ptrs = dx_ptr + group * stride_dxk + offs_m[:, None] * stride_dxm + offs_d[None, :] * stride_dxd
    tl.store(dx_ptrs, total.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.autotune(
    configs=active_configs(DW_CONFIGS),
    key=_KEY + ["ROW_SPLITS"],
    # The outputs are accumulated with atomics, so each timing run must start from zero.
    reset_to_zero=["dw_ptr", "dr_ptr", "ds_ptr"],
)
@triton.jit
def _rank1_dw_kernel(
    x_ptr, dy_ptr, w_ptr, r_ptr, s_ptr,
    dw_ptr, dr_ptr, ds_ptr,
    M, N, D, MEMBERS, ROW_SPLITS,
    stride_xk, stride_xm, stride_xd,
    stride_dyk, stride_dym, stride_dyn,
    stride_wn, stride_wd,
    stride_rk, stride_rn,
    stride_sk, stride_sd,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    """dW, dr, ds from one per-member product P_k = dy_kᵀ x_k.

    With P_k[j, i] = Σ_m dy_k[m, j] x_k[m, i] (one tile, accumulated over this program's rows):
        dW[j, i]  += r_k[j] s_k[i] P_k[j, i]
        dr_k[j]   += Σ_i W[j, i] s_k[i] P_k[j, i]      (= Σ_m dy_k (y_k - b_k) / r_k, no division)
        ds_k[i]   += Σ_j W[j, i] r_k[j] P_k[j, i]
    Why this form: the only matmul is P_k, the same work as dW alone; dr and ds are cheap
    reductions of the tile already in registers, so there is no second matmul, no stored
    pre-scale product (K, M, d_out) and no division by r (exact even where r is 0). All three
    outputs are linear in P_k, so the rows may be split across programs (ROW_SPLITS) and the
    members spread over the grid, with float32 atomic adds combining the partial tiles:
    that gives enough programs to fill the GPU even when d_out x d_in has few tiles.
    The bias gradient (a sum of dy over rows) is not taken here: summing the dy tile in the
    main loop pulls it into registers and, on an H100, nearly doubled this kernel's time.
    """
    pid_n, pid_d = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(D, BLOCK_D), GROUP)
    pid_z = tl.program_id(1)
    k = (pid_z // ROW_SPLITS).to(tl.int64)
    split = pid_z % ROW_SPLITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = tl.max_constancy(offs_n < N, [ALIGN])
    mask_d = tl.max_constancy(offs_d < D, [ALIGN])

    # Split `split` takes row blocks split, split + ROW_SPLITS, ...
    row_step = ROW_SPLITS * BLOCK_M
    m_start = split * BLOCK_M
    dyt_rows = tl.multiple_of(k * stride_dyk + (m_start + offs_m)[None, :] * stride_dym, [ALIGN, ALIGN])
    dyt_ptrs = dy_ptr + dyt_rows + offs_n[:, None] * stride_dyn
    x_rows = tl.multiple_of(k * stride_xk + (m_start + offs_m)[:, None] * stride_xm, [ALIGN, ALIGN])
    x_ptrs = x_ptr + x_rows + offs_d[None, :] * stride_xd
    p = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, M, row_step):
        mask_m = offs_m < M - m0
        dyt = tl.load(dyt_ptrs, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        p = mma(dyt, x, p, DOT_PRECISION, UPCAST)
        dyt_ptrs += row_step * stride_dym
        x_ptrs += row_step * stride_xm

    r = tl.load(r_ptr + k * stride_rk + offs_n * stride_rn, mask=mask_n, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + k * stride_sk + offs_d * stride_sd, mask=mask_d, other=0.0).to(tl.float32)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    w = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_nd, other=0.0
    ).to(tl.float32)
    dw_ptrs = dw_ptr + offs_n[:, None] * D + offs_d[None, :]
    tl.atomic_add(dw_ptrs, p * r[:, None] * s[None, :], mask=mask_nd)
    wp = w * p
    tl.atomic_add(dr_ptr + k * N + offs_n, tl.sum(wp * s[None, :], axis=1), mask=mask_n)
    tl.atomic_add(ds_ptr + k * D + offs_d, tl.sum(wp * r[:, None], axis=0), mask=mask_d)


# --------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------
def output_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every buffer our kernels (here and in kernels/lstm.py) store into without
    reading; the tests replace it with NaN-filled buffers to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def alignment(*sizes: int) -> int:
    """Largest power of two (at most 16) dividing every size and stride a kernel's tiles start at.

    The JIT only marks ints divisible by 16, so with d_in = 500 Triton cannot prove that rows
    start on aligned addresses: its loads would not vectorise and its main loop would not be
    software-pipelined. The kernels assert this alignment instead (tl.multiple_of on row
    offsets, tl.max_constancy on the masks along the contiguous dimension).
    """
    align = 16
    for size in sizes:
        while size % align:
            align //= 2
    return align


def tf32_matmuls() -> bool:
    """Whether torch lets float32 CUDA matmuls use TF32, set through either of its APIs."""
    # Once the newer per-backend `fp32_precision` has been set, reading the legacy
    # `allow_tf32` raises (torch >= 2.9); older torch has only `allow_tf32`.
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else torch.backends.cuda.matmul.allow_tf32


def dot_args(dtype: torch.dtype) -> dict:
    # float32 dots follow torch's matmul setting: TF32 tensor cores only when the user allowed
    # them for torch.matmul too, so the fused layer is as exact as the eager one it replaces.
    ieee = dtype == torch.float32 and not tf32_matmuls()
    return {"DOT_PRECISION": "ieee" if ieee else "tf32", "UPCAST": interpreting() and dtype == torch.bfloat16}


# Rows each dW program should at least reduce over before splitting rows pays for its atomics.
_MIN_ROWS_PER_SPLIT = 512


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _row_splits(m: int, n: int, d: int, members: int, device: torch.device) -> int:
    """Split the dW row reduction only where the members' tiles alone leave multiprocessors idle.

    Each split adds a round of atomics on the whole dW tile: on an H100 (K=8, 4096 rows per
    member, 512 -> 2048, bf16) the kernel took 246 us unsplit, 324 us in 2 splits, 581 in 8.
    """
    wanted = _multiprocessors(device)
    tiles = triton.cdiv(n, 128) * triton.cdiv(d, 128) * members
    return max(1, min(triton.cdiv(wanted, tiles), triton.cdiv(m, _MIN_ROWS_PER_SPLIT)))


def _forward(x3: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
             bias: torch.Tensor | None, shared: bool) -> torch.Tensor:
    members, n = r.shape
    m, d = x3.shape[-2], x3.shape[-1]
    y = output_buffer((members, m, n), x3.dtype, x3.device)
    b = bias if bias is not None else r  # any valid pointer; HAS_BIAS=False never reads it
    stride_bk = 0 if bias is None or bias.dim() == 1 else bias.stride(0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), members)
    _rank1_fwd_kernel[grid](
        x3, weight, r, s, b, y,
        m, n, d, members,
        0 if shared else x3.stride(0), x3.stride(-2), x3.stride(-1),
        weight.stride(0), weight.stride(1),
        r.stride(0), r.stride(1),
        s.stride(0), s.stride(1),
        stride_bk, b.stride(-1),
        y.stride(0), y.stride(1), y.stride(2),
        HAS_BIAS=bias is not None,
        ALIGN=alignment(d, x3.stride(0) if not shared else 0, x3.stride(-2), weight.stride(0)),
        **dot_args(x3.dtype),
    )
    return y


def backward_dx(dy: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                 shared: bool) -> torch.Tensor:
    members, m, n = dy.shape
    d = weight.shape[1]
    groups, per_program = (1, members) if shared else (members, 1)
    dx = output_buffer((groups, m, d), dy.dtype, dy.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]), groups)
    _rank1_dx_kernel[grid](
        dy, weight, r, s, dx,
        m, n, d, members, per_program,
        dy.stride(0), dy.stride(1), dy.stride(2),
        weight.stride(0), weight.stride(1),
        r.stride(0), r.stride(1),
        s.stride(0), s.stride(1),
        dx.stride(0), dx.stride(1), dx.stride(2),
        ALIGN=alignment(n, d, dy.stride(0), dy.stride(1), weight.stride(0)),
        **dot_args(dy.dtype),
    )
    return dx[0] if shared else dx


def backward_params(x3: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, r: torch.Tensor,
                     s: torch.Tensor, bias_dim: int | None, shared: bool):
    """float32 (dW, dr, ds, dbias-or-None): the first three accumulated by atomics from zero."""
    members, m, n = dy.shape
    d = weight.shape[1]
    f32 = dict(dtype=torch.float32, device=dy.device)
    dw = torch.zeros((n, d), **f32)
    dr = torch.zeros((members, n), **f32)
    ds = torch.zeros((members, d), **f32)
    splits = _row_splits(m, n, d, members, dy.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(d, meta["BLOCK_D"]), members * splits)
    _rank1_dw_kernel[grid](
        x3, dy, weight, r, s,
        dw, dr, ds,
        m, n, d, members, splits,
        0 if shared else x3.stride(0), x3.stride(-2), x3.stride(-1),
        dy.stride(0), dy.stride(1), dy.stride(2),
        weight.stride(0), weight.stride(1),
        r.stride(0), r.stride(1),
        s.stride(0), s.stride(1),
        ALIGN=alignment(n, d, dy.stride(0), dy.stride(1), 0 if shared else x3.stride(0), x3.stride(-2)),
        **dot_args(dy.dtype),
    )
    # One pass over dy, apart from the kernel (see its docstring).
    db = None if bias_dim is None else dy.sum(dim=1 if bias_dim == 2 else (0, 1), dtype=torch.float32)
    return dw, dr, ds, db


class Rank1LinearFunction(torch.autograd.Function):
    """Autograd wrapper whose forward and backward both run the Triton kernels above.

    Takes the already validated 3-D (K, M, d_in) x, or 2-D shared x (M, d_in).
    """

    @staticmethod
    def forward(ctx, x3, weight, r, s, bias):
        shared = x3.dim() == 2
        ctx.save_for_backward(x3, weight, r, s)
        ctx.shared = shared
        ctx.bias_dim = None if bias is None else bias.dim()
        return _forward(x3, weight, r, s, bias, shared)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x3, weight, r, s = ctx.saved_tensors
        need_x, need_w, need_r, need_s, need_b = ctx.needs_input_grad
        dx = backward_dx(dy, weight, r, s, ctx.shared) if need_x else None
        dw = dr = ds = db = None
        if need_w or need_r or need_s or need_b:
            bias_dim = ctx.bias_dim if need_b else None
            dw32, dr32, ds32, db32 = backward_params(x3, dy, weight, r, s, bias_dim, ctx.shared)
            dw = dw32.to(weight.dtype) if need_w else None
            dr = dr32.to(r.dtype) if need_r else None
            ds = ds32.to(s.dtype) if need_s else None
            db = db32.to(dy.dtype) if need_b else None
        return dx, dw, dr, ds, db


# --------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(v) for v in t.shape) + ")"


def _validate(x, weight, r, s, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("r", r), ("s", s), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"rank1_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise ValueError(f"rank1_linear: {name} has dtype {t.dtype}; use float32, bfloat16 or float16")
    if weight.dim() != 2:
        raise ValueError(f"rank1_linear: weight must be (d_out, d_in), got shape {_shape(weight)}")
    d_out, d_in = weight.shape
    if r.dim() != 2 or r.shape[1] != d_out:
        raise ValueError(f"rank1_linear: r must be (K, d_out) = (K, {d_out}), got shape {_shape(r)}")
    members = r.shape[0]
    if members < 1:
        raise ValueError("rank1_linear: r must have at least one member row (K >= 1)")
    if s.shape != (members, d_in):
        raise ValueError(f"rank1_linear: s must be (K, d_in) = ({members}, {d_in}), got shape {_shape(s)}")
    if x.dim() < 2 or x.shape[-1] != d_in:
        raise ValueError(
            f"rank1_linear: x must be (K, M, d_in) = ({members}, M, {d_in}) or shared (M, {d_in}), "
            f"got shape {_shape(x)}"
        )
    if x.dim() >= 3 and x.shape[0] != members:
        raise ValueError(
            f"rank1_linear: x must be (K, ..., d_in) with K = {members} member rows, got shape {_shape(x)}; "
            f"reshape shared inputs to (M, {d_in})"
        )
    if bias is not None and bias.shape not in ((d_out,), (members, d_out)):
        raise ValueError(
            f"rank1_linear: bias must be None, ({d_out},) or ({members}, {d_out}), got shape {_shape(bias)}"
        )
    for name, t in (("weight", weight), ("r", r), ("s", s), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"rank1_linear: {name} has dtype {t.dtype} but x has {x.dtype}; use one dtype")
        if t is not None and t.device != x.device:
            raise ValueError(f"rank1_linear: {name} is on {t.device} but x is on {x.device}; use one device")


def resolve_impl(op: str, impl: str, x: torch.Tensor) -> str:
    """The implementation `op` runs for input `x`: "auto" is "triton" on CUDA tensors or under
    TRITON_INTERPRET=1 and "eager" otherwise (and for float64, which is for references and
    gradient checks: the kernels do not take it, and wherever Triton is not installed); an
    explicit "triton" must be able to run."""
    runnable = TRITON_INSTALLED and (x.is_cuda or interpreting())
    if impl == "auto":
        return "triton" if runnable and x.dtype != torch.float64 else "eager"
    if impl == "triton" and not TRITON_INSTALLED:
        raise ValueError(f"{op}: impl='triton' needs Triton, which is not installed (it ships for Linux: "
                         f"pip install triton); use impl='eager'")
    if impl == "triton" and not runnable:
        raise ValueError(f"{op}: impl='triton' needs CUDA tensors or TRITON_INTERPRET=1; use impl='eager' on CPU")
    if impl == "triton" and x.dtype == torch.float64:
        raise ValueError(f"{op}: impl='triton' takes float32, bfloat16 or float16; float64 runs with impl='eager'")
    return impl


def rank1_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    r: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """All K rank-1 members of a linear layer: out[k] = ((x[k] * s[k]) @ weight.T) * r[k] + bias[k].

    x: (K, M, d_in), or (K, *batch, d_in) (batch dims folded into M), or (M, d_in) shared by all
    members. weight: (d_out, d_in); r: (K, d_out); s: (K, d_in); bias: None, (d_out,) or
    (K, d_out). Returns (K, M, d_out) (or (K, *batch, d_out)) in the input dtype.
    impl: "triton" (fused kernels), "eager" (PyTorch ops: the reference, or the folded member
    weights where `folding_pays`), "folded" (the folded member weights, whatever the rows),
    "auto" (triton on CUDA tensors or under TRITON_INTERPRET=1, eager otherwise). float64 runs
    with "eager" or "folded" only. Under autocast all inputs are cast to the
    autocast dtype first, as torch does for F.linear.
    """
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"rank1_linear: impl must be one of {', '.join(LINEAR_IMPLS)}, got {impl!r}")
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, r, s = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, weight, r, s))
        bias = bias.to(dtype) if isinstance(bias, torch.Tensor) else bias
        with torch.autocast(x.device.type, enabled=False):
            return rank1_linear(x, weight, r, s, bias, impl=impl)
    _validate(x, weight, r, s, bias)
    impl = resolve_impl("rank1_linear", impl, x)
    # Leading batch dims of per-member x fold into the rows (a view when the strides allow).
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 3 else x
    if impl == "folded" or (impl == "eager" and folding_pays(x3.shape[-2], *weight.shape[::-1])):
        out = rank1_linear_folded(x3, weight, r, s, bias)
    elif impl == "eager":
        out = rank1_linear_eager(x3, weight, r, s, bias)
    else:
        with on_device(x.device):  # Triton launches on the current device
            out = Rank1LinearFunction.apply(x3, weight, r, s, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0]) if x.dim() > 3 else out
