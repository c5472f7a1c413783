"""Parameter values as a user gives them: a YAML config file, ``--set name=value`` overrides and
the CLI's own options, each typed and checked against the fields of
:class:`~item_embeddings.config.PipelineParams` (an unknown name or a value of the wrong type is
a :class:`~item_embeddings.config.ConfigError` naming the parameter)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import PARAM_FIELDS, ConfigError, PipelineParams


def _coerce(name: str, value: Any) -> Any:
    kind = type(PARAM_FIELDS[name].default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"parameter {name!r} expects true/false, got {value!r}")
    if kind is str and not isinstance(value, str):
        # YAML reads `previous_uri: 123` as a number and `publish_uri:` as null: str() would
        # turn them into "123" and "None", paths nobody meant.
        raise ConfigError(f"parameter {name!r} expects a string, got {value!r} "
                          f"({'null' if value is None else type(value).__name__}); quote it in "
                          "YAML, or write '' for empty")
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"parameter {name!r} expects {kind.__name__}, got {value!r}")
    try:
        if kind is int and isinstance(value, str):
            return int(value.replace("_", ""))
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name!r} expects {kind.__name__}, got {value!r}") from None


def _check_name(name: str) -> None:
    if name not in PARAM_FIELDS:
        import difflib

        close = difflib.get_close_matches(name, PARAM_FIELDS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown parameter {name!r}{hint}; "
                          "run 'item-embeddings params' for the list")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set`` pairs as parameter values, typed and validated.

    >>> parse_overrides(["text_batch_size=64", "image_strategy=STANDARD"])
    {'text_batch_size': 64, 'image_strategy': 'STANDARD'}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set expects name=value, got {pair!r}")
        _check_name(name)
        out[name] = _coerce(name, value)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of parameters: either a flat mapping or one under a ``parameters:`` key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if isinstance(data, Mapping) and "parameters" in data:
        data = data["parameters"] or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of parameter: value")
    out: dict[str, Any] = {}
    for name, value in data.items():
        _check_name(str(name))
        out[str(name)] = _coerce(str(name), value)
    return out


def given_params(config_file: str | None = None, overrides: list[str] | None = None,
                 **explicit: Any) -> dict[str, Any]:
    """The parameters a user set: the config file, then ``--set`` overrides, then explicit
    keyword values (None = not given); typed and validated, later ones winning."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_config_file(config_file))
    values.update(parse_overrides(overrides or []))
    for name, value in explicit.items():
        if value is not None:
            _check_name(name)
            values[name] = _coerce(name, value)
    return values


def resolve_params(config_file: str | None = None, overrides: list[str] | None = None,
                   **explicit: Any) -> PipelineParams:
    """Every parameter: the defaults, updated by :func:`given_params`."""
    return PipelineParams(**given_params(config_file, overrides, **explicit))
