"""Config loading: YAML + dotted overrides, type checks, one-line errors naming the key, step resolution."""
from pathlib import Path

import pytest
import torch
from accelerate.utils import LoggerType

from lm.config import (
    Config,
    ConfigError,
    check_new_run,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_step,
    validate,
)
from lm.models import build_model

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_cover_the_paper_table():
    names = {p.stem for p in CONFIGS}
    for mode in ("plain", "rank1", "late_phase"):
        assert f"enwik8_lstm_{mode}" in names and f"enwik8_lstm_{mode}_swa" in names
        cfg, cfg_swa = load_config(f"configs/enwik8_lstm_{mode}.yaml"), load_config(f"configs/enwik8_lstm_{mode}_swa.yaml")
        assert (cfg.late_phase.mode, cfg.swa.enabled, cfg_swa.late_phase.mode, cfg_swa.swa.enabled) == (mode, False, mode, True)
    assert {"enwik8_transformer_plain", "enwik8_transformer_late_phase", "enwik8_transformer_late_phase_parallel", "smoke"} <= names


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 321\n  lr: 1e-3\nlate_phase:\n  K: 4\n")
    cfg = load_config(path, ["late_phase.K=7", "train.betas=[0.8, 0.9]", "late_phase.lr=null", "swa.enabled=true"])
    assert cfg.train.max_steps == 321
    assert cfg.train.lr == 1e-3  # YAML 1.1 reads `1e-3` as text; a float field accepts it as a number
    assert cfg.late_phase.K == 7
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.late_phase.lr is None and cfg.swa.enabled is True
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_int_and_fraction_steps_stay_distinct():
    cfg = load_config(None, ["late_phase.T0=300", "train.max_steps=1000"])
    assert cfg.late_phase.T0 == 300 and isinstance(cfg.late_phase.T0, int)
    assert resolve_step(cfg.late_phase.T0, 1000) == 300
    assert resolve_step(0.25, 1000) == 250
    assert resolve_step(0.0, 1000) == 0
    assert resolve_step(0.3333, 7) == 2
    with pytest.raises(ConfigError, match="late_phase.T0"):
        resolve_step(1.5, 10, "late_phase.T0")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.nonsense=1"], "train.nonsense"),
        (["nosection.key=1"], "nosection"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["train.max_steps=2.5"], "train.max_steps"),
        (["swa.enabled=1"], "swa.enabled"),
        (["train.betas=[0.9]"], "train.betas"),
        (["late_phase.K=0"], "late_phase.K"),
        (["late_phase.T0=5000", "train.max_steps=5000"], "late_phase.T0"),
        (["late_phase.T0=1.0"], "late_phase.T0"),
        (["swa.enabled=true", "swa.start=900", "train.max_steps=100"], "swa.start"),
        (["late_phase.mode=ensemble"], "late_phase.mode"),
        (["late_phase.schedule=random"], "late_phase.schedule"),
        (["late_phase.gamma=max"], "late_phase.gamma"),
        (["train.batch_size=10", "train.grad_accum=3"], "train.batch_size"),
        (["late_phase.schedule=parallel", "late_phase.K=4", "train.batch_size=6"], "train.batch_size"),
        (["model.family=transformer", "model.n_heads=7"], "model.n_heads"),
        (["model.family=transformer", "model.d_model=30", "model.n_heads=2"], "model.n_heads"),  # odd head size
        (["train.lr=-1"], "train.lr"),
        (["train.warmup_steps=500", "train.max_steps=120"], "train.warmup_steps"),
        (["train.mixed_precision=fp16", "late_phase.mode=rank1"], "train.mixed_precision"),
        (["train.max_steps"], "train.max_steps"),
        (["data.corpus=synthetic", "data.source=corpus.txt"], "data.source"),  # it would be ignored
    ],
)
def test_bad_values_raise_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize("override", ["model.dropout=0.1", "model.layernorm_factors=true"])
def test_a_new_lstm_run_refuses_what_only_the_transformer_reads(override):
    key = override.split("=")[0]
    cfg = load_config(None, [override])  # a saved run with it still loads (to resume or evaluate)
    with pytest.raises(ConfigError) as info:
        check_new_run(cfg)
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)
    check_new_run(load_config(None, ["model.family=transformer", override]))


def test_batch_must_split_over_processes_and_members():
    cfg = load_config(None, ["train.batch_size=12", "late_phase.schedule=parallel", "late_phase.K=3"])
    validate(cfg, num_processes=2)  # 12 = 2 processes x 2 rows x K=3
    validate(cfg, num_processes=4)  # 12 = 4 processes x 1 row x K=3
    with pytest.raises(ConfigError, match="^train.batch_size.*multiple of 9"):
        validate(cfg, num_processes=3)  # 4 rows per process: not a multiple of K
    cfg.late_phase.schedule = "sequential"
    with pytest.raises(ConfigError, match="^train.batch_size.*multiple of 5"):
        validate(cfg, num_processes=5)


def test_plain_mode_ignores_T0_and_may_use_fp16():
    load_config(None, ["late_phase.mode=plain", "late_phase.T0=99999", "train.max_steps=10", "train.mixed_precision=fp16"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(ConfigError, match=r"binary.yaml: not a UTF-8 text file"):
        load_config(binary)


def test_a_key_written_twice_is_refused(tmp_path):
    # YAML keeps the last of two equal keys, so the first would be dead config that looks live.
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: 10\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML at line 4 \(key 'lr' appears twice\)"):
        load_config(path)
    path.write_text("train:\n  lr: 0.1\nswa:\n  every: 3\ntrain:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match="key 'train' appears twice"):
        load_config(path)
    path.write_text("train:\n  lr: 0.1\nswa:\n  lr: 0.2\n")  # the same name in two sections is fine
    with pytest.raises(ConfigError, match="^swa.lr: unknown key"):
        load_config(path)
    # A merge key brings keys the mapping may override; an unhashable key is still just bad YAML.
    path.write_text("train: {<<: {lr: 0.1, max_steps: 7}, lr: 0.2}\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.max_steps) == (0.2, 7)
    path.write_text("train:\n  ? [a, b]\n  : 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_12_booleans_keep_no_a_string(tmp_path):
    # YAML 1.1 reads `no` as False; Accelerate spells "no mixed precision" exactly so.
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  mixed_precision: no\nswa:\n  enabled: true\n")
    cfg = load_config(path, ["late_phase.mode=plain"])
    assert cfg.train.mixed_precision == "no" and cfg.swa.enabled is True
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"^swa\.enabled: expected bool"):
        load_config(None, ["swa.enabled=yes"])


def test_trackers_must_be_known_and_installed(monkeypatch):
    assert load_config(None, ["run.trackers=[]"]).run.trackers == []
    # Accelerate reports installed trackers as LoggerType members.
    monkeypatch.setattr("lm.config.get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    assert load_config(None, ["run.trackers=[tensorboard]"]).run.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"^run\.trackers: 'wandb' is not installed; pip install wandb"):
        load_config(None, ["run.trackers=[wandb]"])
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"^run\.trackers: 'nope' is not an Accelerate tracker"):
        load_config(None, ["run.trackers=[nope]"])
    with pytest.raises(ConfigError, match=r"^run\.trackers: expected list\[str\]"):
        load_config(None, ["run.trackers=tensorboard"])


def test_odd_head_size_is_fine_with_learned_positions():
    # Only rotary positions rotate channel pairs; learned ones take any head size.
    cfg = load_config(None, ["model.family=transformer", "model.d_model=30", "model.n_heads=2",
                             "model.n_layers=1", "model.positions=learned", "train.seq_len=8", "model.max_seq_len=8",
                             "eval.context=8", "eval.stride=4"])
    model = build_model(cfg.model, cfg.late_phase)
    inputs = torch.randint(0, 256, (2, 8))
    logits, _ = model(inputs, None, member=0)
    assert logits.shape == (2, 8, 256) and torch.isfinite(logits).all()


def test_a_step_stays_an_int_and_a_float_key_holds_a_float():
    cfg = load_config(None, ["late_phase.T0=600", "swa.start=0.5", "train.lr=1", "swa.enabled=true"])
    assert (cfg.late_phase.T0, type(cfg.late_phase.T0)) == (600, int)  # a step
    assert (cfg.swa.start, type(cfg.swa.start)) == (0.5, float)  # a fraction
    assert (cfg.train.lr, type(cfg.train.lr)) == (1.0, float)
