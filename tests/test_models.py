"""Both model families in every mode and member argument; export/load; short training runs."""
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kernels import rank1
from lm.config import Config, LatePhaseConfig, ModelConfig, TrainConfig
from lm.late_phase import (
    LatePhaseLinear,
    LatePhaseStepper,
    MemberSchedule,
    Rank1Factors,
    average_members,
    build_optimizers,
    is_plain,
    late_phase_parameters,
)
from lm.models import ExportError, build_model, detach_state, export, load_exported, plain_like

from tests.test_late_phase import TINY as TINY_LATE_PHASE
from tests.test_late_phase import fast_tiny_models, randomize_members  # noqa: F401 (autouse fixture)

TINY = {
    **TINY_LATE_PHASE,
    "lstm_fused": dataclasses.replace(TINY_LATE_PHASE["lstm"], lstm_members="fused"),
    "transformer_learned": ModelConfig(family="transformer", vocab_size=256, d_model=16, n_layers=1, n_heads=2,
                                       max_seq_len=16, positions="learned"),
}
K = 3


def late_model(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY[name], LatePhaseConfig(mode="late_phase", K=K))
    randomize_members(model, seed)
    return model


@pytest.mark.parametrize("name", list(TINY))
def test_member_modes_shapes_and_agreement(name):
    model = late_model(name)
    x = torch.randint(0, 256, (2 * K, 7))
    everyone, state_all = model(x, None, "all")
    parallel, _ = model(x, None, "parallel")
    assert everyone.shape == (K, 2 * K, 7, 256) and parallel.shape == (2 * K, 7, 256)
    for k in range(K):
        one, state = model(x, None, k)
        assert one.shape == (2 * K, 7, 256)
        torch.testing.assert_close(everyone[k], one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parallel[k::K], one[k::K], rtol=1e-5, atol=1e-5)  # row b -> member b % K
        if name.startswith("lstm"):
            assert state[0].shape == (2, 2 * K, 12)
    if name.startswith("lstm"):
        assert state_all[0].shape == (K, 2, 2 * K, 12)
    else:
        assert state_all is None
    assert not torch.allclose(everyone[0], everyone[1])  # the members really differ


def test_lstm_all_members_way_auto_follows_the_measurements():
    from lm.models.lstm import CPU_FUSED_FROM_HIDDEN, all_members_way

    assert CPU_FUSED_FROM_HIDDEN == 500
    assert all_members_way("auto", "parallel", 500, "cpu") == all_members_way("auto", "parallel", 750, "cpu") == "fused"
    assert all_members_way("auto", "parallel", 384, "cpu") == "folded"
    assert all_members_way("auto", "all", 500, "cpu") == "folded"
    assert all_members_way("auto", "parallel", 500, "cuda") == "folded"
    assert all_members_way("folded", "parallel", 500, "cpu") == "folded"
    assert all_members_way("fused", "all", 64, "cuda") == "fused"


@pytest.mark.parametrize("name", ["lstm", "lstm_fused"])
def test_lstm_state_carries_across_windows_in_every_mode(name):
    model = late_model(name)
    x = torch.randint(0, 256, (K, 10))
    for member in (1, "parallel", "all"):
        whole, _ = model(x, None, member)
        first, state = model(x[:, :6], None, member)
        second, _ = model(x[:, 6:], detach_state(state), member)
        torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=1e-5, atol=1e-6)


def test_lstm_fused_carries_the_cell_state_in_float32_under_bf16_autocast():
    # rank1_lstm keeps the cell in float32 within a window; rounding it to bf16 between windows
    # made a window split in two differ from the whole (by a bf16 step, 0.004 here).
    model = late_model("lstm_fused")
    x = torch.randint(0, 256, (K, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole, _ = model(x, None, "parallel")
        first, state = model(x[:, :6], None, "parallel")
        second, _ = model(x[:, 6:], detach_state(state), "parallel")
        _, all_state = model(x, None, "all")
    assert state[1].dtype == all_state[1].dtype == torch.float32
    torch.testing.assert_close(torch.cat([first, second], dim=-2), whole, rtol=0, atol=0)


def independent_lstm_members(params, num_layers):
    """Member k as its own float64 nn.LSTM LM, weights folded here by hand: k -> (inputs, state) -> (logits, state)."""
    cfg = TINY["lstm"]
    lstm = torch.nn.LSTM(cfg.embed_dim, cfg.hidden_size, num_layers, batch_first=True, dtype=torch.float64)

    def run(k, inputs, state):
        weights = {}
        for layer in range(num_layers):
            for kind in ("ih", "hh"):
                factors = f"rnn.factors.{kind}_l{layer}"
                r, s = params[f"{factors}.r"][k], params[f"{factors}.s"][k]
                weights[f"weight_{kind}_l{layer}"] = params[f"rnn.lstm.weight_{kind}_l{layer}"] * r[:, None] * s[None, :]
                weights[f"bias_{kind}_l{layer}"] = params[f"{factors}.bias"][k]
        out, state = functional_call(lstm, weights, (F.embedding(inputs, params["embed.weight"]), state))
        return F.linear(out, params["decoder.weight"], params["decoder.bias"]), state

    return run


@pytest.mark.parametrize("how", ["fused", "folded"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("member", ["parallel", "all"])
def test_stacked_members_equal_independent_float64_lstms(member, num_layers, how):
    # Logits, carried state and every parameter's gradient over two truncated-BPTT windows.
    torch.manual_seed(10 + num_layers)
    cfg = dataclasses.replace(TINY["lstm"], num_layers=num_layers, lstm_members=how)
    model = build_model(cfg, LatePhaseConfig(mode="late_phase", K=K))
    model.double()
    randomize_members(model, seed=num_layers)
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    reference = independent_lstm_members(params, num_layers)
    batch = 2 * K
    rows = [torch.arange(k, batch, K) if member == "parallel" else torch.arange(batch) for k in range(K)]
    back = torch.cat(rows).argsort()  # parallel: member-major rows back to batch order
    state, member_states, loss, ref_loss = None, [None] * K, 0.0, 0.0
    for inputs in torch.randint(0, 256, (batch, 9)).split([5, 4], dim=1):
        logits, state = model(inputs, detach_state(state), member)
        outs, member_states = zip(*(reference(k, inputs[rows[k]], detach_state(member_states[k])) for k in range(K)))
        if member == "parallel":
            ref_logits = torch.cat(outs)[back]
            ref_state = tuple(torch.cat([s[i] for s in member_states], dim=1)[:, back] for i in (0, 1))
        else:
            ref_logits = torch.stack(outs)
            ref_state = tuple(torch.stack([s[i] for s in member_states]) for i in (0, 1))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-12)
        weights = torch.randn_like(logits)
        loss, ref_loss = loss + (logits * weights).sum(), ref_loss + (ref_logits * weights).sum()
    loss.backward()
    ref_loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_plain_model_member_arguments(family):
    model = build_model(TINY[family], LatePhaseConfig(mode="plain"))
    x = torch.randint(0, 256, (2, 5))
    one, _ = model(x)
    everyone, _ = model(x, None, "all")
    assert everyone.shape == (1, 2, 5, 256)
    torch.testing.assert_close(everyone[0], one)
    with pytest.raises(ValueError, match="parallel"):
        model(x, None, "parallel")
    with pytest.raises(ValueError, match="out of range"):
        model(x, None, 1)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_plain_like_leaves_the_global_random_state_as_it_was(name):
    # Evaluation and SWA build plain models mid-training; drawing from the global generator
    # would change dropout, and so training, with the evaluation schedule.
    model = late_model(name)
    torch.manual_seed(torch.seed() % 2**31)
    before = torch.get_rng_state()
    plain = plain_like(model)
    assert torch.equal(torch.get_rng_state(), before)
    assert is_plain(plain) and type(plain) is type(model)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_parallel_needs_members_and_a_batch_they_share(family):
    x = torch.randint(0, 256, (4, 5))
    with pytest.raises(ValueError, match="multiple of K=3, got 4 rows"):
        late_model(family)(x, None, "parallel")
    with pytest.raises(ValueError, match="needs a late-phase model"):
        build_model(TINY[family], LatePhaseConfig(mode="plain"))(x, None, "parallel")


def test_bad_member_arguments_give_one_line_errors():
    model = late_model("transformer")
    x = torch.randint(0, 256, (4, 5))
    with pytest.raises(ValueError, match="member 3 out of range"):
        model(x, None, 3)
    with pytest.raises(ValueError, match="'ensemble'"):
        model(x, None, "ensemble")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 256, (1, 17)))


@pytest.mark.parametrize("cfg", [
    ModelConfig(family="transformer", vocab_size=256, d_model=16, n_layers=1, n_heads=2, max_seq_len=8),
    ModelConfig(family="lstm", vocab_size=256, embed_dim=8, hidden_size=12, num_layers=1, lstm_members="fused"),
], ids=["transformer", "lstm"])
@pytest.mark.interpreter  # without Triton (or its interpreter) "auto" is eager: nothing to compare
def test_kernel_path_agrees_with_eager(monkeypatch, cfg):
    # One small pass, forward and backward, through the kernels' default dispatch (Triton,
    # interpreted on CPU): kernels.rank1_linear, and for the LSTM kernels.rank1_lstm.
    torch.manual_seed(1)
    model = build_model(cfg, LatePhaseConfig(mode="late_phase", K=2))
    with torch.no_grad():
        for p in late_phase_parameters(model):
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(0, 256, (2, 4))
    weights = torch.randn(2, 2, 4, 256)
    grads = {}
    for impl in ("auto", "eager"):
        monkeypatch.setattr(Rank1Factors, "kernel_impl", impl)
        model.zero_grad()
        logits, _ = model(x, None, "all")
        (logits * weights).sum().backward()
        grads[impl] = (logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(grads["auto"][0], grads["eager"][0], rtol=1e-4, atol=1e-4)
    for name, grad in grads["auto"][1].items():
        torch.testing.assert_close(grad, grads["eager"][1][name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_linear_members_folded_computes_what_fused_computes(monkeypatch, family):
    # model.linear_members=folded sends every late-phase linear layer's all-members product
    # to rank1_linear_folded, even at rows where the eager dispatch would not fold.
    monkeypatch.setattr(Rank1Factors, "kernel_impl", "eager")
    calls = []
    real = rank1.rank1_linear_folded
    monkeypatch.setattr(rank1, "rank1_linear_folded", lambda *args: calls.append(1) or real(*args))
    base = dataclasses.replace(TINY_LATE_PHASE[family], lstm_members="fused")
    x = torch.randint(0, 256, (4, 6))
    results = {}
    for way in ("fused", "folded"):
        torch.manual_seed(3)
        model = build_model(dataclasses.replace(base, linear_members=way), LatePhaseConfig(mode="late_phase", K=2))
        with torch.no_grad():
            for p in late_phase_parameters(model):
                p.add_(0.2 * torch.randn_like(p))
        calls.clear()
        logits, _ = model(x, None, "parallel")
        logits.square().mean().backward()
        layers = sum(isinstance(m, Rank1Factors) for m in model.modules())
        assert len(calls) == (0 if way == "fused" else layers // (2 if family == "lstm" else 1))
        results[way] = logits.detach(), [p.grad for p in model.parameters()]
    torch.testing.assert_close(results["folded"][0], results["fused"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["folded"][1], results["fused"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_paper_lstm_and_recommended_transformer_sizes():
    lstm = build_model(ModelConfig(family="lstm", embed_dim=190, hidden_size=500, num_layers=1), LatePhaseConfig(mode="plain"))
    assert sum(p.numel() for p in lstm.parameters()) == 2256 * 190 + 1_132_256 == 1_560_896
    cfg = ModelConfig(family="transformer", d_model=512, n_layers=8, n_heads=8)
    with torch.device("meta"):
        plain = build_model(cfg, LatePhaseConfig(mode="plain"))
        late = build_model(cfg, LatePhaseConfig(mode="late_phase", K=10))
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_plain == 25_482_496
    # per linear layer and member: r (d_out) + s (d_in) + bias (d_out) rows instead of the shared bias
    extra = sum(10 * (m.weight.shape[0] * 2 + m.weight.shape[1]) - m.weight.shape[0]
                for m in late.modules() if isinstance(m, LatePhaseLinear))
    assert sum(p.numel() for p in late.parameters()) == n_plain + extra


@pytest.mark.parametrize("family", ["lstm", "transformer"])
def test_export_and_load_exported_round_trip(tmp_path, family):
    model = late_model(family, seed=4)
    cfg = Config(model=TINY[family], late_phase=LatePhaseConfig(mode="late_phase", K=K))
    out = export(model, cfg, tmp_path / "averaged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["late_phase"]["mode"] == "plain"
    loaded = load_exported(out)
    plain = build_model(TINY[family], LatePhaseConfig(mode="plain"))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in plain.parameters())
    assert loaded.state_dict().keys() == plain.state_dict().keys()
    x = torch.randint(0, 256, (2, 6))
    assert torch.equal(loaded(x)[0], average_members(model)(x)[0])
    assert not torch.allclose(loaded(x)[0], model(x, None, 0)[0])  # members differ, so does their average


def test_load_exported_errors(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path)
    export(build_model(TINY["lstm"], LatePhaseConfig(mode="plain")), Config(model=TINY["lstm"]), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["hidden_size"] = 13
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not match"):
        load_exported(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08" * 20)
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_exported(tmp_path)


@pytest.mark.parametrize("family", ["lstm", "transformer"])
@pytest.mark.parametrize("mode,schedule", [("plain", "sequential"), ("rank1", "sequential"),
                                           ("late_phase", "sequential"), ("late_phase", "parallel")])
def test_each_mode_trains_and_the_loss_falls(family, mode, schedule):
    torch.manual_seed(3)
    lp_cfg = LatePhaseConfig(mode=mode, K=2, schedule=schedule, sigma0=0.01)
    model = build_model(TINY[family], lp_cfg)
    plan = MemberSchedule.from_config(lp_cfg, T0_step=4)
    shared_opt, member_opt = build_optimizers(model, TrainConfig(lr=0.02), lp_cfg)
    stepper = LatePhaseStepper(model, plan, shared_opt, member_opt,
                               clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0), sigma0=0.01)
    data = torch.randint(0, 256, (4, 13))  # one random batch, memorised
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for t in range(16):
        logits, _ = model(x, None, plan.member(t))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        stepper.after_backward(t)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if mode != "plain":
        averaged, _ = average_members(model)(x)
        assert F.cross_entropy(averaged.flatten(0, 1), y.flatten()).item() < losses[0] - 0.3


# ---------------------------------------------------------------------------------------------
# The Transformer against itself under changed inputs, and against a float64 reference


MEMBER_ARGS = (0, 2, "parallel", "all")


def _per_member_view(logits, member):
    """(B, T, V) or, for "all", (K, B, T, V) -> (K', B, T, V), so every member arg compares alike."""
    return logits if member == "all" else logits.unsqueeze(0)


@pytest.mark.parametrize("name", ["transformer", "transformer_learned"])
def test_transformer_is_causal_for_every_member_argument(name):
    model = late_model(name, seed=21)
    g = torch.Generator().manual_seed(22)
    T = 11
    x = torch.randint(0, 256, (2 * K, T), generator=g)
    everyone = model(x, None, "all")[0]
    assert (everyone[0] - everyone[1]).abs().max() > 1e-3  # the members differ
    for trial in range(3):
        t = int(torch.randint(1, T, (1,), generator=g))
        row = int(torch.randint(0, 2 * K, (1,), generator=g))
        changed = x.clone()
        changed[row, t] = (x[row, t] + 1 + torch.randint(0, 255, (1,), generator=g)) % 256
        for member in MEMBER_ARGS:
            before = _per_member_view(model(x, None, member)[0], member)
            after = _per_member_view(model(changed, None, member)[0], member)
            msg = f"member={member!r}, t={t}, row={row}"
            torch.testing.assert_close(after[:, :, :t], before[:, :, :t], rtol=0, atol=1e-6, msg=msg)
            others = [b for b in range(2 * K) if b != row]
            torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=1e-6, msg=msg)
            # the changed token reaches its own position (and, through attention, the later ones)
            assert (after[:, row, t] - before[:, row, t]).abs().amax(dim=-1).min() > 1e-4, msg
            if t + 1 < T:
                assert (after[:, row, t + 1:] - before[:, row, t + 1:]).abs().amax() > 1e-5, msg


def _reference_transformer_member(model, inputs, k):
    """Member k of a late-phase rotary TransformerLM, written out in float64 from its parameters."""
    cfg = model.cfg
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    C, H = cfg.d_model, cfg.n_heads
    hd = C // H
    B, T = inputs.shape

    def layer_norm(x, gain, bias):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * gain + bias

    def linear(x, prefix):  # member k's weight W * (r_k s_k^T) and bias b_k
        W, r, s, b = (P[f"{prefix}.{n}"] for n in ("weight", "factors.r", "factors.s", "factors.bias"))
        Wk = W * r[k][:, None] * s[k][None, :]
        return torch.einsum("btj,ij->bti", x, Wk) + b[k]

    def rotate(x):  # x (B, T, hd): channel pair (i, i + hd/2) as one complex number, turned by pos * base^(-2i/hd)
        half = hd // 2
        freq = torch.tensor([10000.0 ** (-2.0 * i / hd) for i in range(half)], dtype=torch.float64)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2.0)))  # noqa: E731
    x = P["embed.weight"][inputs]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}"
        h = layer_norm(x, P[f"{pre}.ln1.gains.weight"][k], P[f"{pre}.ln1.bias"])
        qkv = linear(h, f"{pre}.attn.qkv")
        heads = []
        for j in range(H):
            q, kk, v = (qkv[..., part * C + j * hd: part * C + (j + 1) * hd] for part in range(3))
            q, kk = rotate(q), rotate(kk)
            scores = torch.einsum("bsd,btd->bst", q, kk) / math.sqrt(hd)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            heads.append(torch.einsum("bst,btd->bsd", weights / weights.sum(-1, keepdim=True), v))
        x = x + linear(torch.cat(heads, dim=-1), f"{pre}.attn.proj")
        h = layer_norm(x, P[f"{pre}.ln2.gains.weight"][k], P[f"{pre}.ln2.bias"])
        x = x + linear(gelu(linear(h, f"{pre}.mlp.fc")), f"{pre}.mlp.proj")
    x = layer_norm(x, P["ln_f.weight"], P["ln_f.bias"])
    return torch.einsum("btc,vc->btv", x, P["head.weight"]) + P["head.bias"]


def test_transformer_forward_equals_float64_reference():
    # Rotary positions, 2 layers, member LayerNorm gains. Weights large enough that attention is
    # far from uniform, so that positions and the causal mask change the logits a lot.
    cfg = TINY["transformer"]
    assert cfg.positions == "rotary" and cfg.layernorm_factors and cfg.n_layers == 2
    model = late_model("transformer", seed=31)
    g = torch.Generator().manual_seed(32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "factors" not in name and "gains" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 1 or name.startswith("embed") else 0.4))
    x = torch.randint(0, 256, (2, 12), generator=g)
    refs = torch.stack([_reference_transformer_member(model, x, k) for k in range(K)])
    assert (refs[0] - refs[1]).abs().max() > 0.1  # members differ
    # The float64 model still runs on float32-rounded rotary tables (non-persistent buffers made
    # in float32), hence 2e-6 and not 1e-12; a wrong rotation or mask is off by O(1).
    model64 = copy.deepcopy(model).double()
    for member_model, tol in ((model64, 2e-6), (model, 2e-5)):
        for k in (0, 2):
            torch.testing.assert_close(member_model(x, None, k)[0].double(), refs[k], rtol=0, atol=tol)
        torch.testing.assert_close(member_model(x, None, "all")[0].double(), refs, rtol=0, atol=tol)
        parallel = member_model(x.repeat_interleave(K, 0), None, "parallel")[0].double()
        torch.testing.assert_close(parallel.view(2, K, 12, 256).transpose(0, 1), refs, rtol=0, atol=tol)


@pytest.mark.parametrize("member", [1, "parallel", "all"])
def test_transformer_dropout_only_in_training(member):
    torch.manual_seed(41)
    dropped = build_model(dataclasses.replace(TINY["transformer"], dropout=0.3), LatePhaseConfig(mode="late_phase", K=K))
    randomize_members(dropped, seed=41)
    none = build_model(TINY["transformer"], LatePhaseConfig(mode="late_phase", K=K))
    none.load_state_dict(dropped.state_dict())
    x = torch.randint(0, 256, (2 * K, 10))
    dropped.eval()
    none.eval()
    first = dropped(x, None, member)[0]
    assert torch.equal(first, dropped(x, None, member)[0])
    assert torch.equal(first, none(x, None, member)[0])
    dropped.train()
    a, b = dropped(x, None, member)[0], dropped(x, None, member)[0]
    assert (a - b).abs().max() > 1e-3
    assert (a - first).abs().max() > 1e-3
    none.train()
    assert torch.equal(none(x, None, member)[0], first)  # dropout 0: training mode changes nothing
