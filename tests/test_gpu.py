"""The compiled kernels and the training stack on a CUDA GPU, against float64 references.

CI has no GPU, so this module is skipped there; on a GPU machine run it with
`python -m pytest tests/test_gpu.py` (TRITON_INTERPRET unset). The CPU suite checks the same
kernels in Triton's interpreter, which accepts programs the GPU compiler treats differently
(layouts, pipelining, tensor-core dots, atomics) and runs one config only: here every autotune
config of every kernel runs on ragged sizes, the autotuner itself picks on realistic ones, and
every buffer a kernel stores into starts NaN-poisoned.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import kernels
import train_lm
from kernels import lstm as lstm_kernels
from kernels import rank1
from kernels.rank1 import interpreting
from lm.config import LatePhaseConfig, ModelConfig
from lm.late_phase import Rank1Factors, late_phase_parameters
from lm.models import build_model
from tests.test_rank1 import reference as rank1_reference
from tests.test_rank1 import relative_error
from tests.test_rank1_lstm import TOLERANCE as LSTM_TOLERANCE
from tests.test_rank1_lstm import check_against_reference as check_lstm
from tests.test_rank1_lstm import make_inputs as make_lstm_inputs
from tests.test_train import fresh_accelerate_state  # noqa: F401 (autouse: Accelerate's state per test)

OutOfResources = pytest.importorskip("triton.runtime.errors", reason="Triton is not installed").OutOfResources
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(),
    reason="needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset)",
)

REPO = Path(__file__).resolve().parent.parent
# Relative to the largest magnitude of the float64 reference. IEEE float32 dots differ from
# float64 by summation order only; bf16/fp16 round the scaled operands and the output.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
TF32_TOLERANCE = 5e-3
RANK1_KERNELS = {
    rank1._rank1_fwd_kernel: rank1.FORWARD_CONFIGS,
    rank1._rank1_dx_kernel: rank1.DX_CONFIGS,
    rank1._rank1_dw_kernel: rank1.DW_CONFIGS,
}
# The LSTM step kernels' configs, in pairs: every config of each kernel runs in some pair.
STEP_CONFIG_PAIRS = list(zip(lstm_kernels.STEP_FWD_CONFIGS, lstm_kernels.STEP_BWD_CONFIGS))
assert len(lstm_kernels.STEP_FWD_CONFIGS) == len(lstm_kernels.STEP_BWD_CONFIGS)


def fresh_generator() -> torch.Generator:
    """A CPU generator with a fresh seed, printed so that a failure (pytest shows a failed
    test's output) can be replayed with the same inputs."""
    seed = torch.seed() % 2**31
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


# Test dtypes: float32 runs with TF32 dots (the training default, train.tf32) or IEEE ones.
DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}


@pytest.fixture(autouse=True)
def _poison_every_output(poisoned_outputs):
    """NaN-filled output buffers (conftest.py), so an unwritten element fails the comparison."""


@pytest.fixture(autouse=True)
def _full_float32_unless_asked():
    """torch's defaults (no TF32 matmuls) for each test; training runs switch TF32 on (train.tf32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def set_dtype(name: str) -> torch.dtype:
    dtype, tf32 = DTYPES[name]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return dtype


def check_rank1(members, rows, d_in, d_out, dtype, shared_x, bias_kind, generator):
    """Forward and all five gradients of the fused kernels vs float64, on fresh random inputs."""
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to("cuda", dtype).requires_grad_()

    x = randn(*((rows, d_in) if shared_x else (members, rows, d_in)))
    weight = randn(d_out, d_in, scale=d_in ** -0.5)
    r, s = randn(members, d_out), randn(members, d_in)
    bias = {"shared": lambda: randn(d_out), "member": lambda: randn(members, d_out)}.get(bias_kind, lambda: None)()
    leaves = [t for t in (x, weight, r, s, bias) if t is not None]

    out = kernels.rank1_linear(x, weight, r, s, bias, impl="triton")
    grad_out = torch.randn(out.shape, generator=generator).to("cuda", dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = rank1_reference(*leaves64[:4], leaves64[4] if bias is not None else None)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
    tolerance = TF32_TOLERANCE if torch.backends.cuda.matmul.allow_tf32 and dtype == torch.float32 else TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_error(out, expected) < tolerance, "out"
    for name, grad, expected_grad in zip(["dx", "dweight", "dr", "ds", "dbias"], grads, expected_grads):
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grad) < tolerance, name


@pytest.mark.parametrize("dtype", ["tf32", "bf16"])
@pytest.mark.parametrize("config_index", range(max(len(c) for c in RANK1_KERNELS.values())))
def test_rank1_every_config_on_ragged_sizes(config_index, dtype, monkeypatch):
    # Each kernel pinned to one of its configs (cycling through the shorter lists), so every
    # config runs with masks on every edge: sizes are odd and smaller or larger than a tile.
    for kernel, configs in RANK1_KERNELS.items():
        monkeypatch.setattr(kernel, "configs", [configs[config_index % len(configs)]])
    generator = fresh_generator()
    try:
        for shared_x in (False, True):
            for bias_kind, members in ((None, 1), ("shared", 3), ("member", 3)):
                check_rank1(members, 147, 67, 301, set_dtype(dtype), shared_x, bias_kind, generator)
    except OutOfResources as e:
        # Some float32 tiles need more shared memory than the GPU has (compile_check lists
        # them); the autotuner skips such a config, so it never runs in float32.
        pytest.skip(f"config {config_index} does not fit this GPU in float32: {e}")


@pytest.mark.parametrize("shape, dtype", [
    ((10, 1000, 500, 2000), "bf16"), ((10, 1000, 500, 2000), "fp16"), ((10, 1000, 500, 2000), "tf32"),
    ((10, 1000, 500, 2000), "fp32"), ((4, 700, 512, 2048), "bf16"),
], ids=["lstm-bf16", "lstm-fp16", "lstm-tf32", "lstm-fp32", "mlp-bf16"])
def test_rank1_autotuned_on_realistic_shapes(shape, dtype):
    # The autotuner times its configs on these very buffers; the weight-gradient kernel
    # accumulates with atomics, so this also checks that it restarts each timing from zero.
    generator = fresh_generator()
    members, rows, d_in, d_out = shape
    check_rank1(members, rows, d_in, d_out, set_dtype(dtype), False, "member", generator)
    check_rank1(members, rows // 2, d_in, d_out, set_dtype(dtype), True, "shared", generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("configs", STEP_CONFIG_PAIRS, ids=lambda pair: "-".join(
    f"{c.kwargs['BLOCK_R']}x{c.kwargs['BLOCK_H']}" for c in pair))
def test_rank1_lstm_every_step_config(configs, dtype, monkeypatch):
    # The whole recurrence (step kernels, the weight gradients after the loop) with each step
    # config, on the paper's hidden size and a batch that is no tile multiple.
    for kernel, config in zip((lstm_kernels._lstm_step_fwd_kernel, lstm_kernels._lstm_step_bwd_kernel), configs):
        monkeypatch.setattr(kernel, "configs", [config])
    # A fresh graph cache, so this window launches its kernels rather than replaying a graph an
    # earlier test captured with another config.
    monkeypatch.setattr(lstm_kernels, "_GRAPHS", lstm_kernels._WindowGraphs())
    set_dtype("fp32" if dtype == torch.float32 else "bf16")
    generator = fresh_generator()
    # IEEE float32 dots, or bf16 through every step
    check_lstm("triton", dtype, generator, device="cuda",
               tolerance=max(TOLERANCE[dtype], LSTM_TOLERANCE[dtype]), members=3, batch=37, steps=6, hidden=500)


@pytest.mark.parametrize("param_grads", [True, False], ids=["param_grads", "input_grads_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rank1_lstm_cuda_graphs_replay_what_direct_launches_compute(dtype, param_grads, monkeypatch):
    # Four steps of two layers' windows, fresh inputs each: both forwards run before either
    # backward, so each layer keeps a graph of its own. The shapes' first window runs without a
    # graph; each graph's first window runs outside any capture, its second captures the
    # forward and backward loops, later ones replay them. Every backward runs twice (retain_graph). All is compared at the end, against the
    # same windows launched directly (the weight-gradient atomics may add in another order), so
    # a result left in a graph's buffers, overwritten by a later replay, fails.
    captures = []
    real_capture = lstm_kernels._capture
    monkeypatch.setattr(lstm_kernels, "_capture", lambda run: captures.append(1) or real_capture(run))
    monkeypatch.setattr(lstm_kernels, "_GRAPHS", lstm_kernels._WindowGraphs())
    set_dtype("fp32" if dtype == torch.float32 else "bf16")
    generator = fresh_generator()
    got, want = [], []
    for _ in range(4):
        layers = []
        for _ in range(2):
            _, args = make_lstm_inputs(dtype, generator, members=3, batch=37, steps=6, hidden=500)
            args = [t.detach().cuda().requires_grad_(param_grads or i not in (1, 2, 3)) for i, t in enumerate(args)]
            layers.append((args, kernels.rank1_lstm(*args)))
        for args, outputs in reversed(layers):
            leaves = [t for t in args if t.requires_grad]
            weights = [torch.randn(o.shape, device="cuda") for o in outputs]
            loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
            grads = torch.autograd.grad(loss, leaves, retain_graph=True)
            again = torch.autograd.grad(loss, leaves)
            direct = kernels.rank1_lstm(*args, cuda_graphs=False)
            direct_grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(direct, weights)), leaves)
            got += [o.detach() for o in outputs] + list(grads) + list(again)
            want += [o.detach() for o in direct] + list(direct_grads) * 2
    for a, b in zip(got, want, strict=True):
        assert relative_error(a.double(), b.double()) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert len(captures) == 4  # each layer's graph: its forward and its backward loop


def randomized_late_model(cfg: ModelConfig, members: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg, LatePhaseConfig(mode="late_phase", K=members))
    with torch.no_grad():
        for p in late_phase_parameters(model):
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg", [
    ModelConfig(family="lstm", vocab_size=256, embed_dim=40, hidden_size=100, num_layers=2, lstm_members="fused"),
    ModelConfig(family="transformer", vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32),
], ids=["lstm_fused", "transformer"])
@pytest.mark.parametrize("member", ["parallel", "all"])
def test_all_members_on_cuda_match_float64_eager_on_cpu(cfg, member):
    # The model's all-members path on the GPU (Triton kernels, float32 IEEE dots) against the
    # same weights in float64 on the CPU (eager ops; the LSTM folded into K nn.LSTMs).
    members = 3
    model = randomized_late_model(cfg, members, seed=7)
    reference = build_model(dataclasses.replace(cfg, lstm_members="folded"), LatePhaseConfig(mode="late_phase", K=members))
    reference.load_state_dict(model.state_dict())
    model.cuda()
    reference.double()
    x = torch.randint(0, 256, (2 * members, 20))
    logits, _ = model(x.cuda(), None, member)
    expected, _ = reference(x, None, member)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    (logits.double() * weights.cuda()).sum().backward()
    (expected * weights).sum().backward()
    assert relative_error(logits.cpu(), expected) < 1e-4
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert relative_error(p.grad.cpu(), ref.grad) < 1e-3, name


@pytest.mark.parametrize("members, member", [(0, 0), (3, 1), (3, "all"), (3, "parallel")])
def test_lstm_under_bf16_autocast_runs_cudnn_in_float32(members, member):
    # CUDA autocast would run every cuDNN LSTM in float16, bf16 or not (AutocastRNN.cpp): with
    # no loss scaling its small gradients underflow. The model runs it in float32 instead.
    cfg = ModelConfig(family="lstm", vocab_size=256, embed_dim=40, hidden_size=100, num_layers=2,
                      lstm_members="folded")
    model = (randomized_late_model(cfg, members, seed=5) if members else build_model(cfg, LatePhaseConfig(mode="plain"))).cuda()
    dtypes = []
    model.rnn.lstm.register_forward_hook(lambda module, args, output: dtypes.append(output[0].dtype))
    x = torch.randint(0, 256, (2 * max(members, 1), 20), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(x, None, member)
    assert dtypes and set(dtypes) == {torch.float32}
    expected, _ = model(x, None, member)
    assert relative_error(logits.double(), expected.double()) < TOLERANCE[torch.bfloat16]


def test_rank1_factors_dispatch_to_triton_on_cuda(monkeypatch):
    calls = []
    real = rank1.Rank1LinearFunction.apply
    monkeypatch.setattr(rank1.Rank1LinearFunction, "apply", lambda *args: calls.append(1) or real(*args))
    assert Rank1Factors.kernel_impl == "auto"
    model = randomized_late_model(ModelConfig(family="transformer", vocab_size=256, d_model=64, n_layers=1,
                                              n_heads=4, max_seq_len=16), 2, seed=3).cuda()
    model(torch.randint(0, 256, (2, 8), device="cuda"), None, "parallel")
    assert calls


@pytest.mark.parametrize("schedule, lstm_members", [
    ("sequential", "auto"), ("parallel", "fused"), ("parallel", "folded"),
])
def test_smoke_training_on_cuda_in_bf16(schedule, lstm_members, tmp_path):
    # The whole CLI path on the GPU in bf16: members spawn, train, average, export, evaluate;
    # then the run resumed from its step-20 checkpoint (SWA under way, its sums loaded from
    # the CPU) to the end again. The parallel schedule runs both all-members ways: fused
    # (rank1_lstm with CUDA graphs, streams carried across windows) and folded (cuDNN).
    out = tmp_path / "run"
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), f"run.out_dir={out}", f"data.dir={tmp_path / 'data'}",
            "train.mixed_precision=bf16", f"late_phase.schedule={schedule}", f"model.lstm_members={lstm_members}",
            "train.batch_size=15",
            "train.max_steps=40", "swa.start=20", "swa.every=10", "train.eval_every=20", "checkpoint.every=20"]
    assert train_lm.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    for split in ("valid", "test"):
        bpc = results[split]["averaged"]
        # The synthetic corpus is far from uniform: 40 steps get well under 8 bits.
        assert 1.0 < bpc < 6.0, (split, bpc)
    shutil.rmtree(out / "checkpoints" / "step_0000040")
    assert train_lm.main([*argv, "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    # Kernels with atomics need not add in the same order twice: close, not bitwise.
    for split in ("valid", "test"):
        for kind in ("averaged", "swa"):
            assert abs(resumed[split][kind] - results[split][kind]) < 0.05, (split, kind)
