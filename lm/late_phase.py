"""Rank-1 late-phase weights (von Oswald et al., ICLR 2021): the one place the method lives.

A factored weight matrix W (d_out x d_in, shared by all members) gives member k the effective
weight W_k = W * (r_k s_k^T); r and s are stored as (K, d) parameters, one row per member, with a
per-member bias (K, d_out). Both model families build on `Rank1Factors`; the Transformer's
layers are `LatePhaseLinear` / `LatePhaseLayerNorm`, the LSTM folds its recurrent matrices itself.

Member arguments of a layer's forward:
  int k       x (..., d_in)    -> member k's output (..., d_out)
  "parallel"  x (K, ..., d_in) -> row k of x through member k, (K, ..., d_out)
  "all"       x (..., d_in)    -> one shared input through every member, (K, ..., d_out)

Also here: spawning members at T0, the member average (an ordinary model), the ensemble,
the member schedule (Algorithm 1 or the parallel variant), the member-aware optimisers, and
`LatePhaseStepper`, which applies one minibatch's gradients according to the schedule.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from kernels import rank1_linear
from lm.config import LatePhaseConfig, TrainConfig

Member = Union[int, str]  # int k | "parallel" | "all"
STACKED = ("parallel", "all")


def check_member(member: Member, stored: int, batch: int) -> None:
    """Raise a one-line error for a member argument that a model storing `stored` members
    (0: a plain model, which is member 0) cannot run on `batch` rows."""
    num = max(stored, 1)
    if isinstance(member, bool) or not isinstance(member, (int, str)):
        raise ValueError(f"member must be an int or 'parallel'/'all', got {member!r}")
    if isinstance(member, str) and member not in STACKED:
        raise ValueError(f"member must be an int or 'parallel'/'all', got {member!r}")
    if isinstance(member, int) and not 0 <= member < num:
        raise ValueError(f"member {member} out of range: this model has {num} member(s) (0..{num - 1})")
    if member == "parallel" and stored == 0:
        raise ValueError("member='parallel' needs a late-phase model; a plain model has one member (0)")
    if member == "parallel" and batch % stored:
        raise ValueError(f"member='parallel' needs a batch that is a multiple of K={stored}, got {batch} rows")


class MemberRows(nn.Module):
    """Marker base: every direct parameter of such a module is (K, d), one row per member."""

    @property
    def num_members(self) -> int:
        return next(self.parameters(recurse=False)).shape[0]


class Rank1Factors(MemberRows):
    """r (K, d_out), s (K, d_in), optional bias (K, d_out) for a weight owned by another module.

    Rows start identical (r = s = 1 as in BatchEnsemble, so a fresh model equals its plain
    counterpart; the bias row is `bias_init` copied to every row), so before T0 every row
    is already the tied value and rank1 (K=1) and late_phase draw the same random numbers.

    `kernel_impl` is handed to our kernels (kernels.rank1_linear, and kernels.rank1_lstm in the
    LSTM) when all members run at once ("auto" picks Triton on CUDA or under TRITON_INTERPRET=1,
    eager otherwise); set it on the class to force one, e.g. "eager" in CPU tests, where the
    Triton interpreter is slow. `linear_members` is model.linear_members: "folded" sends the
    all-members linear products to kernels.rank1_linear's folded form instead.
    """

    kernel_impl: str = "auto"
    linear_members: str = "auto"

    def __init__(self, num: int, d_out: int, d_in: int, bias_init: torch.Tensor | None = None):
        super().__init__()
        self.r = nn.Parameter(torch.ones(num, d_out))
        self.s = nn.Parameter(torch.ones(num, d_in))
        self.bias = None if bias_init is None else nn.Parameter(bias_init.detach().expand(num, d_out).clone())

    def fold(self, weight: torch.Tensor, member: int) -> torch.Tensor:
        """Member k's dense weight W * (r_k s_k^T): one elementwise pass, then cuBLAS/cuDNN as usual."""
        return weight * torch.outer(self.r[member], self.s[member])

    def all_members(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Every member at once, ((x_k * s_k) W^T) * r_k + bias_k, through kernels.rank1_linear.

        x: (K, M, d_in) (row block k through member k) or (M, d_in) (shared) -> (K, M, d_out)."""
        impl = "folded" if self.linear_members == "folded" else self.kernel_impl
        return rank1_linear(x, weight, self.r, self.s, bias, impl=impl)

    def member_bias(self, member: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[member]

    def mean_fold(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight-space average W * mean_k(r_k s_k^T) (rank <= K; NOT mean(r) mean(s)^T).

        The mean is taken in float64: then K identical members give exactly outer(r_0, s_0)
        as float32 computes it, so the average of a tied model is that model bit for bit.
        """
        mean = self.r.double().t() @ self.s.double() / self.r.shape[0]
        return weight * mean.to(weight.dtype)

    def mean_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else member_mean(self.bias)


def member_mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over members (dim 0), in float64 so identical rows average to themselves exactly."""
    return rows.double().mean(dim=0).to(rows.dtype)


class LatePhaseLinear(nn.Module):
    """A linear layer: plain (num=0: weight + bias) or factored (shared weight, K member factors).

    The plain layer's state dict is {weight, bias}; the factored one's average folds into
    exactly that (`averaged_state`), so a member-averaged model loads into the plain class.
    """

    def __init__(self, d_in: int, d_out: int, num: int, bias: bool = True, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * init_std)
        bias_init = torch.zeros(d_out) if bias else None
        if num == 0:
            self.factors = None
            self.bias = None if bias_init is None else nn.Parameter(bias_init)
        else:
            self.factors = Rank1Factors(num, d_out, d_in, bias_init)
            self.bias = None

    def forward(self, x: torch.Tensor, member: Member = 0) -> torch.Tensor:
        f = self.factors
        if f is None:
            return F.linear(x, self.weight, self.bias)
        if isinstance(member, int):
            # Folding costs one d_out x d_in pass and keeps the matmul dense; with B*T tokens
            # per call that is cheaper than scaling every token by s and r.
            return F.linear(x, f.fold(self.weight, member), f.member_bias(member))
        num = f.num_members
        lead = x.shape[1:-1] if member == "parallel" else x.shape[:-1]
        flat = x.reshape(num, -1, x.shape[-1]) if member == "parallel" else x.reshape(-1, x.shape[-1])
        out = f.all_members(flat, self.weight, f.bias)
        return out.reshape(num, *lead, out.shape[-1])

    def averaged_state(self) -> dict[str, torch.Tensor]:
        f = self.factors
        state = {"weight": f.mean_fold(self.weight)}
        if f.bias is not None:
            state["bias"] = f.mean_bias()
        return state


class MemberGain(MemberRows):
    """Per-member LayerNorm gains (K, d)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num, dim))


class LatePhaseLayerNorm(nn.Module):
    """LayerNorm whose gain is optionally per member (`ModelConfig.layernorm_factors`); bias shared."""

    def __init__(self, dim: int, num: int, member_gains: bool):
        super().__init__()
        self.dim = dim
        self.gains = MemberGain(num, dim) if member_gains and num > 0 else None
        self.weight = None if self.gains is not None else nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, member: Member = 0) -> torch.Tensor:
        if self.gains is None:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias)
        g = self.gains.weight
        if isinstance(member, int):
            return F.layer_norm(x, (self.dim,), g[member], self.bias)
        normed = F.layer_norm(x, (self.dim,))
        if member == "all":  # one shared input, K outputs
            normed = normed.unsqueeze(0)
        return normed * g.view(g.shape[0], *([1] * (normed.dim() - 2)), self.dim) + self.bias

    def averaged_state(self) -> dict[str, torch.Tensor]:
        return {"weight": member_mean(self.gains.weight), "bias": self.bias}


# ---------------------------------------------------------------------------------------------
# Model-level operations


def _member_row_modules(model: nn.Module) -> list[MemberRows]:
    return [m for m in model.modules() if isinstance(m, MemberRows)]


def late_phase_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The (K, d) member tensors (factors r, s, member biases, member LayerNorm gains)."""
    return [p for m in _member_row_modules(model) for p in m.parameters(recurse=False)]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not a member row: trained by all members."""
    member_ids = {id(p) for p in late_phase_parameters(model)}
    return [p for p in model.parameters() if id(p) not in member_ids]


def num_members(model: nn.Module) -> int:
    """K for a factored model; 1 for a plain model (one set of weights)."""
    modules = _member_row_modules(model)
    return modules[0].num_members if modules else 1


def is_plain(model: nn.Module) -> bool:
    return not _member_row_modules(model)


@torch.no_grad()
def spawn_members(model: nn.Module, sigma0: float, generator: torch.Generator) -> None:
    """At T0: copy the tied row 0 to all K rows, then add N(0, (sigma0 * rms(row 0))^2) noise.

    The noise is drawn on the CPU from `generator`, so every process draws the same numbers.
    Every member (row 0 included) gets its own noise, as in the official code.
    """
    for p in late_phase_parameters(model):
        tied = p[0].clone()
        p.copy_(tied.expand_as(p))
        if sigma0 > 0:
            rms = tied.float().pow(2).mean().sqrt()
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_((sigma0 * rms * noise.to(p.device)).to(p.dtype))


def averaged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The member average as the plain model's state dict (keys of the plain architecture).

    Modules with `averaged_state()` (factored layers) contribute their folded averages; every
    other parameter and persistent buffer is shared and copied as it is.
    """
    out: dict[str, torch.Tensor] = {}
    averaged_prefixes = []
    for name, module in model.named_modules():
        averaged = getattr(module, "averaged_state", None)
        if averaged is None or is_plain(module):
            continue
        prefix = f"{name}." if name else ""
        averaged_prefixes.append(prefix)
        out.update({prefix + k: v.detach().clone() for k, v in averaged().items()})
    for key, value in model.state_dict().items():
        if not any(key.startswith(p) for p in averaged_prefixes):
            out[key] = value.detach().clone()
    return out


def average_members(model: nn.Module) -> nn.Module:
    """An ordinary (mode plain) model whose weights are the weight-space mean of the members.

    W_avg = W * mean_k(r_k s_k^T), b_avg = mean_k b_k: exact, and the result has the plain
    architecture's parameter count and inference cost.
    """
    from lm.models import plain_like

    model = getattr(model, "module", model)  # DDP / accelerate wrappers prefix every key with "module."
    plain = plain_like(model)
    plain.load_state_dict(averaged_state_dict(model))
    return plain


def ensemble_log_probs(logits_all: torch.Tensor) -> torch.Tensor:
    """log of the mean over members (dim 0) of the predicted probabilities: (K, ..., V) -> (..., V)."""
    log_probs = F.log_softmax(logits_all.float(), dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(logits_all.shape[0])


# ---------------------------------------------------------------------------------------------
# Member schedule


@dataclass(frozen=True)
class MemberSchedule:
    """Which member trains on minibatch `step` (0-based). Pure functions of the step.

    Steps < T0 are tied (member 0, everything steps every minibatch). From T0 on:
    sequential (Algorithm 1): member (step - T0) mod K; the shared weights step on the last
    minibatch of every cycle of K. parallel: all members at once on interleaved batch rows.
    Members are spawned right after the update of step T0 - 1; T0 = 0 is treated as 1, so the
    spawn always has a tied row to copy. K = 1 (plain / rank1) is tied throughout.
    """

    K: int
    T0_step: int | None
    schedule: str = "sequential"
    gamma: str = "sum"

    def __post_init__(self):
        if self.K < 1:
            raise ValueError(f"late_phase.K must be >= 1, got {self.K}")
        if self.schedule not in ("sequential", "parallel"):
            raise ValueError(f"late_phase.schedule must be 'sequential' or 'parallel', got {self.schedule!r}")
        if self.gamma not in ("sum", "mean"):
            raise ValueError(f"late_phase.gamma must be 'sum' or 'mean', got {self.gamma!r}")

    @classmethod
    def from_config(cls, lp_cfg: LatePhaseConfig, T0_step: int | None) -> MemberSchedule:
        """From a LatePhaseConfig and T0 already resolved to a step (lm.config.resolve_step)."""
        if lp_cfg.mode != "late_phase" or lp_cfg.K == 1:
            return cls(1, None, lp_cfg.schedule, lp_cfg.gamma)
        return cls(lp_cfg.K, T0_step, lp_cfg.schedule, lp_cfg.gamma)

    @property
    def start(self) -> int | None:
        """First late-phase step, or None when training stays tied."""
        if self.K == 1 or self.T0_step is None:
            return None
        return max(self.T0_step, 1)

    def phase(self, step: int) -> str:
        return "late" if self.start is not None and step >= self.start else "tied"

    def member(self, step: int) -> Member:
        if self.phase(step) == "tied":
            return 0
        return "parallel" if self.schedule == "parallel" else (step - self.start) % self.K

    def steps_shared(self, step: int) -> bool:
        if self.phase(step) == "tied" or self.schedule == "parallel":
            return True
        return (step - self.start) % self.K == self.K - 1

    def spawns_at(self, step: int) -> bool:
        """True on the last tied step: members are spawned after its update."""
        return self.start is not None and step == self.start - 1


# ---------------------------------------------------------------------------------------------
# Member-aware optimisers


class MemberOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base of optimisers over (K, d) member tensors that update only the active member's rows.

    `active = k` steps row k of every tensor; `active = None` steps all rows. Rows not stepped
    are bit-identical afterwards: no momentum, Adam moments, weight decay or step count reaches
    them (the official code's bug is that zero-gradient members still move). The active member
    is state rather than a `step` argument because accelerate's AcceleratedOptimizer calls
    `.step()` without arguments.
    """

    def __init__(self, params: Iterable, defaults: dict):
        super().__init__(params, defaults)
        self.active: int | None = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if self.active is not None and not 0 <= self.active < p.shape[0]:
                    raise ValueError(f"active member {self.active} out of range for {p.shape[0]} members")
                if not self.state[p]:
                    self._init_state(p, self.state[p])
            rows = slice(None) if self.active is None else slice(self.active, self.active + 1)
            # One update over views of the selected rows of every tensor: foreach ops, so the
            # cost is a few kernels per group rather than a dozen per tensor.
            states = [{k: v[rows] for k, v in self.state[p].items()} for p in params]
            self._update([p[rows] for p in params], [p.grad[rows] for p in params], states, group)
        return loss

    @torch.no_grad()
    def copy_row_state(self, source: int = 0) -> None:
        """Give every row the optimiser state of row `source` (used when members spawn)."""
        for state in self.state.values():
            for value in state.values():
                value.copy_(value[source : source + 1].expand_as(value))

    @abc.abstractmethod
    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        """Create the per-row state of parameter `p` (every tensor has the rows along dim 0)."""

    @abc.abstractmethod
    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """Update the selected rows of a group's tensors in place (params and state values are views)."""


class MemberAdamW(MemberOptimizer):
    """Adam with decoupled weight decay (AdamW), per-row moments and per-row step counts.

    Each row's bias correction uses the number of steps that row has taken, so a member that
    trains on 1/K of the minibatches is corrected as if it were alone.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p, state):
        # Step counts on the CPU, as torch's AdamW keeps them: the bias corrections are then
        # Python floats computed without kernels or device syncs. float64 counts are exact;
        # torch's load_state_dict leaves the key "step" where and as it was saved.
        state["step"] = torch.zeros(p.shape[0], dtype=torch.float64)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, params, grads, states, group):
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        steps = [state["step"] for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_add_(steps, 1)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        counts = [step.tolist() for step in steps]
        if all(min(c) == max(c) for c in counts):
            # The usual case: the stepped rows of a tensor share one count, so each tensor's
            # bias corrections are scalars and the update is torch's foreach AdamW, op for op.
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** c[0]) for c in counts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1 ** c[0]) for c in counts])
            return
        # Rows at different counts (all members stepped after a sequential phase): per-row
        # corrections as (rows, 1, ...) columns on the parameters' device.
        columns = [(-1,) + (1,) * (p.dim() - 1) for p in params]
        bias1 = [(1 - beta1**step).view(col).to(p) for step, col, p in zip(steps, columns, params)]
        bias2_sqrt = [(1 - beta2**step).sqrt().view(col).to(p) for step, col, p in zip(steps, columns, params)]
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, torch._foreach_div(exp_avgs, bias1), denom, value=-lr)


class MemberSGD(MemberOptimizer):
    """SGD with momentum and (coupled, L2) weight decay per row; equals torch.optim.SGD on a row."""

    def __init__(self, params: Iterable, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _init_state(self, p, state):
        if self.defaults["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, params, grads, states, group):
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            buffers = [state["momentum_buffer"] for state in states]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-group["lr"])


def build_optimizers(model: nn.Module, train_cfg: TrainConfig,
                     lp_cfg: LatePhaseConfig) -> tuple[torch.optim.Optimizer, MemberOptimizer | None]:
    """(shared optimiser, member optimiser or None for a plain model) from TrainConfig/LatePhaseConfig.

    Adam means AdamW-style decoupled weight decay for both; the member rows use late_phase.weight_decay
    (0 by default: see LatePhaseConfig).
    """
    lr_m = train_cfg.lr if lp_cfg.lr is None else lp_cfg.lr
    wd_m = lp_cfg.weight_decay
    shared, members = shared_parameters(model), late_phase_parameters(model)
    if train_cfg.optimizer == "adam":
        shared_opt = torch.optim.AdamW(shared, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                                       weight_decay=train_cfg.weight_decay)
        member_opt = MemberAdamW(members, lr=lr_m, betas=train_cfg.betas, weight_decay=wd_m) if members else None
    elif train_cfg.optimizer == "sgd":
        momentum = train_cfg.betas[0]
        shared_opt = torch.optim.SGD(shared, lr=train_cfg.lr, momentum=momentum, weight_decay=train_cfg.weight_decay)
        member_opt = MemberSGD(members, lr=lr_m, momentum=momentum, weight_decay=wd_m) if members else None
    else:
        raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {train_cfg.optimizer!r}")
    return shared_opt, member_opt


def _unwrapped(optimizer):
    """The optimiser inside accelerate's AcceleratedOptimizer (or the optimiser itself)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# ---------------------------------------------------------------------------------------------
# The optimisation step of Algorithm 1


class LatePhaseStepper:
    """Applies one minibatch's gradients according to the member schedule; zeroes what it used.

    Call `after_backward(step)` after the backward pass of minibatch `step`.
    - tied phase (and plain / rank1): clip all gradients together, step member row 0 and the
      shared weights.
    - sequential late phase (Algorithm 1): clip and step the active member's rows on every
      minibatch; the shared gradients accumulate in .grad over the K minibatches of a cycle and
      the shared weights step once at its end on gamma * sum (gamma = 1 or 1/K), clipped then.
    - parallel late phase: clip all together, step every member row and the shared weights.
    After the update of the last tied step the members are spawned (row 0 copied, sigma0 noise
    drawn from a generator seeded with `seed`), and the member optimiser's state of row 0 is
    copied to every row: each member continues the tied trajectory, moments and step counts
    included, rather than restarting Adam's bias correction.
    `clip(params)` clips the gradients of `params` (e.g. accelerator.clip_grad_norm_).
    """

    def __init__(self, model: nn.Module, schedule: MemberSchedule, shared_optimizer: torch.optim.Optimizer,
                 member_optimizer: MemberOptimizer | None,
                 clip: Callable[[list[nn.Parameter]], object] | None = None, *, sigma0: float = 0.0, seed: int = 0):
        self.model = model
        self.schedule = schedule
        self.shared_optimizer = shared_optimizer
        self.member_optimizer = member_optimizer
        self.clip = clip
        self.sigma0 = sigma0
        self.seed = seed
        self.shared_params = shared_parameters(model)
        self.member_params = late_phase_parameters(model)
        if self.member_params and member_optimizer is None:
            raise ValueError("this model has late-phase parameters: pass a member optimiser (e.g. MemberAdamW)")
        if self.member_params and num_members(model) != schedule.K:
            raise ValueError(f"schedule has K={schedule.K} but the model stores {num_members(model)} members")
        self.pending = 0  # minibatches whose shared gradients are accumulated but not yet applied

    def after_backward(self, step: int) -> None:
        member = self.schedule.member(step)
        if self.schedule.phase(step) == "late" and self.schedule.schedule == "sequential":
            self._step_members(member, clip=True)
            self.pending += 1
            if self.schedule.steps_shared(step):
                self._finish_cycle()
        else:
            self._clip(self.shared_params + self.member_params)
            self._step_members(None if member == "parallel" else member, clip=False)
            self._step_shared()
        if self.schedule.spawns_at(step):
            self.spawn()

    def flush(self) -> None:
        """End of training: apply the shared gradients of an unfinished cycle (gamma times the sum
        over the minibatches it has) instead of dropping them."""
        if self.pending:
            self._finish_cycle()

    def _finish_cycle(self) -> None:
        """Algorithm 1's shared step on gamma * sum of the cycle's gradients (gamma = 1 or 1/pending)."""
        if self.schedule.gamma == "mean":
            for p in self.shared_params:
                if p.grad is not None:
                    p.grad.div_(self.pending)
        self._clip(self.shared_params)
        self._step_shared()

    def spawn(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        spawn_members(self.model, self.sigma0, generator)
        if self.member_optimizer is not None:
            _unwrapped(self.member_optimizer).copy_row_state(0)

    def _clip(self, params: list[nn.Parameter]) -> None:
        if self.clip is not None and params:
            self.clip(params)

    def _step_members(self, active: int | None, clip: bool) -> None:
        if not self.member_params:
            return
        if clip:
            self._clip(self.member_params)
        _unwrapped(self.member_optimizer).active = active
        self.member_optimizer.step()
        self.member_optimizer.zero_grad(set_to_none=True)

    def _step_shared(self) -> None:
        self.shared_optimizer.step()
        self.shared_optimizer.zero_grad(set_to_none=True)
        self.pending = 0

    def state_dict(self) -> dict:
        """The pending shared gradients of an unfinished cycle (the optimisers save themselves)."""
        grads = [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.shared_params]
        return {"pending": self.pending, "pending_grads": grads if self.pending else None}

    def load_state_dict(self, state: dict) -> None:
        self.pending = int(state["pending"])
        if state.get("pending_grads") is not None:
            for p, g in zip(self.shared_params, state["pending_grads"], strict=True):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
