"""The fused rank-1 linear layer (kernels.rank1) against an independent float64 reference.

Runs the Triton kernels in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The tests swap the interpreter's one autotune config for 16-wide tiles, so the small odd
sizes below span several tiles and hit every mask and every cross-tile atomic; one test
keeps the default config on sizes that span several of its tiles. Every buffer a kernel
stores into is NaN-poisoned before the call, so an unwritten element fails the comparison.
"""
from __future__ import annotations

import inspect
import zlib

import pytest
import torch

import kernels
from kernels import lstm as lstm_kernels
from kernels import rank1
from kernels.optional_triton import triton  # the module loads without Triton, and is then skipped

# Triton on CPU tensors: runs only under TRITON_INTERPRET=1 (see conftest.py).
pytestmark = pytest.mark.interpreter

K_VALUES = (1, 3)
M, D_IN, D_OUT = 7, 33, 17
# Largest error allowed, relative to the largest magnitude of the float64 reference.
# bf16 rounds x*s and dy*r to 8 significant bits before the dot and rounds the output, and the
# interpreter truncates float32 -> bf16 where a GPU rounds to nearest: the worst seen over 25
# seeds was 1.0e-2 (float32 2.2e-7, float16 6e-4). A wrong formula is off by O(1).
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}

SMALL_TILES = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16, "GROUP": 2}, num_warps=4, num_stages=1)
KERNELS = (rank1._rank1_fwd_kernel, rank1._rank1_dx_kernel, rank1._rank1_dw_kernel)


@pytest.fixture
def default_tiles():
    """Requested by a test that keeps the interpreter's own config."""


@pytest.fixture(autouse=True)
def small_tiles(request, monkeypatch):
    if "default_tiles" not in request.fixturenames:
        for kernel in KERNELS:
            monkeypatch.setattr(kernel, "configs", [SMALL_TILES])


@pytest.fixture(autouse=True)
def _poison_every_output(poisoned_outputs):
    """Every test here runs with NaN-poisoned kernel outputs (the fixture lives in conftest.py)."""


def reference(x, weight, r, s, bias):
    """float64 out[k] = x_k @ (W * r_k s_kᵀ)ᵀ + b_k with each member's weight materialised."""
    members = r.shape[0]
    xs = x if x.dim() >= 3 else x.expand(members, *x.shape)
    outs = []
    for k in range(members):
        w_k = weight * torch.outer(r[k], s[k])
        b_k = 0 if bias is None else (bias if bias.dim() == 1 else bias[k])
        outs.append(xs[k] @ w_k.t() + b_k)
    return torch.stack(outs)


def make_inputs(members, x_shape, dtype, bias_kind, generator, d_out=D_OUT):
    """Fresh random leaf tensors (never zeros): x, weight, r, s, bias."""
    d_in = x_shape[-1]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).requires_grad_()

    bias_shape = {"shared": (d_out,), "member": (members, d_out)}.get(bias_kind)
    bias = None if bias_shape is None else randn(*bias_shape)
    return randn(*x_shape), randn(d_out, d_in), randn(members, d_out), randn(members, d_in), bias


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def check_against_reference(inputs, impl="triton", generator=None):
    """Forward and all gradients of rank1_linear vs the float64 reference; returns the output."""
    x, weight, r, s, bias = inputs
    dtype = x.dtype
    out = kernels.rank1_linear(x, weight, r, s, bias, impl=impl)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, r64, s64 = leaves64[:4]
    b64 = leaves64[4] if bias is not None else None
    expected = reference(x64, w64, r64, s64, b64)
    expected_out = expected.reshape(out.shape)
    expected_grads = torch.autograd.grad(expected_out, leaves64, grad_out.double())

    assert out.dtype == dtype and out.shape == expected_out.shape
    assert torch.isfinite(out).all()
    assert relative_error(out, expected_out) < TOLERANCE[dtype]
    names = ["dx", "dweight", "dr", "ds", "dbias"]
    for name, grad, expected_grad, leaf in zip(names, grads, expected_grads, leaves):
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grad) < TOLERANCE[dtype], name
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("members", K_VALUES)
@pytest.mark.parametrize("bias_kind", [None, "shared", "member"])
@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_triton_matches_float64_reference(shared_x, bias_kind, members, dtype, poisoned_outputs):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{shared_x}{bias_kind}{members}{dtype}".encode()))
    x_shape = (M, D_IN) if shared_x else (members, M, D_IN)
    inputs = make_inputs(members, x_shape, dtype, bias_kind, generator)
    check_against_reference(inputs, generator=generator)
    # y, then dx: both came from the poisoned allocator, so an unwritten tile would be NaN.
    assert poisoned_outputs == [(members, M, D_OUT), (1 if shared_x else members, M, D_IN)]


def test_float16():
    generator = torch.Generator().manual_seed(5)
    check_against_reference(make_inputs(3, (3, M, D_IN), torch.float16, "member", generator), generator=generator)


def test_leading_batch_dims_fold_into_rows():
    generator = torch.Generator().manual_seed(1)
    inputs = make_inputs(3, (3, 2, 9, D_IN), torch.float32, "member", generator)
    out = check_against_reference(inputs, generator=generator)
    assert out.shape == (3, 2, 9, D_OUT)


@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_sizes_that_are_multiples_of_four(shared_x):
    """Like the LSTM's d_in = 500: the kernels get ALIGN = 4 hints on rows and masks."""
    members, rows, d_in, d_out = 3, 12, 36, 20
    x_shape = (rows, d_in) if shared_x else (members, rows, d_in)
    generator = torch.Generator().manual_seed(11)
    inputs = make_inputs(members, x_shape, torch.float32, "member", generator, d_out=d_out)
    assert rank1.alignment(d_in, d_out, rows * d_in, d_in, rows * d_out) == 4
    check_against_reference(inputs, generator=generator)


def test_alignment_is_the_largest_power_of_two_dividing_all():
    assert rank1.alignment(512, 2048, 0) == 16
    assert rank1.alignment(500, 2000, 256 * 500) == 4
    assert rank1.alignment(756, 2000) == 4
    assert rank1.alignment(2000, 1000, 24) == 8
    assert rank1.alignment(33, 64) == 1


def test_default_interpreter_config_on_several_of_its_tiles(default_tiles):
    assert all(kernel.configs == [rank1.INTERPRETER_CONFIG] for kernel in KERNELS)
    generator = torch.Generator().manual_seed(12)
    inputs = make_inputs(2, (2, 70, 131), torch.float32, "member", generator, d_out=67)
    check_against_reference(inputs, generator=generator)


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(2)
    members = 3

    def strided(*shape):
        # Transposed storage and a step of 2 in the last dimension: no unit strides anywhere.
        base = torch.randn(*shape[:-2], shape[-1], 2 * shape[-2], generator=generator)
        return base.transpose(-1, -2)[..., ::2, :].requires_grad_()

    x = torch.randn(M, members, 2 * D_IN, generator=generator)[..., ::2].transpose(0, 1).requires_grad_()
    weight, r, s = strided(D_OUT, D_IN), strided(members, D_OUT), strided(members, D_IN)
    bias = torch.randn(D_OUT, 2, generator=generator)[:, 1].requires_grad_()
    assert not any(t.is_contiguous() for t in (x, weight, r, s, bias))
    check_against_reference((x, weight, r, s, bias), generator=generator)


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_weight_gradient_rows_split_across_programs(monkeypatch, shared_x, members):
    """More rows than one dW program takes: partial tiles combine through the atomics.

    The dW grid holds K x splits programs, each decoding its (member, split): a decode that is
    not one-to-one scores some member's row blocks twice and others' never. K=3 with 6 splits
    (neither equal to nor coprime with K) catches every such decode tried; 100 rows are 7 row
    blocks of 16, the last one partial.
    """
    rows = 100
    monkeypatch.setattr(rank1, "_MIN_ROWS_PER_SPLIT", 8)
    monkeypatch.setattr(rank1, "_multiprocessors", lambda device: {1: 8, 3: 18}[members])
    splits = rank1._row_splits(rows, D_OUT, D_IN, members, torch.device("cpu"))
    assert splits == {1: 8, 3: 6}[members]
    assert triton.cdiv(rows, SMALL_TILES.kwargs["BLOCK_M"]) == 7
    generator = torch.Generator().manual_seed(zlib.crc32(f"split{shared_x}{members}".encode()))
    x_shape = (rows, D_IN) if shared_x else (members, rows, D_IN)
    inputs = make_inputs(members, x_shape, torch.float32, "member", generator)
    check_against_reference(inputs, generator=generator)


def test_only_requested_gradients_are_computed():
    """Frozen weight and bias get no gradient; dy from .sum() is an expanded (all-zero-stride) tensor."""
    generator = torch.Generator().manual_seed(4)
    x, weight, r, s, bias = make_inputs(3, (3, M, D_IN), torch.float32, "member", generator)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    kernels.rank1_linear(x, weight, r, s, bias, impl="triton").sum().backward()
    assert weight.grad is None and bias.grad is None
    x64, w64, r64, s64 = (t.detach().double().requires_grad_() for t in (x, weight, r, s))
    reference(x64, w64, r64, s64, None).sum().backward()
    for fused, expected in ((x.grad, x64.grad), (r.grad, r64.grad), (s.grad, s64.grad)):
        assert relative_error(fused, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_eager_matches_float64_reference(shared_x):
    generator = torch.Generator().manual_seed(6)
    x_shape = (M, D_IN) if shared_x else (3, M, D_IN)
    check_against_reference(make_inputs(3, x_shape, torch.float32, "member", generator), impl="eager",
                            generator=generator)


@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_eager_and_triton_agree(shared_x):
    generator = torch.Generator().manual_seed(7)
    x_shape = (M, D_IN) if shared_x else (3, 2, 5, D_IN)
    inputs = make_inputs(3, x_shape, torch.float32, "shared", generator)
    grad_seed = torch.randn(3, 2 * 5 if not shared_x else M, D_OUT, generator=generator)
    results = {}
    for impl in ("eager", "triton"):
        out = kernels.rank1_linear(*inputs, impl=impl)
        grads = torch.autograd.grad(out, inputs, grad_seed.reshape(out.shape))
        results[impl] = (out, *grads)
    for eager, fused in zip(results["eager"], results["triton"]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_auto_uses_triton_under_the_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(rank1.Rank1LinearFunction, "apply", lambda *args: calls.append(args) or args[0])
    generator = torch.Generator().manual_seed(8)
    kernels.rank1_linear(*make_inputs(3, (3, M, D_IN), torch.float32, None, generator))
    assert len(calls) == 1


def test_autocast_runs_in_the_autocast_dtype():
    generator = torch.Generator().manual_seed(9)
    inputs = make_inputs(3, (3, M, D_IN), torch.float32, "member", generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.rank1_linear(*inputs, impl="triton")
    assert out.dtype == torch.bfloat16
    x, weight, r, s, bias = (t.detach().double() for t in inputs)
    assert relative_error(out, reference(x, weight, r, s, bias)) < TOLERANCE[torch.bfloat16]


def _valid(**overrides):
    generator = torch.Generator().manual_seed(10)
    members = 3
    args = dict(
        x=torch.randn(members, M, D_IN, generator=generator),
        weight=torch.randn(D_OUT, D_IN, generator=generator),
        r=torch.randn(members, D_OUT, generator=generator),
        s=torch.randn(members, D_IN, generator=generator),
        bias=torch.randn(D_OUT, generator=generator),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(weight=torch.ones(D_OUT, D_IN, 1)), r"weight must be \(d_out, d_in\)"),
        (dict(r=torch.ones(3, D_OUT + 1)), rf"r must be \(K, d_out\) = \(K, {D_OUT}\)"),
        (dict(s=torch.ones(2, D_IN)), rf"s must be \(K, d_in\) = \(3, {D_IN}\)"),
        (dict(x=torch.ones(3, M, D_IN + 1)), rf"x must be \(K, M, d_in\) = \(3, M, {D_IN}\)"),
        (dict(x=torch.ones(2, M, D_IN)), r"x must be \(K, \.\.\., d_in\) with K = 3"),
        (dict(x=torch.ones(D_IN)), r"x must be \(K, M, d_in\)"),
        (dict(bias=torch.ones(2, D_OUT)), rf"bias must be None, \({D_OUT},\) or \(3, {D_OUT}\)"),
        (dict(r=torch.ones(3, D_OUT, dtype=torch.float64)), r"r has dtype torch.float64 but x has torch.float32"),
        (dict(x=torch.ones(3, M, D_IN, dtype=torch.int64)), r"x has dtype torch.int64"),
        (dict(s=torch.ones(3, D_IN, dtype=torch.bfloat16)), r"s has dtype torch.bfloat16 but x has torch.float32"),
    ],
)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_bad_inputs_raise_value_error_naming_the_argument(overrides, message, impl):
    with pytest.raises(ValueError, match=message):
        kernels.rank1_linear(**_valid(**overrides), impl=impl)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.rank1_linear(**_valid(), impl="cuda")


def test_float64_runs_eager_only():
    # float64 serves references and gradient checks: "auto" takes the eager path, "triton" refuses.
    generator = torch.Generator().manual_seed(8)
    inputs = [t.detach().double() for t in make_inputs(3, (3, M, D_IN), torch.float32, "member", generator)]
    out = kernels.rank1_linear(*inputs, impl="auto")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(*inputs), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="float64 runs with impl='eager'"):
        kernels.rank1_linear(*inputs, impl="triton")


@pytest.mark.parametrize("kernel", [*KERNELS, lstm_kernels._lstm_step_fwd_kernel, lstm_kernels._lstm_step_bwd_kernel],
                         ids=["forward", "dx", "dw", "step_fwd", "step_bwd"])
def test_every_size_argument_keys_the_autotuning(kernel):
    # A config tuned for one size must not be reused for another. The member count, the grid's
    # second dimension, was once no argument at all, so K=10 ran with the config tuned for K=4.
    params = inspect.signature(kernel.fn.fn).parameters
    sizes = {name for name, p in params.items()
             if p.annotation is inspect.Parameter.empty and not name.endswith("_ptr") and not name.startswith("stride_")}
    assert sizes <= set(kernel.keys)
    assert "MEMBERS" in sizes or kernel not in KERNELS
