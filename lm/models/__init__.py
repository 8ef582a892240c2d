"""Model families (LSTM, Transformer) in three late-phase modes, plus export/load of plain models.

Forward of every model: `model(inputs (B, T) int64, state=None, member=0) -> (logits, new_state)`
  member=k           member k's weights on the whole batch -> (B, T, V)   (plain models: 0)
  member="parallel"  batch row b through member b % K      -> (B, T, V)   (B a multiple of K)
  member="all"       every member on the whole batch       -> (K, B, T, V) (plain: (1, B, T, V))
state: the LSTM's (h, c) (for "all": all members' states, opaque); the Transformer returns None.

Modes (LatePhaseConfig.mode): plain (no factors), rank1 (K=1 factors trained throughout),
late_phase (K member rows stored from the start; row 0 is used until spawn_members at T0).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lm.config import Config, ConfigError, LatePhaseConfig, ModelConfig, config_from_dict, config_to_dict
from lm.files import atomic_path, write_text_atomically
from lm.late_phase import Rank1Factors, average_members, is_plain
from lm.models.lstm import LSTMLM
from lm.models.transformer import TransformerLM

FAMILIES = {"lstm": LSTMLM, "transformer": TransformerLM}
MODES = ("plain", "rank1", "late_phase")


def stored_members(lp_cfg: LatePhaseConfig) -> int:
    """Member rows a model of this mode stores: 0 (plain), 1 (rank1) or K (late_phase)."""
    if lp_cfg.mode not in MODES:
        raise ValueError(f"late_phase.mode must be one of {', '.join(MODES)}, got {lp_cfg.mode!r}")
    if lp_cfg.mode == "late_phase" and lp_cfg.K < 1:
        raise ValueError(f"late_phase.K must be >= 1, got {lp_cfg.K}")
    return {"plain": 0, "rank1": 1, "late_phase": lp_cfg.K}[lp_cfg.mode]


def build_model(model_cfg: ModelConfig, lp_cfg: LatePhaseConfig) -> nn.Module:
    """A model of `model_cfg.family` in `lp_cfg.mode`.

    Initialisation draws the same random numbers in every mode, and factors start at r = s = 1
    with every member's bias equal to the plain bias, so with one seed a fresh rank1 or
    late_phase model computes exactly what the fresh plain model computes.
    """
    if model_cfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}, got {model_cfg.family!r}")
    model = FAMILIES[model_cfg.family](model_cfg, stored_members(lp_cfg))
    for module in model.modules():
        if isinstance(module, Rank1Factors):
            module.linear_members = model_cfg.linear_members
    return model


def plain_like(model: nn.Module) -> nn.Module:
    """A fresh plain model of the same architecture (and device) as `model`.

    Leaves the global random state as it was: evaluation and SWA build these during training,
    and dropout must draw the same numbers whatever the evaluation schedule."""
    model = getattr(model, "module", model)
    with torch.random.fork_rng(devices=[]):  # built on the CPU: only the CPU generator is drawn from
        plain = build_model(model.cfg, LatePhaseConfig(mode="plain"))
    reference = next(model.parameters())
    return plain.to(device=reference.device, dtype=reference.dtype)


def detach_state(state: Any) -> Any:
    """Cut the graph between truncated-BPTT windows (any nesting of tensors; None passes)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def export(model: nn.Module, cfg: Config, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/config.json` + `out_dir/model.safetensors` of a plain model, atomically per file.

    A model with members is member-averaged first (average_members). config.json is the run
    config with late_phase.mode = "plain", so load_exported needs no late-phase code.
    """
    model = getattr(model, "module", model)
    if not is_plain(model):
        model = average_members(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.late_phase.mode = "plain"
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    text = json.dumps(config_to_dict(plain_cfg), indent=2)
    write_text_atomically(out / "config.json", text)
    return out


class ExportError(ValueError):
    """An exported model directory that cannot be loaded."""


def first_problem(error: BaseException, limit: int = 200) -> str:
    """The line of a loader's error that says most. torch's load_state_dict heads its list of
    problems ("size mismatch for ...", "Missing key(s) ...") with "Error(s) in loading state_dict
    for M:"; a "Missing key(s)" line lists every key, so it is cut at `limit` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    line = (lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]).rstrip(".")
    return line if len(line) <= limit else line[:limit] + "..."


def load_exported(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a plain model from `config.json` + `model.safetensors` (written by `export`)."""
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} not found: pass a directory written by lm.models.export (e.g. RUN/final/averaged)")
    try:
        cfg = config_from_dict(json.loads(config_path.read_text()))
    except (ValueError, ConfigError) as err:
        raise ExportError(f"{config_path} is not a valid run config ({err}); re-export the model") from None
    model = build_model(cfg.model, LatePhaseConfig(mode="plain"))
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as err:
        raise ExportError(f"{weights_path} is not a readable safetensors file ({err}); re-export the model") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ExportError(f"{weights_path} does not match {config_path}: {first_problem(err)}") from None
    return model.to(device)
