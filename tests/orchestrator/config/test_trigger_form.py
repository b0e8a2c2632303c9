"""config.trigger_form: each empty field shows the configured value it stands for, the deployment's allowed instance
types are the form's options and the only ones a run may name, and settings that do not load never break the form."""

from __future__ import annotations

import re
from typing import Any

import pytest

from orchestrator.config.settings import load_settings
from orchestrator.config.trigger_form import UNREAD_NOTE, form_params
from orchestrator.errors import ConfigError

DEPLOYED = {"TRAINER__AWS__DEPLOYMENT": "test"}
ALLOWED = {**DEPLOYED, "TRAINER__AWS__ALLOWED_INSTANCE_TYPES": "g6.xlarge,g5.xlarge,g4dn.xlarge"}


def test_an_empty_field_says_which_value_it_stands_for() -> None:
    env = {**DEPLOYED, "TRAINER__TRAINING__EPOCHS": "7", "TRAINER__AWS__INSTANCE_TYPES": "g6.xlarge,g5.xlarge"}
    form = form_params(env)
    assert form["epochs"]["description"].endswith("Empty: the configured value, 7 (training.epochs).")
    assert (
        "Empty: the configured value, g6.xlarge, g5.xlarge (aws.instance_types)."
        in form["instance_types"]["description"]
    )
    assert "Empty: the configured value, false (aws.spot)." in form["spot"]["description"]
    assert form["spot"]["values_display"][None] == "configured, false (aws.spot)"
    ami = form["ami_id"]["description"]
    assert ami.endswith(
        "Empty: the configured value, none (aws.ami_id), else the newest image of aws.ami_ssm_parameter."
    )
    # A knob that stands for no setting says what empty means, as before.
    assert form["promote"]["description"].endswith("Empty: true, evaluate decides.")


def test_a_shown_value_never_carries_credentials() -> None:
    env = {**DEPLOYED, "TRAINER__TRAINING__DATA_URI": "file://someone:hunter2@host/data/"}
    assert load_settings(env=env).training.data_uri == "file://someone:hunter2@host/data/"  # the settings take it
    description = form_params(env)["data_uri"]["description"]
    assert "hunter2" not in description and "someone" not in description
    assert "Empty: the configured value, file://***@host/data/ (training.data_uri)." in description


@pytest.mark.parametrize(
    "env",
    [
        {},  # no aws.deployment: a fresh checkout
        {**DEPLOYED, "TRAINER__TRAINING__EPOCHS": "many"},
        {**DEPLOYED, "TRAINER_CONFIG": "/nonexistent/trainer.toml"},
    ],
)
def test_settings_that_do_not_load_leave_the_form_saying_so(env: dict[str, str]) -> None:
    form = form_params(env)
    assert form["epochs"]["description"].endswith(f"Empty: the configured value (training.epochs). {UNREAD_NOTE}")
    assert form["promote"]["description"].endswith("Empty: true, evaluate decides.")  # no setting: nothing unknown
    assert "examples" not in form["instance_types"]


def test_without_an_allow_list_any_well_formed_type_is_typed_one_per_line() -> None:
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    kwargs = form_params(DEPLOYED)["instance_types"]
    assert "examples" not in kwargs and "enum" not in kwargs["items"]  # Airflow's one-per-line text field
    assert Param(None, **kwargs).resolve(["p4d.24xlarge"]) == ["p4d.24xlarge"]
    with pytest.raises(ParamValidationError, match=r"'G6 XL' does not match"):
        Param(None, **kwargs).resolve(["G6 XL"])


def test_the_allowed_types_are_the_forms_options_and_another_is_refused_naming_them() -> None:
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    kwargs: dict[str, Any] = form_params(ALLOWED)["instance_types"]
    # An array Param with `examples` is Airflow's multi-select of exactly those values (FieldMultiSelect.tsx).
    assert kwargs["examples"] == ["g6.xlarge", "g5.xlarge", "g4dn.xlarge"]
    assert kwargs["type"] == ["null", "array"]
    assert Param(None, **kwargs).resolve(["g5.xlarge", "g6.xlarge"]) == ["g5.xlarge", "g6.xlarge"]
    for typed in ("g6.xlarg", "G6 XL"):  # misspelt, or no type name at all: the same plain refusal
        refusal = re.escape(f"{typed!r} is not one of ['g6.xlarge', 'g5.xlarge', 'g4dn.xlarge']")
        with pytest.raises(ParamValidationError, match=refusal):
            Param(None, **kwargs).resolve([typed])


def test_a_run_naming_a_type_the_deployment_does_not_allow_is_refused_by_its_first_task() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.config.resolve import resolve_config

    expected = (
        r"^aws\.instance_types\[1\]: 'p4d\.24xlarge' is invalid; expected one of the types this deployment allows, "
        r"g6\.xlarge, g5\.xlarge, g4dn\.xlarge \(aws\.allowed_instance_types\)$"
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ALLOWED.items():
            patch.setenv(name, value)
        with pytest.raises(AirflowFailException, match=expected):  # no retry: a sentence for the run's log
            resolve_config({"instance_types": ["g6.xlarge", "p4d.24xlarge"]})
        # The deployment's own list is held to it too.
        patch.setenv("TRAINER__AWS__INSTANCE_TYPES", "p3.2xlarge")
        with pytest.raises(ConfigError, match=r"^aws\.instance_types\[0\]: 'p3\.2xlarge' is invalid; expected one"):
            load_settings()


def test_an_allowed_type_must_be_a_type_name() -> None:
    with pytest.raises(ConfigError, match=r"^aws\.allowed_instance_types\[0\]: 'G6 XL' is invalid; expected EC2 type"):
        load_settings(env={**DEPLOYED, "TRAINER__AWS__ALLOWED_INSTANCE_TYPES": "G6 XL"})
