"""docs/configuration.md is the reference generated from the settings model, and current."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config.settings import ENV_PREFIX, Settings
from orchestrator.config.settings_reference import COMMAND, reference

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_the_configuration_reference_is_current() -> None:
    assert DOC.read_text() == reference(), f"docs/configuration.md is stale: run `{COMMAND}` and commit it"


def test_the_reference_names_every_setting_with_its_variable_and_description() -> None:
    text = reference()
    for section, section_field in Settings.model_fields.items():
        assert f"## [{section}]" in text
        for key, field in section_field.annotation.model_fields.items():  # type: ignore[union-attr]
            assert field.description, f"{section}.{key} has no description"
            assert f"| `{key}` |" in text and f"`{ENV_PREFIX}{section.upper()}__{key.upper()}`" in text
