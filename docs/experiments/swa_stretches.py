"""SWA of stretches of a run's snapshots, from the running sums its checkpoints keep.

    PYTHONPATH=. python docs/experiments/swa_stretches.py RUN [--bytes N] [--line A B]

For each checkpoint: the SWA model so far; for each pair of consecutive checkpoints: the mean
of the snapshots between them and how far it moved from the previous stretch (relative L2
distance). --line A B also scores the line from the SWA at step A to the mean of the snapshots
in (A, B]. Scored on the first N valid bytes (default 400,000) of the run's data.dir, with the
run's exported final/swa model as the container (the run needs swa.enabled).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from data.tokenizer import ByteTokenizer, load_split
from lm.evaluate import evaluate_bpc
from lm.models import load_exported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--bytes", type=int, default=400_000)
    parser.add_argument("--line", type=int, nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    valid = load_split(cfg["data"]["dir"], "valid", ByteTokenizer())[:args.bytes]
    model = load_exported(args.run / "final" / "swa")
    sums = {}
    for checkpoint in sorted((args.run / "checkpoints").glob("step_*")):
        swa = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)["swa"]
        if swa and swa["count"]:
            sums[int(checkpoint.name.removeprefix("step_"))] = swa

    def score(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        return evaluate_bpc(model, valid, family=cfg["model"]["family"], batch_size=64,
                            seq_len=cfg["train"]["seq_len"]).bpc

    def mean(a: int | None, b: int) -> dict[str, torch.Tensor]:
        """Mean of the snapshots in (a, b] (all up to b when a is None)."""
        count = sums[b]["count"] - (sums[a]["count"] if a else 0)
        return {k: (v - (sums[a]["sums"][k] if a else 0)) / count for k, v in sums[b]["sums"].items()}

    steps = sorted(sums)
    for b in steps:
        print(f"SWA to step {b} ({sums[b]['count']} snapshots): {score(mean(None, b)):.4f}")
    previous = None
    for a, b in zip(steps, steps[1:]):
        stretch = mean(a, b)
        moved = ""
        if previous is not None:
            distance = sum(((stretch[k] - previous[k]) ** 2).sum() for k in stretch) ** 0.5
            moved = f", {distance / sum((previous[k] ** 2).sum() for k in previous) ** 0.5:.1%} from the previous stretch"
        print(f"mean of the snapshots in ({a}, {b}]: {score(stretch):.4f}{moved}")
        previous = stretch
    if args.line:
        a, b = args.line
        start, end = mean(None, a), mean(a, b)
        for t in (0.0, 0.1, (sums[b]["count"] - sums[a]["count"]) / sums[b]["count"], 0.3, 0.5, 0.7, 1.0):
            print(f"{t:.3f} of the way from SWA to {a} to the mean of ({a}, {b}]: "
                  f"{score({k: (1 - t) * start[k] + t * end[k] for k in start}):.4f}")


if __name__ == "__main__":
    main()
