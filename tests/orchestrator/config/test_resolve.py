"""config.resolve: the run-only values ec2_sweep sets on its runs travel beside the settings, never into them."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config.resolve import settings_of, sweep_child_params
from orchestrator.config.settings import load_settings
from orchestrator.errors import ConfigError

DEPLOYED = {"TRAINER__AWS__DEPLOYMENT": "test"}
PARENT = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, {"mlflow_parent_run_id": "", "promote": True}),
        ({"mlflow_parent_run_id": None, "promote": None}, {"mlflow_parent_run_id": "", "promote": True}),
        ({"mlflow_parent_run_id": "", "promote": "true"}, {"mlflow_parent_run_id": "", "promote": True}),
        ({"mlflow_parent_run_id": PARENT, "promote": "false"}, {"mlflow_parent_run_id": PARENT, "promote": False}),
    ],
)
def test_a_run_of_its_own_promotes_and_a_sweeps_run_does_not(params: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sweep_child_params(params) == expected


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"mlflow_parent_run_id": "not-a-run"},
            r"mlflow_parent_run_id: 'not-a-run' is invalid; expected an MLflow run id",
        ),
        ({"mlflow_parent_run_id": PARENT.upper()}, r"expected an MLflow run id \(32 hex digits\)"),
        ({"promote": "no"}, r"promote: 'no' is invalid; expected either true"),
        ({"promote": False}, r"promote: False is invalid"),
    ],
)
def test_bad_sweep_values_are_refused(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sweep_child_params(params)


def test_the_settings_of_a_config_ignore_the_run_only_values() -> None:
    config = load_settings(env=DEPLOYED).to_dict() | {
        "git_ref": "main",
        "mlflow_parent_run_id": PARENT,
        "promote": False,
    }
    assert settings_of(config) == load_settings(env=DEPLOYED)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"epochs": "0"}, r"epochs"),
        ({"git_ref": "bad..ref"}, r"bad\.\.ref"),
        ({"promote": "no"}, r"promote: 'no' is invalid"),
    ],
)
def test_a_bad_configuration_fails_resolve_config_on_its_first_try(
    monkeypatch: pytest.MonkeyPatch, params: dict[str, Any], match: str
) -> None:
    # AirflowFailException is what skips the task's retries: a ConfigError would be retried like a network error.
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.config.resolve import resolve_config

    for key, value in DEPLOYED.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AirflowFailException, match=match):
        resolve_config(params)
