"""Typed run configuration: dataclass sections, YAML files, dotted overrides, validation.

Every key a YAML file or a `section.key=value` override may set is a field below;
anything else is rejected before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config problem, reported to the user as one line naming the key."""


@dataclass
class RunConfig:
    out_dir: str = "runs/enwik8_lstm_late_phase"


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
    embed_dim: int = 200
    hidden_size: int = 500
    num_layers: int = 1
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
    T0: float = 0.5  # int >= 1: a step; float in [0, 1): fraction of train.max_steps
    schedule: str = "sequential"  # sequential (paper's Algorithm 1) | parallel
    sigma0: float = 0.0  # relative noise added to member factors at T0
    gamma: str = "sum"  # sum | mean: shared-weight step on the sum or mean of K gradients
    lr: float | None = None  # learning rate of late-phase weights (None: train.lr)
    weight_decay: float | None = None  # (None: train.weight_decay)


@dataclass
class SWAConfig:
    enabled: bool = False
    start: float = 0.75  # int >= 1: a step; float in [0, 1): fraction of train.max_steps
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
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 50
    eval_every: int = 1000
    eval_bytes: int | None = 1_000_000  # valid bytes scored by periodic evals (None: whole split)


@dataclass
class EvalConfig:
    batch_size: int = 64
    context: int = 512  # Transformer sliding-window context
    stride: int = 256  # Transformer window stride (bytes newly scored per window)


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
