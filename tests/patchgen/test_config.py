"""Presets, dotted overrides and dataclass conversion."""

import pytest

from patchgen.config import ConfigError, apply_overrides, from_dict, load_stage_config
from patchgen.global_model import GlobalConfig
from patchgen.trainer import TrainConfig


def test_exponent_without_dot_is_float():
    data = apply_overrides({}, ["lr=2e-4"])
    assert from_dict(TrainConfig, data).lr == pytest.approx(2e-4)


def test_text_for_float_is_rejected():
    with pytest.raises(ConfigError, match="lr"):
        from_dict(TrainConfig, {"lr": "fast"})


def test_unknown_key_names_key():
    with pytest.raises(ConfigError, match="model.widths"):
        load_stage_config(GlobalConfig, "global", "cpu-tiny", ["model.widths=[8]"])


def test_override_reaches_nested_section():
    config, preset = load_stage_config(GlobalConfig, "global", "cpu-tiny",
                                       ["train.batch_size=4", "model.channels=[16,32]"])
    assert preset == "cpu-tiny"
    assert config.train.batch_size == 4
    assert tuple(config.model.channels) == (16, 32)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match="cpu-tiny"):
        load_stage_config(GlobalConfig, "global", "huge", [])


def test_patch_run_rejected_as_global(tmp_path):
    import json

    from patchgen.inference import GLOBAL_KINDS, _read_snapshot_info

    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "femurgen.json").write_text(json.dumps({"kind": "diffusion"}))
    with pytest.raises(ValueError, match="order of --global and --patch"):
        _read_snapshot_info(model_dir, GLOBAL_KINDS)


@pytest.mark.parametrize("value", [None, [1, 2], True, "nan", ".inf"])
def test_float_field_rejects_non_number(value):
    with pytest.raises(ConfigError, match="train.lr: expected a"):
        from_dict(TrainConfig, {"lr": value}, "train")


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_stage_config(GlobalConfig, "global", str(path), ())
