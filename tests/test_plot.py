"""lm.plot: the bpc-vs-step plot of a run directory."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure

from lm.config import config_to_dict, load_config
from lm.plot import bpc_figure, main, read_metrics

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, seed: int, overrides: list[str], valid_bytes: int | None = 12_345) -> tuple[Path, list[dict]]:
    """A run directory with a resolved config and random metrics (valid bpc every 40 steps, SWA
    late; each validation's byte count unless `valid_bytes` is None, as in older runs)."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    rng = np.random.default_rng(seed)
    records = []
    for step in range(10, cfg.train.max_steps + 1, 10):
        record = {"step": step, "train_bpc": float(rng.uniform(1.5, 4.0)), "lr": 0.01, "chars_per_s": 1e4}
        if step % 40 == 0:  # the kinds the trainer scores: ensemble in late-phase runs, swa once it started
            record["valid_bpc"] = {"averaged": float(rng.uniform(1.5, 4))}
            if valid_bytes is not None:
                record["valid_bytes"] = valid_bytes
            if cfg.late_phase.mode == "late_phase":
                record["valid_bpc"]["ensemble"] = float(rng.uniform(1.5, 4))
            if cfg.swa.enabled and step >= 80:
                record["valid_bpc"]["swa"] = float(rng.uniform(1.5, 4))
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run, records


def test_figure_has_one_line_per_kind_and_the_phase_markers(tmp_path):
    run, records = make_run(tmp_path, seed=1, overrides=[])
    cfg = load_config(run / "config.yaml")
    fig = bpc_figure(cfg, records, "smoke")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"train", "valid (averaged, 12,345 bytes)", "valid (ensemble, 12,345 bytes)",
                          "valid (swa, 12,345 bytes)", "T0 (step 60)", "swa_start (step 72)"}
    np.testing.assert_array_equal(lines["train"].get_xdata(), [r["step"] for r in records])
    np.testing.assert_array_equal(lines["train"].get_ydata(), [r["train_bpc"] for r in records])
    swa = [(r["step"], r["valid_bpc"]["swa"]) for r in records if "swa" in r.get("valid_bpc", {})]
    np.testing.assert_array_equal(np.column_stack(lines["valid (swa, 12,345 bytes)"].get_data()), swa)
    assert list(lines["T0 (step 60)"].get_xdata()) == [60, 60]


def test_plain_run_without_swa_has_no_markers(tmp_path):
    run, records = make_run(tmp_path, seed=2, overrides=["late_phase.mode=plain", "swa.enabled=false"], valid_bytes=None)
    fig = bpc_figure(load_config(run / "config.yaml"), records, "plain")
    lines = fig.axes[0].get_lines()
    # A plain run's one model is plotted as "valid": there are no members it is an average of.
    assert [line.get_label() for line in lines] == ["train", "valid"]
    valid = [(r["step"], r["valid_bpc"]["averaged"]) for r in records if "valid_bpc" in r]
    np.testing.assert_array_equal(np.column_stack(lines[1].get_data()), valid)


def test_plain_run_with_swa_labels_the_swa_curve(tmp_path):
    run, records = make_run(tmp_path, seed=6, overrides=["late_phase.mode=plain"])
    fig = bpc_figure(load_config(run / "config.yaml"), records, "plain")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["train", "valid, 12,345 bytes", "valid (swa, 12,345 bytes)", "swa_start (step 72)"]


def test_cli_writes_a_png_atomically(tmp_path, capsys):
    run, _ = make_run(tmp_path, seed=3, overrides=[])
    assert main(["--run", str(run)]) == 0
    png = run / "bpc.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(png).shape[:2] == (600, 960)
    out = tmp_path / "curves.png"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]  # no temporary left


@pytest.mark.parametrize("name,signature", [("curves.pdf", b"%PDF-"), ("curves.SVG", b"<?xml"),
                                            ("curves.jpg", b"\xff\xd8\xff")])
def test_cli_writes_the_format_the_suffix_names(tmp_path, capsys, name, signature):
    run, _ = make_run(tmp_path, seed=7, overrides=[])
    out = tmp_path / name
    assert main(["--run", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(signature)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "run"])  # no temporary left


def test_a_writer_failure_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    run, _ = make_run(tmp_path, seed=8, overrides=[])

    def no_tex(self, fname, **kwargs):
        open(fname, "wb").close()  # a writer may fail after creating its file
        raise RuntimeError("'xelatex' not found; install it or change rcParams['pgf.texsystem']\nmore")

    monkeypatch.setattr(Figure, "savefig", no_tex)
    assert main(["--run", str(run), "--out", str(tmp_path / "curves.pgf")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {tmp_path / 'curves.pgf'} ('xelatex' not found; install it or change "
                   "rcParams['pgf.texsystem']); pick another --out\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_help_names_the_run_directory(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default RUN/bpc.png)" in " ".join(capsys.readouterr().out.split())


def test_torn_last_line_is_skipped_but_corruption_is_an_error(tmp_path):
    run, records = make_run(tmp_path, seed=4, overrides=[])
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 130, "train_')
    assert read_metrics(metrics) == records
    metrics.write_text('{"step": 1\n' + metrics.read_text())
    assert main(["--run", str(run)]) == 2


@pytest.mark.parametrize("line,problem", [
    (b"null", "is not a JSON object but null"),
    (b"[1, 2, 3]", "is not a JSON object but [1, 2, 3]"),
    (b'{"step": 50, "train_bpc": 2.5, "lr": 0.01\xff}', "is not JSON"),  # a byte that is not UTF-8
    (b'{"step": "abc", "train_bpc": "x"}', 'has no numeric step (step: "abc")'),
    (b'{"train_bpc": 2.5}', "has no numeric step (step: null)"),
    (b'{"step": true, "train_bpc": 2.5}', "has no numeric step (step: true)"),
    (b'{"step": 50, "train_bpc": "x"}', 'has a non-numeric train_bpc ("x")'),
    (b'{"step": 50, "valid_bpc": [2.5]}', "has valid_bpc [2.5], not an object of bpc by model kind"),
    (b'{"step": 50, "valid_bpc": {"averaged": "2.5"}}', 'has a non-numeric valid_bpc of "averaged" ("2.5")'),
    (b'{"step": 50, "valid_bpc": {"averaged": 2.5}, "valid_bytes": "many"}', 'has a non-numeric valid_bytes ("many")'),
])
def test_a_line_that_is_not_a_metrics_record_is_a_one_line_error(tmp_path, capsys, line, problem):
    run, records = make_run(tmp_path, seed=9, overrides=[])
    metrics = run / "metrics.jsonl"
    good = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(good[:3]) + line + b"\n" + b"".join(good[3:]))  # line 4 of the file
    assert main(["--run", str(run)]) == 2
    assert capsys.readouterr().err == f"error: {metrics}:4 {problem}: the metrics file is corrupt; " \
                                      "delete or repair that line\n"
    assert not (run / "bpc.png").exists()
    if problem != "is not JSON":  # a whole line that parses is no torn write, last or not
        metrics.write_bytes(b"".join(good) + line + b"\n")
        assert main(["--run", str(run)]) == 2
        assert f"metrics.jsonl:{len(good) + 1} {problem}: " in capsys.readouterr().err


def test_torn_last_line_that_is_not_utf8_is_skipped(tmp_path):
    run, records = make_run(tmp_path, seed=10, overrides=[])
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 130, "train_\xe2\x82')  # cut inside a character
    assert read_metrics(metrics) == records


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "bad_out_dir", "unknown_suffix", "no_suffix"])
def test_cli_errors_are_one_line(tmp_path, capsys, case):
    run, _ = make_run(tmp_path, seed=5, overrides=[])
    args = {"missing_dir": ["--run", str(tmp_path / "nope")],
            "no_metrics": ["--run", str(run)],
            "bad_out_dir": ["--run", str(run), "--out", str(tmp_path / "no" / "x.png")],
            "unknown_suffix": ["--run", str(run), "--out", str(run / "x.pnx")],
            "no_suffix": ["--run", str(run), "--out", str(run / "x")]}[case]
    if case == "no_metrics":
        (run / "metrics.jsonl").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if case.endswith("suffix"):
        assert "; end --out in one of " in err and ".pdf" in err
    assert {p.name for p in run.iterdir()} <= {"config.yaml", "metrics.jsonl"}  # nothing written
