"""Typed run configuration: dataclass sections, YAML files, dotted overrides, validation.

Every key a YAML file or a `section.key=value` override may set is a field below;
anything else is rejected before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType


class ConfigError(ValueError):
    """A config problem, reported to the user as one line naming the key."""


@dataclass
class RunConfig:
    out_dir: str = "runs/enwik8_lstm_late_phase"
    # Accelerate trackers to log metrics to besides metrics.jsonl (its `log_with` names),
    # e.g. [tensorboard] or [wandb]; the tracker's package must be installed.
    trackers: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    corpus: str = "enwik8"  # enwik8 | synthetic | prepared (train/valid/test .bin already in dir)
    dir: str = "data/enwik8"
    source: str | None = None  # local copy to prepare from (enwik8 .zip / file, or any corpus)
    synthetic_bytes: int = 2_000_000  # size of the generated smoke corpus
    tokenizer: str = "bytes"  # bytes | sentencepiece
    sp_vocab_size: int = 4096


@dataclass
class ModelConfig:
    family: str = "lstm"  # lstm | transformer
    vocab_size: int = 256  # set from the tokenizer at run time
    # LSTM
    embed_dim: int = 190  # with hidden_size 500: 1,560,896 parameters, the paper's "about 1.56M"
    hidden_size: int = 500
    num_layers: int = 1
    # How the LSTM runs all K members at once (parallel schedule, ensemble evaluation):
    # fused (kernels.rank1_linear and kernels.rank1_lstm over every member at once), folded
    # (one nn.LSTM per member with its folded weights), auto (whichever measured faster: fused
    # for the CPU's parallel schedule from 500 hidden units, folded otherwise; lm/models/lstm.py).
    lstm_members: str = "auto"
    # fused on CUDA: replay each window's kernel launches from a CUDA graph (kernels.rank1_lstm).
    lstm_cuda_graphs: bool = True
    # How late-phase linear layers (the Transformer's, the LSTM's input projections in fused)
    # run all K members at once: fused (kernels.rank1_linear: the Triton kernel on CUDA; on the
    # CPU the eager form, which folds where that measured faster), folded (each member's weight
    # W * r_k s_k^T built, one batched matmul, whatever the rows), auto (= fused, the measured
    # default until folded is timed on a GPU: docs/benchmarks/training.md).
    linear_members: str = "auto"
    # Transformer
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    mlp_ratio: int = 4
    max_seq_len: int = 512
    positions: str = "rotary"  # rotary | learned
    dropout: float = 0.0
    layernorm_factors: bool = False  # late-phase gains on LayerNorm too


@dataclass
class LatePhaseConfig:
    mode: str = "late_phase"  # plain | rank1 | late_phase
    K: int = 10
    T0: int | float = 0.5  # int >= 1: a step; float in [0, 1): fraction of train.max_steps
    schedule: str = "sequential"  # sequential (paper's Algorithm 1) | parallel
    sigma0: float = 0.0  # relative noise added to member factors at T0
    gamma: str = "sum"  # sum | mean: shared-weight step on the sum or mean of K gradients
    lr: float | None = None  # learning rate of late-phase weights (None: train.lr)
    # Weight decay of the late-phase weights. 0 by default, whatever train.weight_decay is: the
    # factors r, s multiply W and start at 1, so decay toward 0 would shrink every member's weights.
    weight_decay: float = 0.0


@dataclass
class SWAConfig:
    enabled: bool = False
    start: int | float = 0.75  # int >= 1: a step; float in [0, 1): fraction of train.max_steps
    every: int = 1000  # steps between snapshots


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    seed: int = 0
    batch_size: int = 64  # global, in sequences
    seq_len: int = 150  # BPTT length (LSTM) or context length (Transformer)
    optimizer: str = "adam"  # adam | sgd
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's; with optimizer sgd, betas[0] is the momentum
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    # float32 matrix products on CUDA in TF32 (torch.backends.cuda.matmul / cudnn .allow_tf32):
    # cuDNN's LSTM already does so by default, and the fused kernels follow the same switch.
    # false: full float32 everywhere (several times slower; no effect on CPU).
    tf32: bool = True
    log_every: int = 50
    eval_every: int = 1000
    eval_bytes: int | None = 1_000_000  # valid bytes scored by periodic evals (None: whole split)


@dataclass
class EvalConfig:
    batch_size: int = 64
    context: int = 512  # Transformer sliding-window context
    stride: int = 256  # Transformer window stride (bytes newly scored per window)
    members: bool = True  # final results also score every late-phase member on its own (K passes per split)


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int = 2


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    late_phase: LatePhaseConfig = field(default_factory=LatePhaseConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# Allowed values of the string-valued choices, checked by `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.corpus": ("enwik8", "synthetic", "prepared"),
    "data.tokenizer": ("bytes", "sentencepiece"),
    "model.family": ("lstm", "transformer"),
    "model.lstm_members": ("auto", "fused", "folded"),
    "model.linear_members": ("auto", "fused", "folded"),
    "model.positions": ("rotary", "learned"),
    "late_phase.mode": ("plain", "rank1", "late_phase"),
    "late_phase.schedule": ("sequential", "parallel"),
    "late_phase.gamma": ("sum", "mean"),
    "train.optimizer": ("adam", "sgd"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}

# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; accept such numbers for float fields.
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads yes/no/on/off as booleans, which would turn `mixed_precision: no`
    (Accelerate's own spelling) into False.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _mapping_without_duplicates(loader: _Yaml12Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # A key written twice would silently keep its last value: the first is then dead config.
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` brings keys this mapping may override
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable) and key in seen:  # construct_mapping reports unhashable keys
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        if isinstance(key, Hashable):
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as an instance of the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
    elif origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(key, v, item_type) for v in value]
    elif origin is tuple:
        item_types = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(item_types):
            return tuple(_coerce(key, v, t) for v, t in zip(value, item_types))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # (late_phase.T0 and swa.start are int | float: the int option, tried first, keeps a step a step.)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Build a Config from nested plain data ({section: {key: value}}), rejecting unknown keys and wrong types.

    Missing keys keep their defaults. Does not run `validate` (values may still be impossible)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    sections = _sections()
    for name in raw:
        if name not in sections:
            raise ConfigError(f"{name}: unknown config section; valid sections: {', '.join(sections)}")
    built = {}
    for name, cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise ConfigError(f"{name}.{key}: unknown key; valid keys in [{name}]: {', '.join(hints)}")
        built[name] = cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})
    return Config(**built)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested data (YAML/JSON-safe: tuples become lists) that config_from_dict turns back into `cfg`."""
    out = dataclasses.asdict(cfg)
    for section in out.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value), the value parsed as YAML (so `0.5`, `true`, `null`, `[1, 2]`)."""
    path, sep, value_text = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not section or not key or "." in key:
        raise ConfigError(f"{path.strip() or text}: an override is section.key=value, e.g. train.max_steps=1000")
    try:
        value = _load_yaml(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"{section}.{key}: cannot parse value {value_text!r} in override {text!r}") from None
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (if any) ← `section.key=value` overrides, then `validate`d.

    Raises ConfigError (one line naming the key and the fix) for a missing file, unknown keys,
    wrong types and impossible values."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror}); see configs/ for examples") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file, so not a YAML config; see configs/ for examples") from None
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
            raise ConfigError(f"{path}: not valid YAML{line}{problem}; fix the file's syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (run:, data:, ...) at the top level")
    for text in overrides:
        section, key, value = parse_override(text)
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"{section}: expected a mapping of keys in {path}")
        current[key] = value
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def resolve_step(value: int | float, max_steps: int, key: str = "step") -> int:
    """A step given as an int (a step number) or a float in [0, 1) (a fraction of `max_steps`) → the step number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected an int step or a fraction in [0, 1), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: step {value} is negative; use a step >= 0 or a fraction in [0, 1)")
        return value
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(f"{key}: {value} is neither an int step nor a fraction in [0, 1); write e.g. 0.5 or 30000")
    return round(value * max_steps)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


TRACKERS = tuple(t.value for t in LoggerType if t.value != "all")


def check_new_run(cfg: Config) -> None:
    """Reject settings a new run would silently ignore. Not part of `validate`: runs that an older
    version let through must still resume and evaluate (their weights never depended on them)."""
    m = cfg.model
    if m.family == "lstm":  # keys only the Transformer reads
        _require(m.dropout == 0, "model.dropout",
                 f"{m.dropout}: the LSTM has no dropout (the paper trains it unregularised); set model.dropout=0, "
                 f"or model.family=transformer")
        _require(not m.layernorm_factors, "model.layernorm_factors",
                 "the LSTM has no LayerNorm; set model.layernorm_factors=false, or model.family=transformer")


def validate(cfg: Config, num_processes: int = 1) -> None:
    """Reject impossible values with a ConfigError naming the key and the fix.

    `num_processes` is the data-parallel world size the run will use (batch divisibility)."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")

    for name in cfg.run.trackers:
        _require(name in TRACKERS, "run.trackers", f"{name!r} is not an Accelerate tracker; use some of {', '.join(TRACKERS)}")
        # Accelerate lists the installed ones as LoggerType members (a plain Enum, not str).
        installed = {getattr(tracker, "value", tracker) for tracker in get_available_trackers()}
        _require(name in installed, "run.trackers",
                 f"{name!r} is not installed; pip install {name}, or remove it from run.trackers")

    _require(cfg.data.source is None or cfg.data.corpus != "synthetic", "data.source",
             f"{cfg.data.source} would be ignored: data.corpus=synthetic generates its corpus; add "
             f"data.corpus=prepared (any text) or data.corpus=enwik8 to train on the file")

    t, lp, m = cfg.train, cfg.late_phase, cfg.model
    for key, value in [
        ("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size), ("train.seq_len", t.seq_len),
        ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
        ("late_phase.K", lp.K), ("swa.every", cfg.swa.every), ("checkpoint.every", cfg.checkpoint.every),
        ("checkpoint.keep", cfg.checkpoint.keep), ("eval.batch_size", cfg.eval.batch_size),
        ("eval.context", cfg.eval.context), ("eval.stride", cfg.eval.stride),
        ("model.embed_dim", m.embed_dim), ("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
        ("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.mlp_ratio", m.mlp_ratio), ("model.max_seq_len", m.max_seq_len),
        ("data.synthetic_bytes", cfg.data.synthetic_bytes), ("data.sp_vocab_size", cfg.data.sp_vocab_size),
    ]:
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(0 <= t.warmup_steps < t.max_steps, "train.warmup_steps",
             f"{t.warmup_steps} is not in [0, train.max_steps={t.max_steps}); the learning rate would never reach train.lr")
    _require(t.eval_bytes is None or t.eval_bytes >= 2, "train.eval_bytes", "must be >= 2 or null (whole split)")
    for key, value in [("train.lr", t.lr), ("late_phase.lr", lp.lr)]:
        _require(value is None or (math.isfinite(value) and value > 0), key, f"must be a positive number, got {value}")
    for key, value in [("train.weight_decay", t.weight_decay), ("late_phase.weight_decay", lp.weight_decay),
                       ("late_phase.sigma0", lp.sigma0), ("train.grad_clip", t.grad_clip), ("model.dropout", m.dropout)]:
        _require(value is None or (math.isfinite(value) and value >= 0), key, f"must be >= 0, got {value}")
    _require(m.dropout < 1, "model.dropout", f"must be < 1, got {m.dropout}")
    _require(all(0 <= b < 1 for b in t.betas), "train.betas", f"both betas must be in [0, 1), got {list(t.betas)}")

    if lp.mode == "late_phase":
        T0 = resolve_step(lp.T0, t.max_steps, "late_phase.T0")
        _require(T0 < t.max_steps, "late_phase.T0",
                 f"step {T0} is not before the end of training (train.max_steps={t.max_steps}); "
                 f"lower late_phase.T0 or raise train.max_steps")
    if cfg.swa.enabled:
        start = resolve_step(cfg.swa.start, t.max_steps, "swa.start")
        _require(start < t.max_steps, "swa.start",
                 f"step {start} is not before the end of training (train.max_steps={t.max_steps}); "
                 f"lower swa.start or raise train.max_steps")

    # Accelerate's fp16 loss scaler unscales every prepared optimiser at each clip and updates its scale
    # at each optimiser step; with a shared and a member optimiser (and shared gradients accumulated over
    # K minibatches) gradients would be unscaled twice. bf16 needs no scaler.
    _require(t.mixed_precision != "fp16" or lp.mode == "plain", "train.mixed_precision",
             f"fp16 loss scaling does not support late_phase.mode={lp.mode} (two optimisers); use bf16 or no")
    shards = num_processes * t.grad_accum
    _require(t.batch_size % shards == 0, "train.batch_size",
             f"{t.batch_size} sequences do not split evenly over {num_processes} process(es) x "
             f"{t.grad_accum} accumulation step(s); use a multiple of {shards}")
    if lp.mode == "late_phase" and lp.schedule == "parallel":
        _require(t.batch_size % (shards * lp.K) == 0, "train.batch_size",
                 f"the parallel schedule needs every micro-batch to hold a multiple of K={lp.K} sequences; "
                 f"use a multiple of {shards * lp.K} ({num_processes} process(es) x {t.grad_accum} "
                 f"accumulation step(s) x K)")

    if m.family == "transformer":
        _require(m.d_model % m.n_heads == 0, "model.n_heads",
                 f"d_model={m.d_model} does not split into n_heads={m.n_heads} heads; pick n_heads dividing d_model")
        _require(m.positions != "rotary" or (m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
                 f"d_model={m.d_model} is not n_heads={m.n_heads} times an even head size (rotary positions "
                 f"rotate pairs of channels); pick n_heads so that d_model / n_heads is even, or model.positions=learned")
        _require(t.seq_len <= m.max_seq_len, "train.seq_len",
                 f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower it or raise model.max_seq_len")
        _require(cfg.eval.context <= m.max_seq_len, "eval.context",
                 f"{cfg.eval.context} exceeds model.max_seq_len={m.max_seq_len}; lower it or raise model.max_seq_len")
        _require(cfg.eval.stride <= cfg.eval.context, "eval.stride",
                 f"{cfg.eval.stride} exceeds eval.context={cfg.eval.context}; bytes would go unscored")
