"""Checkpoint files: atomic writes, discovery that ignores torn writes, pruning, restore."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from lm.checkpoint import (
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def setup():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator, model, optimizer
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_once(model, optimizer):
    model(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def save(accelerator, out, step, keep=2, tag=None):
    return save_checkpoint(accelerator, out, step, {"tag": tag or step}, {"main": torch.tensor([float(step)])},
                           {"data": {"window": step}}, keep)


def test_save_load_round_trip_restores_model_optimizer_and_rng(setup, tmp_path):
    accelerator, model, optimizer = setup
    train_once(model, optimizer)
    path = save(accelerator, tmp_path, 7)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draw = torch.rand(3)
    train_once(model, optimizer)  # move away from the saved state, and advance the RNG
    state, main, process = load_checkpoint(accelerator, path)
    assert state["step"] == 7 and state["tag"] == 7 and state["num_processes"] == 1
    assert torch.equal(main["main"], torch.tensor([7.0])) and process == {"data": {"window": 7}}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert torch.equal(torch.rand(3), expected_draw)
    # The optimiser state came back too: the next update equals a replay from the saved state.
    torch.manual_seed(0)
    train_once(model, optimizer)
    after_replay = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(accelerator, path)
    torch.manual_seed(0)
    train_once(model, optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_replay[key])


def test_keeps_the_newest_and_ignores_torn_writes(setup, tmp_path):
    accelerator, model, optimizer = setup
    for step in (10, 20, 30):
        save(accelerator, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000020", "step_0000030"]

    root = tmp_path / "checkpoints"
    (root / ".tmp-step_0000040").mkdir()  # a process killed while writing step 40
    (root / ".tmp-step_0000040" / "model.safetensors").write_bytes(b"partial")
    incomplete = root / "step_0000050"  # no trainer_state.json: never completed
    incomplete.mkdir()
    (root / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000030"

    save(accelerator, tmp_path, 60, keep=2)
    assert not (root / ".tmp-step_0000040").exists()  # the next save clears torn writes
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000030", "step_0000060"]


def test_resaving_a_step_replaces_it(setup, tmp_path):
    accelerator, model, optimizer = setup
    save(accelerator, tmp_path, 5, tag="first")
    path = save(accelerator, tmp_path, 5, tag="second")
    assert json.loads((path / STATE_FILE).read_text())["tag"] == "second"
    assert len(list_checkpoints(tmp_path)) == 1


def test_refuses_incomplete_or_other_world_size(setup, tmp_path):
    accelerator, model, optimizer = setup
    path = save(accelerator, tmp_path, 3)
    state = json.loads((path / STATE_FILE).read_text())
    (path / STATE_FILE).write_text(json.dumps({**state, "num_processes": 4}))
    with pytest.raises(CheckpointError, match="4 process"):
        load_checkpoint(accelerator, path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(accelerator, tmp_path / "checkpoints" / "missing")
    assert latest_checkpoint(tmp_path / "elsewhere") is None

