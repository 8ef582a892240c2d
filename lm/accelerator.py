"""The one place an Accelerator is made, for training, evaluation and benchmarks alike."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, gather_object

from lm.config import ConfigError

# Sharded training splits parameters across processes, and with them the (K, d) member rows
# the member optimisers step one row at a time; these models (at most tens of millions of
# parameters) fit on one device, so data parallelism is the tool.
SHARDED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
           DistributedType.MEGATRON_LM: "Megatron-LM"}


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Raise a one-line ConfigError for an Accelerate setup this stack does not run."""
    if distributed_type in SHARDED:
        raise ConfigError(
            f"{SHARDED[distributed_type]} is not supported: late-phase member rows must stay whole on every "
            "process; run data-parallel instead (accelerate launch --multi_gpu, or an accelerate config without "
            f"{SHARDED[distributed_type]})"
        )


def use_tf32(enabled: bool) -> None:
    """Let (or forbid) float32 matmuls and cuDNN ops on CUDA use TF32 tensor cores; the fused
    Triton kernels read the same switch (kernels.rank1.dot_args)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                     trackers: list[str] | None = None, project_dir: str | None = None) -> Accelerator:
    """An Accelerator for this launch (python, torchrun or accelerate launch).

    `trackers` are Accelerate `log_with` names (tensorboard, wandb, ...); trackers that keep
    local files write them under `project_dir`.

    `accelerate launch --mixed_precision bf16|fp16` wins over `mixed_precision` (the launcher
    always exports its choice, "no" by default, so only a real choice overrides).
    """
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mixed_precision = launched if launched != "no" else mixed_precision
    # Without CUDA the run is a CPU run, said explicitly: Accelerate would otherwise pick Apple's MPS
    # (or another accelerator) that this stack is not built or tested for (float64 bpc totals, CUDA
    # kernels), and it treats a torchrun launch without GPUs as one process each unless told it is a
    # CPU run (cpu=True then gives MULTI_CPU over gloo; accelerate launch --cpu sets the same flag).
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=project_dir)
    check_distributed_type(accelerator.distributed_type)
    return accelerator


T = TypeVar("T")


def raise_everywhere(error: Exception | None, shareable: tuple[type[Exception], ...] = ()) -> None:
    """Raise, on every process, the first error any process met (None: this one met none); every
    process must call it. An error only some processes meet (a download on the main process, one
    process's damaged checkpoint file) would otherwise leave the others waiting at their next
    collective, and be lost where the process meeting it is not the one that prints.

    The process that met the error raises it itself, with its traceback; the others raise a copy
    if it is `shareable` (one-line user errors, printed as such by the main process), else a
    RuntimeError naming it."""
    shared = None
    if error is not None:
        shared = error if isinstance(error, shareable) else RuntimeError(
            f"process {PartialState().process_index} failed: {type(error).__name__}: {error}")
    met = [e for e in gather_object([shared]) if e is not None]
    if error is not None:
        raise error
    if met:
        raise met[0]


def main_process_first(accelerator: Accelerator, work: Callable[[], T],
                       errors: tuple[type[Exception], ...]) -> T:
    """work() on the main process, then on the others, which then find what it wrote (prepared
    data, a trained tokenizer) in place. Unlike Accelerate's context manager of that name, an
    error reaches every process (raise_everywhere; `errors` are the one-line user errors)."""
    result, error = None, None
    for turn_of_main in (True, False):
        if accelerator.is_main_process == turn_of_main:
            try:
                result = work()
            except Exception as e:  # every kind: the others must not be left waiting
                error = e
        raise_everywhere(error, errors)
    return result
