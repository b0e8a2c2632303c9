"""The trigger form as this deployment shows it: each knob of run_params.py with the value an empty field stands for,
from the settings (defaults, TRAINER_CONFIG file, TRAINER__* environment) as loaded when the DAG file is parsed.

The settings hold no secret (credentials live in Airflow connections), and what is shown is scrubbed anyway: the
form is visible to everyone who may trigger. Settings that do not load never break the DAG's import: the form then
says that the configured values are unknown, and resolve_config refuses the run, saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from orchestrator.config.run_params import RUN_PARAMS
from orchestrator.config.settings import Settings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.redaction import scrub

log = logging.getLogger(__name__)

UNREAD_NOTE = "(The configured values are not shown: the settings did not load when this DAG was parsed.)"
# A long value (a data URI) stays readable in the form; the run's log shows it whole.
_SHOWN_MAX = 120


def form_params(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Each knob's `Param` keyword arguments but the default (None: the configured value), by name."""
    try:
        settings = load_settings(env=env)
    except (ConfigError, OSError) as exc:
        log.warning("The trigger form shows no configured values: %s", scrub(str(exc)))
        return {param.name: param.form_kwargs(note=UNREAD_NOTE) for param in RUN_PARAMS}
    allowed = settings.aws.allowed_instance_types
    return {
        param.name: param.form_kwargs(
            configured=configured_text(settings, param.setting),
            choices=allowed if param.name == "instance_types" else (),
        )
        for param in RUN_PARAMS
    }


def configured_text(settings: Settings, setting: str) -> str:
    """The value of `setting` ("section.key"; "" for none) as a person would type it: "" when there is none."""
    if not setting:
        return ""
    section, key = setting.split(".")
    value = getattr(getattr(settings, section), key)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, tuple | list):
        text = ", ".join(map(str, value))
    else:
        text = str(value)
    text = scrub(text) or "none"
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."
