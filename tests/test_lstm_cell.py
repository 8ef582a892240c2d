"""The fused LSTM cell update (kernels.lstm_cell) against an independent float64 reference.

Triton runs in its CPU interpreter here (conftest sets TRITON_INTERPRET=1 without CUDA); every
buffer a kernel stores into is NaN-poisoned first (the `poisoned_outputs` fixture of
conftest.py), so an unwritten element fails the comparison.
"""
from __future__ import annotations

import pytest
import torch

import kernels

# Triton on CPU tensors: runs only under TRITON_INTERPRET=1 (see conftest.py).
pytestmark = pytest.mark.interpreter

K, B, T, H = 3, 5, 4, 7
# Largest error allowed, relative to the largest magnitude of the float64 reference.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def reference(x_gates, h_gates, c_prev):
    """float64 LSTM step written out gate by gate (nn.LSTM's i, f, g, o order)."""
    i, f, g, o = (x_gates.double() + h_gates.double()).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c_prev.double() + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def make_inputs(layout, dtype, generator):
    """Fresh random leaf tensors; x_gates of layout "step" is one time step sliced out of a
    (K, B, T, 4H) tensor (two row strides, as the LSTM passes it)."""
    def randn(*shape, dtype=dtype):
        return (2 * torch.randn(*shape, generator=generator)).to(dtype)

    if layout == "step":
        whole = randn(K, B, T, 4 * H).requires_grad_()
        x_gates = whole[:, :, 2]
        leaf = whole
        lead = (K, B)
    else:
        x_gates = leaf = randn(K * B, 4 * H).requires_grad_()
        lead = (K * B,)
    h_gates = randn(*lead, 4 * H).requires_grad_()
    c_prev = randn(*lead, H, dtype=torch.float32).requires_grad_()
    return leaf, x_gates, h_gates, c_prev


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["step", "rows"])
def test_triton_matches_float64_reference(layout, dtype, poisoned_outputs):
    generator = torch.Generator().manual_seed(hash((layout, str(dtype))) % 2**31)
    leaf, x_gates, h_gates, c_prev = make_inputs(layout, dtype, generator)
    h, c = kernels.lstm_cell(x_gates, h_gates, c_prev, impl="triton")
    assert len(poisoned_outputs) == 3  # h, c, saved activations
    assert h.dtype == dtype and c.dtype == torch.float32 and h.shape == c.shape == c_prev.shape
    leaf64, hg64, c64 = (t.detach().double().requires_grad_() for t in (leaf, h_gates, c_prev))
    h_ref, c_ref = reference(leaf64 if layout == "rows" else leaf64[:, :, 2], hg64, c64)
    tol = TOLERANCE[dtype]
    assert relative_error(h, h_ref) < tol and relative_error(c, c_ref) < tol
    dh, dc = torch.randn(h.shape, generator=generator), torch.randn(c.shape, generator=generator)
    (h.float() * dh).sum().add((c * dc).sum()).backward()
    (h_ref * dh.double()).sum().add((c_ref * dc.double()).sum()).backward()
    assert len(poisoned_outputs) == 5  # + d_gates, dc_prev
    for name, got, expected in (("x_gates", leaf.grad, leaf64.grad), ("h_gates", h_gates.grad, hg64.grad),
                                ("c_prev", c_prev.grad, c64.grad)):
        assert got is not None and torch.isfinite(got).all(), name
        assert relative_error(got, expected) < tol, name


def test_eager_and_triton_agree_and_no_grad_skips_the_saved_activations(poisoned_outputs):
    generator = torch.Generator().manual_seed(3)
    _, x_gates, h_gates, c_prev = make_inputs("step", torch.float32, generator)
    eager = kernels.lstm_cell(x_gates, h_gates, c_prev, impl="eager")
    with torch.no_grad():
        fused = kernels.lstm_cell(x_gates, h_gates, c_prev, impl="triton")
    assert len(poisoned_outputs) == 2  # h and c only
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float64_runs_eager_only():
    generator = torch.Generator().manual_seed(4)
    _, x_gates, h_gates, c_prev = (t.detach().double() if t is not None else t
                                   for t in make_inputs("rows", torch.float32, generator))
    h, c = kernels.lstm_cell(x_gates, h_gates, c_prev, impl="auto")
    h_ref, c_ref = reference(x_gates, h_gates, c_prev)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="float64 runs with impl='eager'"):
        kernels.lstm_cell(x_gates, h_gates, c_prev, impl="triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, h, c: (x[..., :-1], h[..., :-1], c), r"x_gates must be \(\.\.\., 4H\)"),
        (lambda x, h, c: (x, h[:-1], c), r"h_gates must have x_gates' shape"),
        (lambda x, h, c: (x, h.bfloat16(), c), r"h_gates has dtype torch.bfloat16 but x_gates has torch.float32"),
        (lambda x, h, c: (x, h, c[..., :-1]), r"c_prev must be \(15, 7\)"),
        (lambda x, h, c: (x, h, c.long()), r"c_prev has dtype torch.int64"),
    ],
)
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_bad_inputs_raise_value_error_naming_the_argument(change, message, impl):
    _, x_gates, h_gates, c_prev = make_inputs("rows", torch.float32, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=message):
        kernels.lstm_cell(*change(x_gates.detach(), h_gates.detach(), c_prev.detach()), impl=impl)
