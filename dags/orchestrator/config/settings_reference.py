"""docs/configuration.md, generated from the settings model (orchestrator/config/settings.py) and config/defaults.toml.

`make config-reference` (`python -m orchestrator.config.settings_reference > docs/configuration.md`) writes it;
tests/orchestrator/config/test_settings_reference.py fails when the committed file is not current.
"""

from __future__ import annotations

import json
import sys
import tomllib
import typing
from typing import Any

from pydantic.fields import FieldInfo

from orchestrator.config.settings import DEFAULTS_FILE, ENV_PREFIX, Settings

COMMAND = "make config-reference"
_TYPES = {int: "integer", float: "number", bool: "boolean", str: "text", tuple: "list of text", dict: "table of text"}


def reference() -> str:
    defaults = tomllib.loads(DEFAULTS_FILE.read_text())
    lines = [
        "# Configuration reference",
        "",
        "Generated from the settings model (`dags/orchestrator/config/settings.py`) by "
        f"`{COMMAND}`: do not edit by hand.",
        "",
        "Each setting is read, in increasing precedence, from `config/defaults.toml`, the TOML file named by",
        "`TRAINER_CONFIG`, the environment variable shown (lists comma-separated, tables `key=value,key=value`) and,",
        "for the few marked *run param*, the DAG's trigger form. Unknown sections and keys are refused.",
    ]
    for section, section_field in Settings.model_fields.items():
        model = section_field.annotation
        lines += ["", f"## [{section}]", ""]
        if model and model.__doc__:
            lines += [" ".join(model.__doc__.split()), ""]
        lines += [
            "| Key | Type | Default | Valid values | Environment variable | Description |",
            "|---|---|---|---|---|---|",
        ]
        for key, field in getattr(model, "model_fields", {}).items():
            default = defaults.get(section, {}).get(key, field.get_default(call_default_factory=True))
            cells = [f"`{key}`", _type(field), f"`{json.dumps(default)}`", _valid(field)]
            cells += [f"`{ENV_PREFIX}{section.upper()}__{key.upper()}`", field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _type(field: FieldInfo) -> str:
    annotation: Any = field.annotation
    return _TYPES.get(typing.get_origin(annotation) or annotation, str(annotation))


def _valid(field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    bounds = {key: getattr(m, key) for m in field.metadata for key in ("ge", "le") if hasattr(m, key)}
    text = str(extra.get("expected") or (f"from {bounds['ge']} to {bounds['le']}" if bounds else ""))
    return f"{text} (run param `{extra['run_param']}`)" if "run_param" in extra else text


if __name__ == "__main__":
    sys.stdout.write(reference())
