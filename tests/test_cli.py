"""lm.cli: under a launcher every process parses the same command line; one of them speaks."""
from __future__ import annotations

import pytest

import lm.cli
import lm.evaluate
import train_lm


def parse(command: str, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit:
        train_lm.parse_args(argv) if command == "train_lm.py" else lm.evaluate.main(argv)
    return exit.value.code


@pytest.mark.parametrize("command", ["train_lm.py", "python -m lm.evaluate"])
@pytest.mark.parametrize("rank", ["0", "1", None])
def test_help_and_usage_errors_come_from_one_process(monkeypatch, capsys, command, rank):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)  # no launcher: the only process speaks
    else:
        monkeypatch.setenv("RANK", rank)
    speaks = rank != "1"
    slept = []
    monkeypatch.setattr(lm.cli.time, "sleep", slept.append)

    required = ["--run", "somewhere"] if command == "python -m lm.evaluate" else []
    assert parse(command, [*required, "--no-such-flag"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and ("unrecognized arguments: --no-such-flag" in err) == speaks and (err == "") != speaks
    # A silent process leaves after the speaking one has printed (a launcher stops the rest when one exits).
    assert slept == ([] if speaks else [lm.cli.SILENT_EXIT_DELAY_S])

    assert parse(command, ["--help"]) == 0
    out, err = capsys.readouterr()
    assert (f"usage: {command}" in out) == speaks and (out == "") != speaks and err == ""
    assert len(slept) == (0 if speaks else 1)  # help is no error: nobody waits
