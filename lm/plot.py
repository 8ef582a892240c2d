"""Training curves of a run (`python -m lm.plot --run RUN`).

Reads RUN/metrics.jsonl and RUN/config.yaml and draws train bpc and the valid bpc of every
model kind against the step, with the late-phase switch (T0) and the start of SWA marked.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from lm.config import Config, ConfigError, load_config, resolve_step
from lm.files import atomic_path


class PlotError(Exception):
    """A problem with the run directory, reported as one line naming the fix."""


# The end of every error about a bad line of metrics.jsonl.
CORRUPT = "the metrics file is corrupt; delete or repair that line"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (run still writing) is skipped.

    Any other line that is not a JSON object with numeric step and bpc values is an error: it
    would otherwise crash the plot (null, a list) or plot nonsense (a step "abc")."""
    if not path.is_file():
        raise PlotError(f"no {path.name} in {path.parent}: pass --run with a training run's out_dir")
    # Bytes, split on line ends only: a non-UTF-8 byte is then one corrupt line, not a crash of the whole read.
    lines = path.read_bytes().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):
                break
            raise PlotError(f"{path}:{number} is not JSON: {CORRUPT}") from None
        problem = record_problem(record)
        if problem is not None:
            raise PlotError(f"{path}:{number} {problem}: {CORRUPT}")
        records.append(record)
    return records


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is no step or bpc


def record_problem(record: object) -> str | None:
    """Why `record` is not a metrics record the trainer writes (None: it is one)."""
    if not isinstance(record, dict):
        return f"is not a JSON object but {json.dumps(record)[:40]}"
    if not _is_number(record.get("step")):
        return f"has no numeric step (step: {json.dumps(record.get('step'))[:40]})"
    checks = [("train_bpc", record.get("train_bpc"))]
    valid = record.get("valid_bpc")
    if valid is not None:
        if not isinstance(valid, dict):
            return f"has valid_bpc {json.dumps(valid)[:40]}, not an object of bpc by model kind"
        checks += [(f"valid_bpc of {json.dumps(kind)}", bpc) for kind, bpc in valid.items()]
    for name, value in checks:
        if value is not None and not _is_number(value):
            return f"has a non-numeric {name} ({json.dumps(value)[:40]})"
    if "valid_bytes" in record and not _is_number(record["valid_bytes"]):  # labels the curves when present
        return f"has a non-numeric valid_bytes ({json.dumps(record['valid_bytes'])[:40]})"
    return None


def phase_markers(cfg: Config) -> dict[str, int]:
    """Steps to mark: T0 for late-phase runs, the first SWA step when SWA is on."""
    markers = {}
    if cfg.late_phase.mode == "late_phase":
        markers["T0"] = resolve_step(cfg.late_phase.T0, cfg.train.max_steps)
    if cfg.swa.enabled:
        markers["swa_start"] = resolve_step(cfg.swa.start, cfg.train.max_steps)
    return markers


def bpc_figure(cfg: Config, records: list[dict], title: str) -> Figure:
    """Train bpc, valid bpc per model kind and the phase markers, on one axis."""
    train = [(r["step"], r["train_bpc"]) for r in records if r.get("train_bpc") is not None]
    valid: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for kind, bpc in (r.get("valid_bpc") or {}).items():
            if bpc is not None:
                valid.setdefault(kind, []).append((r["step"], bpc))
    if not train and not valid:
        raise PlotError("the metrics have no bpc records yet: plot after the first logged step")

    # A bare Figure (no pyplot): nothing global is touched, no display is needed, and savefig
    # picks the canvas for the file format.
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", color="0.55", linewidth=1.0)
    # Without late-phase members the "averaged" model is the trained model itself.
    plain_kind = "averaged" if cfg.late_phase.mode != "late_phase" else None
    # Periodic validation scores the split's first train.eval_bytes bytes: say so beside the curve.
    scored = {r["valid_bytes"] for r in records if "valid_bytes" in r}
    scope = f", {scored.pop():,} bytes" if len(scored) == 1 else ""
    for kind, points in sorted(valid.items()):
        label = f"valid{scope}" if kind == plain_kind else f"valid ({kind}{scope})"
        ax.plot(*zip(*points), label=label, marker="o", markersize=3, linewidth=1.5)
    for (name, step), style in zip(phase_markers(cfg).items(), ("--", ":")):
        ax.axvline(step, color="black", linestyle=style, linewidth=1.0, label=f"{name} (step {step})")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_run(run: Path, out: Path | None = None) -> Path:
    """Write the run's bpc-vs-step plot (atomically; default RUN/bpc.png; the suffix of `out` picks
    the image format) and return its path."""
    if not run.is_dir():
        raise PlotError(f"{run} is not a directory: pass --run with a training run's out_dir")
    if not (run / "config.yaml").is_file():
        raise PlotError(f"no config.yaml in {run}: pass --run with a training run's out_dir")
    out = out if out is not None else run / "bpc.png"
    if not out.parent.is_dir():
        raise PlotError(f"cannot write {out}: directory {out.parent} does not exist; create it or pick another --out")
    # Given explicitly, because the temporary file's name below has no image suffix to infer it from.
    image_format = out.suffix.lower().removeprefix(".")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if image_format not in formats:
        problem = f"{out.suffix} is no image format matplotlib writes" if out.suffix else "no suffix names its format"
        raise PlotError(f"cannot write {out}: {problem}; end --out in one of {', '.join('.' + f for f in formats)}")
    cfg = load_config(str(run / "config.yaml"), [])
    fig = bpc_figure(cfg, read_metrics(run / "metrics.jsonl"),
                     f"{run.resolve().name}: {cfg.model.family}, {cfg.late_phase.mode}")
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=image_format)
    except (OSError, RuntimeError) as e:  # e.g. no permission, or .pgf without a TeX install
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise PlotError(f"cannot write {out} ({reason}); pick another --out") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lm.plot",
        description="Plot train and valid bits per character against step for a training run, "
        "with T0 (late-phase switch) and the SWA start marked.",
    )
    parser.add_argument("--run", required=True, type=Path, help="the run's out_dir (has metrics.jsonl, config.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="image to write, in the format its suffix names: .png, .pdf, .svg, ... "
                        "(default RUN/bpc.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run, args.out)
    except (PlotError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
