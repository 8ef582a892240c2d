"""Train a character-level LM with (optionally) rank-1 late-phase weights.

    python train_lm.py [--config configs/NAME.yaml] [--resume] [section.key=value ...]
    accelerate launch [--multi_gpu --mixed_precision bf16 ...] train_lm.py ...
    torchrun --nproc_per_node 2 train_lm.py ...        (CPU: processes talk over gloo)

Without --config: the paper's late-phase LSTM on enwik8 (configs/enwik8_lstm_late_phase.yaml),
downloading and splitting enwik8 first when data.dir does not hold it yet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lm.cli import ArgumentParser, exit_process, leave_silently, speaks

if TYPE_CHECKING:  # imported lazily at run time, so that --help is instant
    from lm.config import Config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "enwik8_lstm_late_phase.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="train_lm.py",
        description="Train a byte-level LSTM or Transformer LM (plain, rank-1 or late-phase weights) and write "
        "run.out_dir: config.yaml, metrics.jsonl, checkpoints/, final/ and results.json (valid and test bpc).",
        epilog="examples:\n"
        "  python train_lm.py --config configs/smoke.yaml                      # tiny offline run, seconds\n"
        "  python train_lm.py --config configs/enwik8_lstm_plain.yaml train.max_steps=2000 run.out_dir=runs/try\n"
        "  python train_lm.py data.source=~/enwik8.zip                         # paper's late-phase LSTM\n"
        "  python train_lm.py --config configs/smoke.yaml --resume             # continue from the last checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in run.out_dir; the data, model, K, schedule, "
                             "batch and process count must stay (simplest: --config RUN/config.yaml --resume)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value, e.g. train.max_steps=1000 late_phase.K=4 swa.enabled=true")
    return parser.parse_intermixed_args(argv)  # overrides may come before and after the flags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = None
    try:
        # Imported after argument parsing so that --help is instant (and inside the try: a
        # Ctrl-C during the imports is an interruption like any other).
        from data.prepare import DataError
        from lm.checkpoint import CheckpointError
        from lm.config import ConfigError, load_config
        from lm.trainer import Trainer, TrainingError

        try:
            cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
            results = Trainer(cfg, resume=args.resume).fit()
        except (ConfigError, DataError, CheckpointError, TrainingError) as e:
            # Every process has the error (lm.accelerator.raise_everywhere); one prints it.
            if speaks():
                print(f"error: {e}", file=sys.stderr)
            leave_silently()
            return 2
    except KeyboardInterrupt:
        if speaks():
            print(f"error: interrupted; {_what_is_left(cfg)}", file=sys.stderr)
        return 130
    if speaks():
        for split in ("valid", "test"):
            summary = ", ".join(f"{kind} {bpc:.4f}" for kind, bpc in results[split].items())
            print(f"{split} bpc ({results['n_bytes'][split]:,} bytes): {summary}")
        print(f"-> {cfg.run.out_dir}/results.json")
    return 0


def _what_is_left(cfg: Config | None) -> str:
    """After a Ctrl-C: where the run can go on from."""
    if cfg is None:
        return "nothing was written"
    from lm.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(Path(cfg.run.out_dir).expanduser())
    if checkpoint is None:
        return "no checkpoint was written yet, so run the same command again (without --resume) to start over"
    return f"the last checkpoint ({checkpoint.name}) is intact, continue with --resume"


if __name__ == "__main__":
    exit_process(main())
