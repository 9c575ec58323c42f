"""Typed configuration: YAML presets, dotted ``--set`` overrides and dataclasses.

Every stage keeps its defaults in one dataclass tree. A preset under ``configs/<stage>/``
holds data only; ``key=value`` overrides use the dotted path of the YAML key
(``model.channels=[32,64]``, ``train.lr=2e-4``) and their values are parsed as YAML.
Unknown keys are errors that name the key and the keys that exist.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("global", "patch", "synth", "eval")


class ConfigError(ValueError):
    """An invalid preset, override or value."""


def default_preset_name() -> str:
    """Return ``gpu`` when CUDA is available, else ``cpu-tiny``."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu-tiny"


def preset_path(stage: str, name_or_path: str) -> Path:
    """Resolve a preset name (``cpu-tiny``, ``gpu``) or a YAML path for a stage."""
    if stage not in STAGES:
        raise ConfigError(f"unknown config stage {stage!r}; expected one of {STAGES}")
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {candidate}; pass an existing YAML "
                              f"file or a preset name such as cpu-tiny")
        return candidate
    preset = CONFIG_ROOT / stage / f"{name_or_path}.yaml"
    if not preset.is_file():
        available = sorted(p.stem for p in (CONFIG_ROOT / stage).glob("*.yaml"))
        raise ConfigError(f"no {stage} preset named {name_or_path!r}; available: {available}")
    return preset


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({error}); fix the line it names") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied.

    Values are parsed as YAML, so ``4``, ``2e-4``, ``true`` and ``[32, 64]`` keep their type.
    """
    result = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
        key, raw_value = item.split("=", 1)
        parts = key.strip().split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw_value)
    return result


def _field_type(owner: type, field: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[field.name]


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to ``annotation`` (dataclass, tuple, Optional, scalar)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is float:
        return _finite_float(value, where)
    if annotation in (int, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    return value


def _finite_float(value: Any, where: str) -> float:
    """Convert a YAML number (or a string such as "2e-4") to a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        # PyYAML reads exponents without a dot ("2e-4") as strings.
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError``."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(value, _field_type(cls, names[name]), path)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        validate()
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    """Return a plain mapping (lists for tuples) suitable for YAML and JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(instance))


def load_stage_config(cls: type, stage: str, preset: str | None,
                      overrides: typing.Iterable[str] = ()) -> tuple[Any, str]:
    """Load a stage's dataclass from a preset (or its default) plus overrides.

    Returns the config and the preset name or path that was used.
    """
    chosen = preset or default_preset_name()
    data = load_yaml(preset_path(stage, chosen))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data), chosen
