"""Crash-safe training checkpoints: Accelerate's state plus what Accelerate does not know about.

Layout of one checkpoint, `OUT/checkpoints/step_0000123/`:
  - everything `accelerator.save_state` writes (model, optimisers, every process's RNG states);
  - `trainer.pt`: the main process's extra tensors (late-phase stepper, SWA average, pending gradients);
  - `process_<rank>.pt`: each process's own state (its data iterator position, its LSTM hidden state);
  - `trainer_state.json`: step and readable metadata. Written LAST: a directory without it is incomplete.

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
process killed mid-write leaves the previous checkpoints untouched; discovery ignores temporary
directories and the next save removes them.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from lm.files import replace_directory
from lm.models import first_problem

STATE_FILE = "trainer_state.json"
MAIN_TENSORS_FILE = "trainer.pt"
TEMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, or written by an incompatible run); one line with the fix."""


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (by step number)."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Accelerator,
    out_dir: str | Path,
    step: int,
    state: dict[str, Any],
    main_tensors: dict[str, Any],
    process_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically; every process must call this. Keeps the newest `keep`.

    `state` (JSON-able) and `main_tensors` come from the main process; `process_state` from each process."""
    root = checkpoints_root(out_dir)
    final = root / checkpoint_name(step)
    tmp = root / f"{TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TEMP_PREFIX}*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(process_state, tmp / f"process_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(main_tensors, tmp / MAIN_TENSORS_FILE)
        # Last: its presence marks the directory complete (and it is still the temporary one).
        state_json = json.dumps({**state, "step": step, "num_processes": accelerator.num_processes}, indent=2, sort_keys=True)
        (tmp / STATE_FILE).write_text(state_json + "\n")
        replace_directory(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _damaged(path: Path, detail: str) -> CheckpointError:
    """The error for a checkpoint whose files cannot be read, naming the one to fall back on."""
    found = list_checkpoints(path.parent.parent)
    older = found[:found.index(path)] if path in found else []
    fix = (f"delete {path} to resume from {older[-1].name}" if older
           else "delete it and start again without --resume, or choose another run.out_dir")
    detail = detail.split(". ")[0]  # torch's torn-archive message goes on for three sentences
    return CheckpointError(f"{path}: damaged ({detail}); {fix}")


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The readable metadata of checkpoint `path` (step, config, ...), without loading any tensor."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE}); pick another one or start afresh")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        raise _damaged(path, f"{STATE_FILE}: {first_problem(e)}") from None
    if not isinstance(state, dict) or not {"step", "num_processes"} <= state.keys():  # what save_checkpoint adds
        raise _damaged(path, f"{STATE_FILE} lacks step or num_processes")
    return state


# What reading a damaged file raises: a missing file, a torn zip archive (torch.save's format),
# a torn pickle, a torn safetensors header.
_UNREADABLE = (OSError, EOFError, pickle.UnpicklingError, SafetensorError)


def _unreadable(e: BaseException) -> bool:
    return isinstance(e, _UNREADABLE) or "PytorchStreamReader" in str(e)


def check_process_count(path: Path, state: dict[str, Any], num_processes: int) -> None:
    if state["num_processes"] != num_processes:
        raise CheckpointError(f"{path}: written by {state['num_processes']} process(es), resumed with "
                              f"{num_processes}; resume with the same number of processes (each owns its data "
                              f"streams)")


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state from `path` (model, optimisers, RNG) and return
    (state, main_tensors, this process's process_state) for the trainer to apply."""
    path = Path(path)
    state = read_checkpoint_state(path)
    check_process_count(path, state, accelerator.num_processes)
    try:
        accelerator.load_state(str(path))
        main_tensors = torch.load(path / MAIN_TENSORS_FILE, map_location="cpu", weights_only=True)
        process_state = torch.load(path / f"process_{accelerator.process_index}.pt", map_location="cpu",
                                   weights_only=True)
    except Exception as e:  # loaders raise many types: a damaged file, a misfit, or a bug (re-raised)
        if _unreadable(e):
            raise _damaged(path, first_problem(e)) from e
        if isinstance(e, (RuntimeError, KeyError, ValueError)):
            raise CheckpointError(f"{path}: does not fit this model and optimiser ({first_problem(e)}); resume with "
                                  f"the config it was written with (in its {STATE_FILE}) or start a new "
                                  f"run.out_dir") from e
        raise
    return state, main_tensors, process_state
