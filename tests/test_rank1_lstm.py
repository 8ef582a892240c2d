"""kernels.rank1_lstm (every member's LSTM recurrence over a window, backpropagation through
time by hand) against an independent float64 reference: autograd through a loop written gate
by gate with each member's recurrent matrix materialised.

The eager implementation (the CPU training path) runs everywhere; the Triton one runs in the
CPU interpreter (tests marked `interpreter`; tests/test_gpu.py runs it compiled). Every buffer
the recurrence or a kernel stores into starts NaN-poisoned (`poisoned_outputs`, conftest.py),
so an unwritten element fails the comparison.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import kernels
from kernels import lstm as lstm_kernels
from kernels.optional_triton import TRITON_INSTALLED

K, B, T, H = 3, 5, 4, 7
# Largest error allowed, relative to the largest magnitude of the float64 reference. Worst
# seen over 8 seeds: float32 5.5e-7 (rounding only); bf16 1.9e-2 (the gates, h and the
# recurrent products rounded to 8 significant bits at every step). A wrong formula is off by O(1).
TOLERANCE = {torch.float32: 3e-6, torch.bfloat16: 4e-2}
NAMES = ("x_gates", "weight", "r", "s", "h0", "c0")


def reference(x_gates, weight, r, s, h, c):
    """float64 loop over steps; member k's recurrent matrix W * (r_k s_kᵀ) built explicitly."""
    member_weights = torch.stack([weight * torch.outer(r[k], s[k]) for k in range(r.shape[0])])
    outs = []
    for t in range(x_gates.shape[2]):
        gates = x_gates[:, :, t] + torch.bmm(h, member_weights.transpose(1, 2))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=2), h, c


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def make_inputs(dtype, generator, members=K, batch=B, steps=T, hidden=H):
    """Fresh random leaves (never zeros). x_gates is a slice of a longer window, so the steps are
    read through row strides as the model passes them; c0 is float32 as the model keeps it."""
    def randn(*shape, scale=1.0, dtype=dtype):
        return (scale * torch.randn(*shape, generator=generator)).to(dtype)

    window = randn(members, batch, steps + 2, 4 * hidden).requires_grad_()
    leaves = [window, randn(4 * hidden, hidden, scale=hidden ** -0.5), 1 + randn(members, 4 * hidden, scale=0.3),
              1 + randn(members, hidden, scale=0.3), randn(members, batch, hidden, scale=0.5),
              randn(members, batch, hidden, dtype=torch.float32)]
    for t in leaves[1:]:
        t.requires_grad_()
    return leaves, [window[:, :, 1:-1], *leaves[1:]]


def check_against_reference(impl, dtype, generator, device="cpu", tolerance=None, **sizes):
    """Outputs and all six gradients of rank1_lstm on `device` vs the float64 reference on the CPU."""
    cpu_leaves, _ = make_inputs(dtype, generator, **sizes)
    leaves = [t.detach().to(device).requires_grad_() for t in cpu_leaves]
    out, h, c = kernels.rank1_lstm(leaves[0][:, :, 1:-1], *leaves[1:], impl=impl)
    members, batch, steps, hidden = *cpu_leaves[4].shape[:2], cpu_leaves[0].shape[2] - 2, cpu_leaves[3].shape[1]
    assert out.shape == (members, batch, steps, hidden) and h.shape == c.shape == (members, batch, hidden)
    assert out.dtype == h.dtype == dtype and c.dtype == torch.float32
    leaves64 = [t.detach().double().requires_grad_() for t in cpu_leaves]
    expected = reference(leaves64[0][:, :, 1:-1], *leaves64[1:])
    tolerance = tolerance or TOLERANCE[dtype]
    for name, got, want in zip(("out", "h", "c"), (out, h, c), expected):
        assert relative_error(got.cpu(), want) < tolerance, name
    seeds = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    got = sum((g.double() * w.to(device)).sum() for g, w in zip((out, h, c), seeds))
    grads = torch.autograd.grad(got, leaves)
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, seeds)), leaves64)
    for name, grad, want, leaf in zip(NAMES, grads, expected_grads, leaves):
        assert grad.dtype == leaf.dtype and torch.isfinite(grad).all(), name
        assert relative_error(grad.cpu(), want) < tolerance, name
    assert grads[0][:, :, [0, -1]].abs().max() == 0  # steps outside the slice get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_matches_float64_reference(dtype, poisoned_outputs):
    # bf16 on the CPU is what CPU autocast (train.mixed_precision=bf16) runs.
    check_against_reference("eager", dtype, torch.Generator().manual_seed(1 + (dtype == torch.bfloat16)))
    # out, then each step's cell and activations; then d gates
    assert poisoned_outputs == [(K, B, T, H), *[(K, B, H), (K, B, 4 * H)] * T, (K, B, T, 4 * H)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_float64_reference(dtype, poisoned_outputs):
    check_against_reference("triton", dtype, torch.Generator().manual_seed(zlib.crc32(str(dtype).encode())))
    # One launch per step each way: each step's cell and activations (forward), each step's
    # d c_prev (backward), then d h0 (rank-1 dx kernel); no per-step recurrent products.
    assert poisoned_outputs.count((K, B, H)) == 2 * T + 1
    assert poisoned_outputs.count((K, B, 4 * H)) == T


@pytest.mark.interpreter
def test_triton_over_several_tiles_matches_float64_reference():
    # More rows, units and reduction chunks than one interpreter tile holds (64 each way), so
    # every loop and edge mask of the step kernels runs; the row tiles straddle members.
    check_against_reference("triton", torch.float32, torch.Generator().manual_seed(9),
                            members=3, batch=27, steps=3, hidden=70)


@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_without_grad_no_activations_are_kept(impl, poisoned_outputs):
    _, args = make_inputs(torch.float32, torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, h, c = kernels.rank1_lstm(*args, impl=impl)
    assert poisoned_outputs.count((K, B, 4 * H)) == 0  # no activations kept
    assert poisoned_outputs.count((K, B, H)) == T  # each step's cell
    expected = reference(*(t.double() for t in args))
    assert max(relative_error(got, want) for got, want in zip((out, h, c), expected)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("impl", ["eager", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_state_is_read_through_strides_as_the_parallel_schedule_passes_it(impl):
    # The LSTM model regroups its (layers, B, H) state by member, so h0 and c0 arrive as
    # strided views (member stride H, stream stride K x H); values and gradients must not
    # depend on the layout.
    generator = torch.Generator().manual_seed(8)
    _, (x_gates, weight, r, s, _, _) = make_inputs(torch.float32, generator)
    states = [torch.randn(2, B * K, H, generator=generator).requires_grad_() for _ in range(2)]
    by_member = lambda t: t.unflatten(1, (-1, K)).movedim(2, 0)[:, 1]  # layer 1 as (K, B, H)
    h0, c0 = (by_member(t) for t in states)
    assert h0.stride() == (H, K * H, 1)
    got = kernels.rank1_lstm(x_gates, weight, r, s, h0, c0, impl=impl)
    states64 = [t.detach().double().requires_grad_() for t in states]
    expected = reference(*(t.detach().double() for t in (x_gates, weight, r, s)), *(by_member(t) for t in states64))
    for name, a, b in zip(("out", "h", "c"), got, expected):
        assert relative_error(a, b) < TOLERANCE[torch.float32], name
    seeds = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    grads = torch.autograd.grad(sum((a.double() * w).sum() for a, w in zip(got, seeds)), states)
    expected_grads = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, seeds)), states64)
    for name, a, b in zip(("h0", "c0"), grads, expected_grads):
        assert b[1].abs().max() > 0 and b[0].abs().max() == 0  # only layer 1 is read
        assert relative_error(a, b) < TOLERANCE[torch.float32], name


def test_windows_chain_through_the_returned_state():
    # Two windows carrying (h, c) equal one window over both, in value and in every gradient.
    leaves, (x_gates, *rest) = make_inputs(torch.float32, torch.Generator().manual_seed(3))
    weight, r, s, h0, c0 = rest
    whole, h_whole, c_whole = kernels.rank1_lstm(x_gates, *rest, impl="eager")
    first, h1, c1 = kernels.rank1_lstm(x_gates[:, :, :2], weight, r, s, h0, c0, impl="eager")
    second, h2, c2 = kernels.rank1_lstm(x_gates[:, :, 2:], weight, r, s, h1, c1, impl="eager")
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((h2, c2), (h_whole, c_whole), rtol=1e-6, atol=1e-6)
    seed = torch.randn(whole.shape)
    grads_whole = torch.autograd.grad((whole * seed).sum() + c_whole.sum(), leaves)
    grads_split = torch.autograd.grad((torch.cat([first, second], dim=2) * seed).sum() + c2.sum(), leaves)
    for name, a, b in zip(NAMES, grads_split, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.interpreter
def test_autocast_runs_in_the_autocast_dtype():
    _, args = make_inputs(torch.float32, torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h, c = kernels.rank1_lstm(*args, impl="triton")
    assert out.dtype == h.dtype == torch.bfloat16 and c.dtype == torch.float32
    expected = reference(*(t.detach().double() for t in args))
    assert relative_error(out, expected[0]) < TOLERANCE[torch.bfloat16]


def float64_inputs() -> list[torch.Tensor]:
    _, args = make_inputs(torch.float64, torch.Generator().manual_seed(5))
    return [t.detach().double() for t in args]


def test_float64_runs_eager():
    args = float64_inputs()
    out, h, c = kernels.rank1_lstm(*args, impl="auto")
    assert c.dtype == torch.float64
    for got, want in zip((out, h, c), reference(*args)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not TRITON_INSTALLED, reason="without Triton the message names Triton (test_without_triton.py)")
def test_float64_is_refused_by_the_kernels():
    with pytest.raises(ValueError, match="float64 runs with impl='eager'"):
        kernels.rank1_lstm(*float64_inputs(), impl="triton")


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (0, lambda t: t[..., :-1], r"x_gates must be \(K, B, T, 4H\)"),
        (0, lambda t: t[:, :, :0], r"no time steps"),
        (1, lambda t: t[:, :-1], rf"weight must be \({4 * H}, {H}\)"),
        (2, lambda t: t[:-1], rf"r must be \({K}, {4 * H}\)"),
        (3, lambda t: t.bfloat16(), r"s has dtype torch.bfloat16 but x_gates has torch.float32"),
        (4, lambda t: t[:, :-1], rf"h0 must be \({K}, {B}, {H}\)"),
        (5, lambda t: t.long(), r"c0 has dtype torch.int64"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(index, bad, message):
    _, args = make_inputs(torch.float32, torch.Generator().manual_seed(6))
    args = [t.detach() for t in args]
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=message):
        kernels.rank1_lstm(*args, impl="eager")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.rank1_lstm(*make_inputs(torch.float32, torch.Generator().manual_seed(6))[1], impl="cuda")


# --------------------------------------------------------------------------------------
# CUDA graphs of whole windows (kernels.lstm._WindowGraph), with the capture emulated on the
# CPU: the eager steps run through the same buffers and bookkeeping a GPU would replay.
# --------------------------------------------------------------------------------------
@pytest.fixture
def emulated_graphs(monkeypatch):
    """A fresh graph cache whose captures run on the CPU; returns the list of captures."""
    captures = []

    def capture(run):
        outputs = run()  # a real capture records without running; this also fills the buffers once

        def replay():  # what a graph does: rerun on the fixed inputs, into the fixed outputs
            for static, fresh in zip(outputs, run()):
                if static is not None:
                    static.copy_(fresh)

        captures.append(outputs)
        return replay, outputs

    monkeypatch.setattr(lstm_kernels, "_capture", capture)
    monkeypatch.setattr(lstm_kernels, "_GRAPHS", lstm_kernels._WindowGraphs())
    return captures


def window(args, graphed, save=True):
    return lstm_kernels.Rank1LSTMFunction.apply(*args, "eager", save, graphed)


def window_grads(outputs, args, seed):
    """A window's (out, h, c) and the gradients of a random linear loss of them with respect to
    every input requiring one."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outputs)
    return [o.detach() for o in outputs], torch.autograd.grad(loss, [t for t in args if t.requires_grad])


def forward_and_grads(args, graphed, seed):
    return window_grads(window(args, graphed), args, seed)


def assert_same_window(got, want):
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def fresh_args(seed, param_grads=True):
    _, args = make_inputs(torch.float32, torch.Generator().manual_seed(seed))
    args = [t.detach().requires_grad_() for t in args]
    if not param_grads:
        for t in args[1:4]:
            t.requires_grad_(False)
    return args


@pytest.mark.parametrize("param_grads", [True, False], ids=["param_grads", "input_grads_only"])
def test_graphed_windows_match_direct_ones(emulated_graphs, param_grads):
    # New inputs every window, so a graph replaying stale inputs fails. Window 1 runs without a
    # graph, window 2 runs both loops in the graph's buffers outside a capture (warm-up),
    # window 3's forward captures both, windows 4 and 5 replay. Windows are compared at the
    # end: what a caller got must survive later replays.
    got, want = [], []
    for seed in range(5):
        args = fresh_args(10 + seed, param_grads)
        outputs = window(args, True)
        assert len(emulated_graphs) == (0 if seed < 2 else 2)  # no capture in a backward
        got.append(window_grads(outputs, args, seed))
        want.append(forward_and_grads(args, False, seed))
    for g, w in zip(got, want):
        assert_same_window(g, w)
    assert len(lstm_kernels._GRAPHS.by_shape) == 1
    (graphs,) = lstm_kernels._GRAPHS.by_shape.values()
    assert len(graphs) == 1 and not graphs[0].busy()


def test_windows_waiting_for_their_backward_each_keep_a_graph(emulated_graphs, monkeypatch):
    # Two layers of equal sizes: both forwards run before either backward, for three steps;
    # each layer's activations must survive the other's forward.
    for step in range(3):
        args = [fresh_args(20 + 2 * step + layer) for layer in range(2)]
        outputs = [window(a, True) for a in args]
        for layer in reversed(range(2)):
            assert_same_window(window_grads(outputs[layer], args[layer], layer),
                               forward_and_grads(args[layer], False, layer))
    (graphs,) = lstm_kernels._GRAPHS.by_shape.values()
    assert len(graphs) == 2
    # With room for one graph only, the second waiting window runs without one, correctly.
    monkeypatch.setattr(lstm_kernels, "GRAPHS_PER_SHAPE", 1)
    monkeypatch.setattr(lstm_kernels, "_GRAPHS", lstm_kernels._WindowGraphs())
    first = fresh_args(29)
    window_grads(window(first, True), first, 0)  # the shapes' first window: no graph yet
    args = [fresh_args(30 + layer) for layer in range(2)]
    outputs = [window(a, True) for a in args]
    (graphs,) = lstm_kernels._GRAPHS.by_shape.values()
    assert len(graphs) == 1 and graphs[0].busy()
    for a, o in zip(args, outputs):
        assert_same_window(window_grads(o, a, 0), forward_and_grads(a, False, 0))


def test_a_window_dropped_before_its_backward_frees_its_graph(emulated_graphs):
    args = fresh_args(40)
    window_grads(window(args, True), args, 0)  # the shapes' first window: no graph yet
    outputs = window(args, True)
    (graphs,) = lstm_kernels._GRAPHS.by_shape.values()
    assert graphs[0].busy()
    del outputs  # the autograd graph, and with it the token, is freed
    assert not graphs[0].busy()
    for _ in range(3):  # forwards that save nothing (evaluation) never hold their graph
        with torch.no_grad():
            out = window([t.detach() for t in args], True, save=False)
    no_save = [g for key, gs in lstm_kernels._GRAPHS.by_shape.items() if not key[1] for g in gs]
    assert len(no_save) == 1 and not no_save[0].busy() and len(emulated_graphs) == 1
    expected = reference(*(t.detach().double() for t in args))
    for got, want in zip(out, expected):
        assert relative_error(got, want) < TOLERANCE[torch.float32]


def test_graphs_only_for_shapes_seen_twice_and_only_the_recent_shapes_kept(emulated_graphs, monkeypatch):
    # A graph keeps copies of its window's inputs, so a shape that comes once (a split's last,
    # shorter evaluation window) must not get one, and old shapes must not pile up.
    monkeypatch.setattr(lstm_kernels, "MAX_SHAPES", 2)
    generator = torch.Generator().manual_seed(45)

    def evaluate(steps):
        _, args = make_inputs(torch.float32, generator, steps=steps)
        with torch.no_grad():
            out = window([t.detach() for t in args], True, save=False)
        for got, want in zip(out, reference(*(t.detach().double() for t in args))):
            assert relative_error(got, want) < TOLERANCE[torch.float32]
        # steps of every set of shapes remembered (its x_gates is (K, B, T, 4H)), oldest first,
        # with the number of graphs each holds
        return [(key[4][0][2], len(graphs)) for key, graphs in lstm_kernels._GRAPHS.by_shape.items()]

    assert evaluate(5) == [(5, 0)]
    assert evaluate(5) == [(5, 1)]
    assert evaluate(6) == [(5, 1), (6, 0)]
    assert evaluate(7) == [(6, 0), (7, 0)]  # the least recently used shape is forgotten
    assert evaluate(6) == [(7, 0), (6, 1)]
    assert evaluate(8) == [(6, 1), (8, 0)]
    assert evaluate(6) == [(8, 0), (6, 1)] and len(emulated_graphs) == 1  # the third window of 6 steps


def test_warm_up_runs_on_the_buffers_the_capture_records(emulated_graphs, monkeypatch):
    # Triton specialises a kernel on its pointers' 16-byte alignment and on its strides; a capture
    # meeting an unseen variant would compile inside the capture. So each loop's warm-up must
    # see the layouts its capture records, incoming gradients included, which here arrive
    # strided (the loss reads the outputs transposed).
    calls = {"forward": [], "backward": []}
    capturing = []

    def spy(kind, run_window):
        def spied(steps, flag, *tensors):
            layout = [(t.data_ptr() % 16, t.shape, t.stride()) for t in tensors]
            calls[kind].append((bool(capturing), layout))
            return run_window(steps, flag, *tensors)
        return spied

    def capture(run, emulate=lstm_kernels._capture):
        capturing.append(True)
        try:
            return emulate(run)
        finally:
            capturing.pop()

    monkeypatch.setattr(lstm_kernels, "_forward_window", spy("forward", lstm_kernels._forward_window))
    monkeypatch.setattr(lstm_kernels, "_backward_window", spy("backward", lstm_kernels._backward_window))
    monkeypatch.setattr(lstm_kernels, "_capture", capture)
    for seed in range(3):  # window 0 has no graph, window 1 warms both loops up, window 2 captures both
        args = fresh_args(50 + seed)
        outputs = [o.transpose(0, 1) for o in window(args, True)]
        window_grads(outputs, args, seed)
    for kind in ("forward", "backward"):
        first_captured = next(i for i, (captured, _) in enumerate(calls[kind]) if captured)
        warm_up, recorded = calls[kind][first_captured - 1][1], calls[kind][first_captured][1]
        assert warm_up == recorded, kind


def test_a_second_backward_through_a_graphed_window_repeats_the_first(emulated_graphs):
    # retain_graph=True: a window's activations stay in its graph after its backward, until the
    # graph runs another window. Windows 0 to 3 cover no graph, the warm-up, the capture and a replay.
    generator = torch.Generator().manual_seed(60)
    for seed in range(4):
        args = fresh_args(60 + seed)
        outputs = window(args, True)
        weights = [torch.randn(o.shape, generator=generator) for o in outputs]
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        first = torch.autograd.grad(loss, args, retain_graph=True)
        second = torch.autograd.grad(loss, args, retain_graph=True)
        direct = torch.autograd.grad(sum((o * w).sum() for o, w in zip(window(args, False), weights)), args)
        for a, b, c in zip(first, second, direct):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6)
    later = fresh_args(64)
    window(later, True)  # the one graph (free since the backward) now holds another window
    with pytest.raises(RuntimeError, match="retain_graph=True.*cuda_graphs=False"):
        torch.autograd.grad(loss, args)
