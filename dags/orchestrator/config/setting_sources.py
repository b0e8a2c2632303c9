"""The sources of the settings (orchestrator/settings.py), highest first: a run's params, TRAINER__SECTION__KEY
variables, the file named by TRAINER_CONFIG, config/defaults.toml.

pydantic-settings reads each; here each also refuses a section or key that no setting has, naming where it came from
and the closest name (the env source would ignore a misspelt variable, leaving the default in force, and
extra="forbid" alone could not say which source held the key), and trims the blanks that env files and forms carry.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource
from pydantic_settings import TomlConfigSettingsSource as _TomlSource
from pydantic_settings.sources.utils import parse_env_vars

from orchestrator.config.setting_types import did_you_mean
from orchestrator.errors import ConfigError

DEFAULTS_FILE = Path(__file__).resolve().parents[3] / "config" / "defaults.toml"
CONFIG_FILE_ENV = "TRAINER_CONFIG"
ENV_PREFIX = "TRAINER__"


def layered(
    cls: type[BaseSettings], known: type[BaseModel], env: Mapping[str, str] | None, params: dict[str, dict[str, Any]]
) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources of `cls`, highest first; every name checked against `known` (all settings, whatever `cls` reads)."""
    env = os.environ if env is None else env
    extra_file = env.get(CONFIG_FILE_ENV, "").strip()
    files = [_Toml(cls, known, Path(extra_file), CONFIG_FILE_ENV)] if extra_file else []
    defaults = _Toml(cls, known, DEFAULTS_FILE, str(DEFAULTS_FILE))
    return InitSettingsSource(cls, _stripped(params)), _Env(cls, known, env), *files, defaults


def _check_names(known: type[BaseModel], data: Mapping[str, Any], source: str) -> None:
    sections = known.model_fields
    for section, values in data.items():
        if section not in sections or not isinstance(values, Mapping):
            hint = did_you_mean(section, sections)
            raise ConfigError(f"{source}: unknown configuration section {section!r}; {hint}known: {sorted(sections)}")
        keys = getattr(sections[section].annotation, "model_fields", {})
        for key in sorted(set(values) - set(keys)):
            hint = did_you_mean(key, keys).rstrip()
            known_keys = f"known in [{section}]: {sorted(keys)}{'; ' if hint else ''}{hint}"
            raise ConfigError(f"{source}: unknown setting {section}.{key}; {known_keys}")


def _stripped(data: dict[str, Any]) -> dict[str, Any]:
    """Text without surrounding blanks, list items too; a table's values (extra_params) as given."""

    def strip(value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [strip(v) for v in value]
        return value.strip() if isinstance(value, str) else value

    return {name: {k: strip(v) for k, v in values.items()} for name, values in data.items()}


class _Toml(_TomlSource):
    def __init__(self, cls: type[BaseSettings], known: type[BaseModel], path: Path, source: str) -> None:
        if not path.is_file():
            raise ConfigError(f"{CONFIG_FILE_ENV}: configuration file {path} does not exist")
        self.known, self.source = known, source
        try:
            super().__init__(cls, toml_file=path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc

    def __call__(self) -> dict[str, Any]:
        _check_names(self.known, self.toml_data, self.source)
        return _stripped(super().__call__())


class _Env(EnvSettingsSource):
    """The TRAINER__SECTION__KEY variables of the given environment (tests and the DAG pass their own)."""

    def __init__(self, cls: type[BaseSettings], known: type[BaseModel], env: Mapping[str, str]) -> None:
        self.known, self.given = known, env
        super().__init__(cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars({k: v for k, v in self.given.items() if k.startswith(ENV_PREFIX)})  # upper case only

    def __call__(self) -> dict[str, Any]:
        names: dict[str, dict[str, None]] = {}
        for name in (name for name in self.given if name.startswith(ENV_PREFIX)):
            parts = name[len(ENV_PREFIX) :].lower().split("__")
            if len(parts) != 2:
                raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. TRAINER__AWS__REGION")
            names.setdefault(parts[0], {})[parts[1]] = None
        _check_names(self.known, names, "environment")
        return _stripped(super().__call__())
