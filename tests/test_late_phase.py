"""The late-phase method: factors, averaging, spawning, ensemble, schedule, optimisers, stepper."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lm.config import LatePhaseConfig, ModelConfig, TrainConfig
from lm.late_phase import (
    LatePhaseLinear,
    LatePhaseStepper,
    MemberAdamW,
    MemberSchedule,
    MemberSGD,
    Rank1Factors,
    average_members,
    build_optimizers,
    ensemble_log_probs,
    late_phase_parameters,
    num_members,
    shared_parameters,
    spawn_members,
)
from lm.models import build_model

TINY = {
    "lstm": ModelConfig(family="lstm", vocab_size=256, embed_dim=8, hidden_size=12, num_layers=2),
    "transformer": ModelConfig(family="transformer", vocab_size=256, d_model=16, n_layers=2, n_heads=2,
                               max_seq_len=16, layernorm_factors=True),
}


@pytest.fixture(autouse=True)
def fast_tiny_models(monkeypatch):
    # The Triton interpreter takes seconds per call; the kernel's own tests cover it.
    monkeypatch.setattr(Rank1Factors, "kernel_impl", "eager")
    # Tiny models: a second intra-op thread only adds OpenMP spin-waiting on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_members(model, seed=0):
    """Distinct random member rows (factors around 1, biases around 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in late_phase_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def loss_of(model, x, y, member):
    logits, _ = model(x, None, member)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")


def test_parameter_split_and_member_count():
    model = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=4))
    lp, shared = late_phase_parameters(model), shared_parameters(model)
    assert num_members(model) == 4 and all(p.shape[0] == 4 for p in lp)
    assert {id(p) for p in lp}.isdisjoint(id(p) for p in shared)
    assert len(lp) + len(shared) == len(list(model.parameters()))
    # 2 layers x (ih, hh) x (r, s, bias)
    assert len(lp) == 12
    plain = build_model(TINY["lstm"], LatePhaseConfig(mode="plain"))
    assert num_members(plain) == 1 and late_phase_parameters(plain) == []


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_fresh_factored_model_computes_the_plain_model(family):
    x = torch.randint(0, 256, (3, 7))
    outs = []
    for mode in ("plain", "rank1", "late_phase"):
        torch.manual_seed(11)
        model = build_model(TINY[family], LatePhaseConfig(mode=mode, K=3))
        outs.append(model(x, None, 0)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_average_of_identical_members_is_the_tied_model_exactly(family):
    model = build_model(TINY[family], LatePhaseConfig(mode="late_phase", K=3))
    randomize_members(model)
    spawn_members(model, sigma0=0.0, generator=torch.Generator().manual_seed(0))
    averaged = average_members(model)
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(averaged(x)[0], model(x, None, 0)[0])
    assert torch.equal(averaged(x)[0], model(x, None, 2)[0])


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_averaged_weights_match_float64_hand_computation(family):
    model = build_model(TINY[family], LatePhaseConfig(mode="late_phase", K=3))
    randomize_members(model, seed=3)
    averaged = dict(average_members(model).named_parameters())
    if family == "lstm":
        W = model.rnn.lstm.weight_hh_l1
        f = model.rnn.factors["hh_l1"]
        name_w, name_b = "rnn.lstm.weight_hh_l1", "rnn.lstm.bias_hh_l1"
    else:
        W = model.blocks[1].mlp.fc.weight
        f = model.blocks[1].mlp.fc.factors
        name_w, name_b = "blocks.1.mlp.fc.weight", "blocks.1.mlp.fc.bias"
    W64, r, s, b = W.double(), f.r.double(), f.s.double(), f.bias.double()
    expected = sum(W64 * torch.outer(r[k], s[k]) for k in range(3)) / 3
    torch.testing.assert_close(averaged[name_w].double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(averaged[name_b].double(), (b[0] + b[1] + b[2]) / 3, rtol=1e-6, atol=1e-7)
    wrong = W64 * torch.outer(r.mean(0), s.mean(0))  # averaging r and s separately is not the weight average
    assert (averaged[name_w].double() - wrong).abs().max() > 1e-4
    if family == "transformer":
        gains = model.blocks[0].ln2.gains.weight.double()
        torch.testing.assert_close(averaged["blocks.0.ln2.weight"].double(), gains.sum(0) / 3, rtol=1e-6, atol=1e-7)


def test_averaged_linear_layer_equals_mean_of_member_outputs():
    # A linear layer is linear in its weights, so the weight average IS the output average.
    layer = LatePhaseLinear(6, 5, num=4).double()
    randomize_members(layer, seed=5)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(7, 6, dtype=torch.float64)
    mean_out = sum(layer(x, k) for k in range(4)) / 4
    state = layer.averaged_state()
    torch.testing.assert_close(F.linear(x, state["weight"], state["bias"]), mean_out)


def test_stacked_linear_matches_members():
    layer = LatePhaseLinear(6, 5, num=3)
    randomize_members(layer, seed=6)
    x = torch.randn(3, 2, 4, 6)
    shared = torch.randn(2, 4, 6)
    stacked, everyone = layer(x, "parallel"), layer(shared, "all")
    assert stacked.shape == (3, 2, 4, 5) and everyone.shape == (3, 2, 4, 5)
    for k in range(3):
        torch.testing.assert_close(stacked[k], layer(x[k], k), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(everyone[k], layer(shared, k), rtol=1e-5, atol=1e-6)


def test_spawn_copies_row_zero_and_adds_relative_noise():
    model = build_model(TINY["transformer"], LatePhaseConfig(mode="late_phase", K=3))
    randomize_members(model, seed=7)
    before = [p.detach().clone() for p in late_phase_parameters(model)]
    spawn_members(model, sigma0=0.1, generator=torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    for old, new in zip(before, late_phase_parameters(model)):
        rms = old[0].pow(2).mean().sqrt()
        expected = old[0].expand_as(old) + 0.1 * rms * torch.randn(old.shape, generator=g)
        torch.testing.assert_close(new.detach(), expected)
        assert not torch.equal(new[0], new[1])


def test_ensemble_log_probs_matches_hand_computation():
    logits = torch.randn(3, 2, 5, 7) * 3
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    expected = np.log(p.mean(0))
    got = ensemble_log_probs(logits)
    assert got.shape == (2, 5, 7)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # not the softmax of the mean logits
    assert (got - F.log_softmax(logits.mean(0), -1)).abs().max() > 1e-3


def test_member_schedule_sequential_and_parallel():
    seq = MemberSchedule(K=3, T0_step=4, schedule="sequential", gamma="sum")
    assert [seq.member(t) for t in range(11)] == [0, 0, 0, 0, 0, 1, 2, 0, 1, 2, 0]
    assert [seq.phase(t) for t in (3, 4)] == ["tied", "late"]
    assert [t for t in range(12) if seq.steps_shared(t)] == [0, 1, 2, 3, 6, 9]
    assert [t for t in range(12) if seq.spawns_at(t)] == [3]
    par = MemberSchedule(K=3, T0_step=0, schedule="parallel")
    assert par.member(0) == 0 and par.member(1) == "parallel" and par.spawns_at(0)  # T0 = 0 acts as 1
    assert all(par.steps_shared(t) for t in range(6))
    tied = MemberSchedule.from_config(LatePhaseConfig(mode="rank1", K=10), T0_step=5)
    assert tied.K == 1 and {tied.member(t) for t in range(20)} == {0} and not any(map(tied.spawns_at, range(20)))
    with pytest.raises(ValueError, match="schedule"):
        MemberSchedule(K=3, T0_step=1, schedule="round_robin")


def test_member_adamw_steps_only_the_active_row_and_matches_torch_adamw():
    # Two tensors of different widths: the update runs over a list of row views at once.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(3, 2))]
    rows = [[torch.nn.Parameter(p[k].detach().clone()) for k in range(3)] for p in params]
    opt = MemberAdamW(params, lr=0.05, betas=(0.8, 0.95), weight_decay=0.3)
    refs = [[torch.optim.AdamW([row], lr=0.05, betas=(0.8, 0.95), weight_decay=0.3) for row in p_rows] for p_rows in rows]
    for active in [1, 1, 0, 2, 1, None, 0]:
        stepped = range(3) if active is None else [active]
        for p in params:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in params]
        opt.active = active
        opt.step()
        for p, old, p_rows, p_refs in zip(params, before, rows, refs):
            for k in range(3):
                if k in stepped:
                    p_rows[k].grad = p.grad[k].clone()
                    p_refs[k].step()
                    torch.testing.assert_close(p[k].detach(), p_rows[k].detach(), rtol=1e-6, atol=1e-7)
                else:
                    assert torch.equal(p[k], old[k])
    assert [opt.state[p]["step"].tolist() for p in params] == [[3.0, 4.0, 2.0]] * 2


def test_member_adamw_single_member_steps_are_torch_foreach_adamw_bit_for_bit():
    # The usual step (one member, its rows sharing a count) takes scalar bias corrections from
    # step counts kept on the CPU: the same ops as torch's foreach AdamW, so the same bits.
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(4, 6))
    row = torch.nn.Parameter(p[2].detach().clone())
    opt = MemberAdamW([p], lr=0.03, betas=(0.85, 0.97), weight_decay=0.2)
    ref = torch.optim.AdamW([row], lr=0.03, betas=(0.85, 0.97), weight_decay=0.2, foreach=True)
    for _ in range(4):
        g = torch.randn(4, 6)
        p.grad, row.grad = g, g[2].clone()
        opt.active = 2
        opt.step()
        ref.step()
        assert torch.equal(p[2], row)
    assert opt.state[p]["step"].device.type == "cpu" and opt.state[p]["step"].tolist() == [0, 0, 4, 0]


def test_member_sgd_matches_torch_sgd_on_the_active_row():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(2, 4))
    row = torch.nn.Parameter(p[1].detach().clone())
    opt = MemberSGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD([row], lr=0.1, momentum=0.9, weight_decay=0.01)
    frozen = p[0].detach().clone()
    for _ in range(3):
        g = torch.randn(2, 4)
        p.grad, row.grad = g.clone(), g[1].clone()
        opt.active = 1
        opt.step()
        ref.step()
    torch.testing.assert_close(p[1].detach(), row.detach())
    assert torch.equal(p[0], frozen)


def test_member_optimizer_state_dict_round_trip():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = MemberAdamW([p], lr=0.01, weight_decay=0.1)
    for active in (0, 2, 2):
        p.grad = torch.randn(3, 4)
        opt.active = active
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    restored = MemberAdamW([q], lr=0.01, weight_decay=0.1)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    g = torch.randn(3, 4)
    for o, t in ((opt, p), (restored, q)):
        t.grad = g.clone()
        o.active = 2
        o.step()
    assert torch.equal(p, q)
    assert restored.state[q]["step"].tolist() == [1.0, 0.0, 3.0]


# ---------------------------------------------------------------------------------------------
# Algorithm 1 against a hand-written reference loop


def clip_by_hand(params, max_norm, norms):
    """clip_grad_norm_ written out in float64: scale by max_norm / (norm + 1e-6) when that is < 1."""
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))
    norms.append(total)
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


def reference_sequential(model0, batches, K, T0, gamma, lr, wd, optimizer="adamw", max_norm=None, norms=None):
    """Algorithm 1 written out: one torch optimiser per member on separate row tensors, one for shared.

    optimizer: "adamw", or "sgd" (momentum 0.9). max_norm: gradient clipping as LatePhaseStepper's
    docstring states it: tied steps clip everything together; late steps clip the active member's
    rows on each minibatch, and the shared gradients once per cycle, after the gamma scaling.
    `norms` collects the norms seen by each clip (so a test can check that it really clipped)."""
    def make(ps):
        if optimizer == "sgd":
            return torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd)
        return torch.optim.AdamW(ps, lr=lr, weight_decay=wd)

    def clip(ps):
        if max_norm is not None:
            clip_by_hand(ps, max_norm, norms)

    model = copy.deepcopy(model0)
    lp_names = [n for n, p in model.named_parameters() if any(p is q for q in late_phase_parameters(model))]
    params = dict(model.named_parameters())
    rows = [{n: params[n][k].detach().clone().requires_grad_() for n in lp_names} for k in range(K)]
    member_opts = [make(list(r.values())) for r in rows]
    shared = [p for n, p in params.items() if n not in lp_names]
    shared_opt = make(shared)
    history = []
    for t, (x, y) in enumerate(batches):
        k = 0 if t < T0 else (t - T0) % K
        stacked = {n: torch.stack([rows[j][n] for j in range(K)]) for n in lp_names}
        logits, _ = functional_call(model, stacked, (x, None, k))
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        for j in range(K):  # rows of other members received zero gradients: drop them
            if j != k:
                for v in rows[j].values():
                    v.grad = None
        clip((shared if t < T0 else []) + list(rows[k].values()))
        member_opts[k].step()
        member_opts[k].zero_grad()
        if t < T0 or (t - T0) % K == K - 1:
            if t >= T0:
                if gamma == "mean":
                    for p in shared:
                        p.grad /= K
                clip(shared)
            shared_opt.step()
            shared_opt.zero_grad()
        if t == T0 - 1:  # spawn: copy the tied row and its optimiser state
            for j in range(1, K):
                with torch.no_grad():
                    for n in lp_names:
                        rows[j][n].copy_(rows[0][n])
                state0 = member_opts[0].state_dict()
                member_opts[j].load_state_dict(copy.deepcopy(state0))
        history.append(({n: torch.stack([rows[j][n].detach() for j in range(K)]) for n in lp_names},
                        [p.detach().clone() for p in shared]))
    return history


@pytest.mark.parametrize("gamma", ["sum", "mean"])
@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_sequential_schedule_matches_reference_loop(family, gamma):
    K, T0, lr, wd = 3, 2, 0.02, 0.1
    torch.manual_seed(5)
    # float64, so that the comparison is not at the mercy of Adam's amplified rounding
    model = build_model(TINY[family], LatePhaseConfig(mode="late_phase", K=K)).double()
    randomize_members(model, seed=9)
    spawn_members(model, 0.0, torch.Generator())  # rows equal, but not the initial ones
    batches = [(torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 6))) for _ in range(T0 + 2 * K)]
    history = reference_sequential(model, batches, K, T0, gamma, lr, wd)

    schedule = MemberSchedule(K, T0, "sequential", gamma)
    shared_opt = torch.optim.AdamW(shared_parameters(model), lr=lr, weight_decay=wd)
    member_opt = MemberAdamW(late_phase_parameters(model), lr=lr, weight_decay=wd)
    stepper = LatePhaseStepper(model, schedule, shared_opt, member_opt)
    lp = late_phase_parameters(model)
    lp_names = [n for n, p in model.named_parameters() if any(p is q for q in lp)]
    for t, (x, y) in enumerate(batches):
        member = schedule.member(t)
        rows_before = [p.detach().clone() for p in lp]
        shared_before = [p.detach().clone() for p in shared_parameters(model)]
        F.cross_entropy(model(x, None, member)[0].flatten(0, 1), y.flatten()).backward()
        stepper.after_backward(t)
        if schedule.phase(t) == "late":
            for before, p in zip(rows_before, lp):
                for j in range(K):
                    assert torch.equal(p[j], before[j]) == (j != member), (t, j)
            changed = any(not torch.equal(a, b) for a, b in zip(shared_before, shared_parameters(model)))
            assert changed == schedule.steps_shared(t)
        ref_rows, ref_shared = history[t]
        params = dict(model.named_parameters())
        for n in lp_names:
            torch.testing.assert_close(params[n].detach(), ref_rows[n], rtol=1e-10, atol=1e-12)
        for p, q in zip(shared_parameters(model), ref_shared):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)
        assert all(p.grad is None for p in lp)
    # after 2 full cycles each member took T0 tied steps (copied at spawn) plus exactly 2 of its own
    assert member_opt.state[lp[0]]["step"].tolist() == [T0 + 2.0] * K


@pytest.mark.parametrize("gamma", ["sum", "mean"])
@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_sequential_schedule_with_clipping_matches_reference_loop(family, gamma):
    # SGD with momentum, not Adam: Adam's step hardly depends on the gradient's scale, clipping's.
    K, T0, lr, wd, max_norm = 3, 2, 0.1, 0.01, 0.02
    torch.manual_seed(15)
    model = build_model(TINY[family], LatePhaseConfig(mode="late_phase", K=K)).double()
    randomize_members(model, seed=16)
    spawn_members(model, 0.0, torch.Generator())
    batches = [(torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 6))) for _ in range(T0 + 2 * K)]
    norms = []
    history = reference_sequential(model, batches, K, T0, gamma, lr, wd, optimizer="sgd", max_norm=max_norm, norms=norms)
    # every clip really clipped: tied steps, each late minibatch's member rows, each cycle's shared step
    assert len(norms) == T0 + 2 * K + 2 and min(norms) > 2 * max_norm, norms

    schedule = MemberSchedule(K, T0, "sequential", gamma)
    shared_opt = torch.optim.SGD(shared_parameters(model), lr=lr, momentum=0.9, weight_decay=wd)
    member_opt = MemberSGD(late_phase_parameters(model), lr=lr, momentum=0.9, weight_decay=wd)
    stepper = LatePhaseStepper(model, schedule, shared_opt, member_opt,
                               clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm))
    lp = late_phase_parameters(model)
    lp_names = [n for n, p in model.named_parameters() if any(p is q for q in lp)]
    for t, (x, y) in enumerate(batches):
        F.cross_entropy(model(x, None, schedule.member(t))[0].flatten(0, 1), y.flatten()).backward()
        stepper.after_backward(t)
        ref_rows, ref_shared = history[t]
        params = dict(model.named_parameters())
        for n in lp_names:
            torch.testing.assert_close(params[n].detach(), ref_rows[n], rtol=1e-10, atol=1e-12, msg=f"step {t} {n}")
        for p, q in zip(shared_parameters(model), ref_shared):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12, msg=f"step {t}")


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_parallel_gradients_are_the_sum_of_member_gradients(family):
    K = 3
    model = build_model(TINY[family], LatePhaseConfig(mode="late_phase", K=K))
    randomize_members(model, seed=4)
    x, y = torch.randint(0, 256, (2 * K, 5)), torch.randint(0, 256, (2 * K, 5))
    loss_of(model, x, y, "parallel").backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for k in range(K):
        loss_of(model, x[k::K], y[k::K], k).backward()
    for g, p in zip(together, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_parallel_stepper_steps_every_row_and_shared_every_minibatch():
    K = 2
    model = build_model(TINY["transformer"], LatePhaseConfig(mode="late_phase", K=K))
    schedule = MemberSchedule(K, 1, "parallel")
    shared_opt, member_opt = build_optimizers(model, TrainConfig(lr=0.01, weight_decay=0.1), LatePhaseConfig(K=K))
    stepper = LatePhaseStepper(model, schedule, shared_opt, member_opt, clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0))
    for t in range(4):
        before_rows = [p.detach().clone() for p in late_phase_parameters(model)]
        before_shared = [p.detach().clone() for p in shared_parameters(model)]
        x = torch.randint(0, 256, (4, 6))
        loss_of(model, x, x.roll(1, 1), schedule.member(t)).backward()
        stepper.after_backward(t)
        rows_changed = {j for b, p in zip(before_rows, late_phase_parameters(model)) for j in range(K)
                        if not torch.equal(b[j], p[j])}
        assert rows_changed == {0, 1}  # t = 0: row 0 stepped, then copied to row 1 by the spawn
        if t == 0:
            assert all(torch.equal(p[0], p[1]) for p in late_phase_parameters(model))
        assert all(not torch.equal(b, p) for b, p in zip(before_shared, shared_parameters(model)) if b.dim() == 2)
    assert member_opt.state[late_phase_parameters(model)[0]]["step"].tolist() == [4.0, 4.0]


def test_stepper_resumes_mid_cycle_exactly():
    K, T0 = 3, 1
    torch.manual_seed(8)
    model = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=K))
    batches = [torch.randint(0, 256, (2, 6)) for _ in range(T0 + K)]
    schedule = MemberSchedule(K, T0, "sequential", "mean")

    def make(m):
        shared_opt, member_opt = build_optimizers(m, TrainConfig(lr=0.01), LatePhaseConfig(K=K))
        return LatePhaseStepper(m, schedule, shared_opt, member_opt, sigma0=0.05, seed=3), shared_opt, member_opt

    def run(m, stepper, steps):
        for t in steps:
            loss_of(m, batches[t], batches[t].roll(1, 1), schedule.member(t)).backward()
            stepper.after_backward(t)

    straight = copy.deepcopy(model)
    stepper, *_ = make(straight)
    run(straight, stepper, range(T0 + K))

    first, (stepper1, s1, m1) = model, make(model)
    run(first, stepper1, range(T0 + 1))  # stop inside the first late cycle
    assert stepper1.pending == 1
    saved = copy.deepcopy((first.state_dict(), s1.state_dict(), m1.state_dict(), stepper1.state_dict()))
    resumed = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=K))
    resumed.load_state_dict(saved[0])
    stepper2, s2, m2 = make(resumed)
    s2.load_state_dict(saved[1])
    m2.load_state_dict(saved[2])
    stepper2.load_state_dict(saved[3])
    run(resumed, stepper2, range(T0 + 1, T0 + K))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_stepper_through_accelerate_wrapped_optimizers():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    K = 2
    model = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=K))
    shared_opt, member_opt = build_optimizers(model, TrainConfig(lr=0.01, weight_decay=0.1), LatePhaseConfig(K=K))
    model, shared_opt, member_opt = accelerator.prepare(model, shared_opt, member_opt)
    schedule = MemberSchedule(K, 1, "sequential")
    stepper = LatePhaseStepper(model, schedule, shared_opt, member_opt, clip=lambda ps: accelerator.clip_grad_norm_(ps, 1.0))
    for t in range(3):
        before = [p.detach().clone() for p in late_phase_parameters(model)]
        x = torch.randint(0, 256, (2, 6))
        accelerator.backward(loss_of(model, x, x.roll(1, 1), schedule.member(t)))
        stepper.after_backward(t)
        if t >= 1:
            k = schedule.member(t)
            for b, p in zip(before, late_phase_parameters(model)):
                assert torch.equal(b[1 - k], p[1 - k]) and not torch.equal(b[k], p[k])


def test_rank1_equals_late_phase_before_T0():
    results = []
    batches = [torch.randint(0, 256, (2, 8)) for _ in range(4)]
    for mode in ("rank1", "late_phase"):
        torch.manual_seed(21)
        model = build_model(TINY["transformer"], LatePhaseConfig(mode=mode, K=3))
        lp_cfg = LatePhaseConfig(mode=mode, K=3)
        schedule = MemberSchedule.from_config(lp_cfg, T0_step=100)
        shared_opt, member_opt = build_optimizers(model, TrainConfig(lr=0.01, weight_decay=0.05), lp_cfg)
        stepper = LatePhaseStepper(model, schedule, shared_opt, member_opt,
                                   clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5))
        initial = [p.detach().clone() for p in late_phase_parameters(model)]
        for t, x in enumerate(batches):
            loss_of(model, x, x.roll(1, 1), schedule.member(t)).backward()
            stepper.after_backward(t)
        if mode == "late_phase":  # untouched member rows while tied
            assert all(torch.equal(a[1:], p[1:]) for a, p in zip(initial, late_phase_parameters(model)))
        results.append((model, batches[0]))
    (rank1, x), (late, _) = results
    for a, b in zip(shared_parameters(rank1), shared_parameters(late)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(late_phase_parameters(rank1), late_phase_parameters(late)):
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rank1(x, None, 0)[0], late(x, None, 0)[0], rtol=1e-5, atol=1e-6)
    assert not math.isclose(late_phase_parameters(late)[0][0, 0].item(), 1.0)


def test_clipping_groups_follow_the_schedule():
    K = 2
    model = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=K))
    shared_opt, member_opt = build_optimizers(model, TrainConfig(lr=0.01), LatePhaseConfig(K=K))
    calls = []
    stepper = LatePhaseStepper(model, MemberSchedule(K, 1, "sequential"), shared_opt, member_opt,
                               clip=lambda ps: calls.append({id(p) for p in ps}))
    shared = {id(p) for p in shared_parameters(model)}
    members = {id(p) for p in late_phase_parameters(model)}
    expected = [[shared | members], [members], [members, shared], [members]]  # steps 0 (tied), 1, 2, 3
    for t, want in enumerate(expected):
        calls.clear()
        x = torch.randint(0, 256, (2, 5))
        loss_of(model, x, x.roll(1, 1), stepper.schedule.member(t)).backward()
        stepper.after_backward(t)
        assert calls == want, t
    assert stepper.pending == 1 and all(p.grad is not None for p in shared_parameters(model))


def test_member_factors_are_not_decayed_unless_asked():
    """r and s multiply W and start at 1: train.weight_decay must not pull them toward 0."""
    train_cfg = TrainConfig(weight_decay=0.1)
    lp_cfg = LatePhaseConfig(mode="late_phase", K=3)
    model = build_model(ModelConfig(family="lstm", embed_dim=4, hidden_size=8), lp_cfg)
    shared_opt, member_opt = build_optimizers(model, train_cfg, lp_cfg)
    assert shared_opt.param_groups[0]["weight_decay"] == 0.1
    assert member_opt.param_groups[0]["weight_decay"] == 0.0
    _, member_opt = build_optimizers(model, train_cfg, LatePhaseConfig(mode="late_phase", K=3, weight_decay=0.02))
    assert member_opt.param_groups[0]["weight_decay"] == 0.02


def test_flush_applies_an_unfinished_cycle_on_its_mean_gradient():
    """Training that stops 2 minibatches into a K=3 cycle steps the shared weights once more,
    on gamma * (g1 + g2) with gamma = 1/2; checked against AdamW written out in float64."""
    K, T0, lr, wd, (beta1, beta2), eps = 3, 1, 0.02, 0.1, (0.9, 0.999), 1e-8
    torch.manual_seed(11)
    model = build_model(TINY["lstm"], LatePhaseConfig(mode="late_phase", K=K)).double()
    schedule = MemberSchedule(K, T0, "sequential", "mean")
    shared = shared_parameters(model)
    shared_opt = torch.optim.AdamW(shared, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    stepper = LatePhaseStepper(model, schedule, shared_opt, MemberAdamW(late_phase_parameters(model), lr=lr))
    for t in range(T0 + K + 2):  # tied step, one whole cycle, then 2 minibatches of the next
        x, y = torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 6))
        F.cross_entropy(model(x, None, schedule.member(t))[0].flatten(0, 1), y.flatten()).backward()
        stepper.after_backward(t)
    assert stepper.pending == 2
    before = [(p.detach().clone(), p.grad.clone(), {k: v.clone() for k, v in shared_opt.state[p].items()})
              for p in shared]
    stepper.flush()
    assert stepper.pending == 0 and all(p.grad is None for p in shared)
    for p, (w, g_sum, state) in zip(shared, before):
        g = g_sum / 2
        step = state["step"].item() + 1  # a Python float: torch keeps the count as float32
        m = beta1 * state["exp_avg"] + (1 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        denom = (v / (1 - beta2**step)).sqrt() + eps
        expected = w * (1 - lr * wd) - lr * (m / (1 - beta1**step)) / denom
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
