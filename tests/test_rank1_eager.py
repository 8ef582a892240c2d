"""The eager (PyTorch ops) paths of kernels.rank1_linear, which CPU training runs: the
reference's row scaling and the folded member weights, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import rank1
from kernels.optional_triton import TRITON_INSTALLED
from tests.test_rank1 import make_inputs, reference, relative_error


@pytest.mark.parametrize("bias_kind", [None, "shared", "member"])
@pytest.mark.parametrize("shared_x", [False, True], ids=["member_x", "shared_x"])
def test_folded_matches_float64_reference(shared_x, bias_kind):
    generator = torch.Generator().manual_seed(11 + 2 * shared_x + (bias_kind is None))
    members, rows, d_in, d_out = 3, 9, 6, 5
    inputs = make_inputs(members, (rows, d_in) if shared_x else (members, rows, d_in), torch.float32, bias_kind,
                         generator, d_out=d_out)
    leaves = [t for t in inputs if t is not None]
    out = rank1.rank1_linear_folded(*inputs)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference(*leaves64[:4], leaves64[4] if bias_kind else None)
    assert out.shape == expected.shape == (members, rows, d_out)
    assert relative_error(out, expected) < 2e-6
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
    for name, grad, want in zip(["dx", "dweight", "dr", "ds", "dbias"], grads, expected_grads):
        assert grad.shape == want.shape and relative_error(grad, want) < 2e-6, name


def test_folding_pays_from_four_times_the_break_even_rows():
    # 33 -> 17: break-even d_in*d_out/(d_in+d_out) = 561/50 = 11.22 rows; folding from 44.88.
    assert not rank1.folding_pays(44, 33, 17)
    assert rank1.folding_pays(45, 33, 17)
    # The paper LSTM's recurrent step (12 rows per member, 500 -> 2000) scales rows; its input
    # projection over a window (1800 rows, 190 -> 2000) folds.
    assert not rank1.folding_pays(12, 500, 2000)
    assert rank1.folding_pays(1800, 190, 2000)


@pytest.mark.parametrize("rows, impl, folds", [(44, "eager", False), (45, "eager", True), (2, "folded", True)])
def test_eager_dispatch_picks_the_cheaper_form(rows, impl, folds, monkeypatch):
    # impl="eager" folds from FOLD_ROWS_FACTOR x the break-even rows; impl="folded" always.
    calls = []
    for name in ("rank1_linear_folded", "rank1_linear_eager"):
        real = getattr(rank1, name)
        monkeypatch.setattr(rank1, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    inputs = make_inputs(3, (3, rows, 33), torch.float32, "member", torch.Generator().manual_seed(12), d_out=17)
    out = kernels.rank1_linear(*inputs, impl=impl)
    assert calls == ["rank1_linear_folded" if folds else "rank1_linear_eager"]
    expected = reference(*(t.detach().double() for t in inputs))
    assert relative_error(out, expected) < 2e-6


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9 has one TF32 API")
def test_float32_dots_follow_torch_tf32_setting_through_either_api():
    # Once the newer fp32_precision is set, reading the legacy allow_tf32 raises in torch.
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        for precision in ("tf32", "ieee"):
            matmul.fp32_precision = precision
            assert rank1.dot_args(torch.float32)["DOT_PRECISION"] == precision
        matmul.fp32_precision = "none"
        for allowed, precision in ((True, "tf32"), (False, "ieee")):
            matmul.allow_tf32 = allowed
            assert rank1.dot_args(torch.float32)["DOT_PRECISION"] == precision
        assert rank1.dot_args(torch.bfloat16)["DOT_PRECISION"] == "tf32"  # only float32 has the choice
    finally:
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = saved


@pytest.mark.skipif(not TRITON_INSTALLED, reason="without Triton the message names Triton (test_without_triton.py)")
def test_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    generator = torch.Generator().manual_seed(12)
    inputs = make_inputs(2, (2, 4, 6), torch.float32, None, generator, d_out=5)
    with pytest.raises(ValueError, match=r"rank1_linear: impl='triton' needs CUDA tensors or TRITON_INTERPRET=1"):
        kernels.rank1_linear(*inputs, impl="triton")
    x_gates, h = torch.randn(2, 3, 4, 4 * 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"rank1_lstm: impl='triton' needs CUDA tensors"):
        kernels.rank1_lstm(x_gates, torch.randn(20, 5), torch.randn(2, 20), torch.randn(2, 5), h, h, impl="triton")
    assert kernels.rank1_linear(*inputs, impl="auto").shape == (2, 4, 5)  # auto takes eager here
