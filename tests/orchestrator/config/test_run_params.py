"""config.run_params: the form each knob becomes and the schema check the settings and sweeps share (pure)."""

from __future__ import annotations

import math

import pytest

from orchestrator.config.run_params import BY_NAME, JOB_PARAMS, schema_violation


def test_a_number_knob_is_a_nullable_form_field_with_its_range_and_empty_meaning() -> None:
    assert BY_NAME["epochs"].form_kwargs() == {
        "title": "Epochs",
        "description": "Passes over the training set. A whole number from 1 to 10000. "
        "Empty: the configured value (training.epochs).",
        "section": "Training",
        "type": ["null", "integer"],
        "allOf": [{"minimum": 1, "maximum": 10_000}],
    }


@pytest.mark.parametrize(
    ("name", "value", "refusal"),
    [
        ("epochs", 0, "0 is less than the minimum of 1"),
        ("learning_rate", 100, "100 is greater than the maximum of 1"),
        ("learning_rate", 0, "less than or equal to"),
    ],
)
def test_an_out_of_range_number_is_refused_not_clamped(name: str, value: float, refusal: str) -> None:
    """Airflow's number field clamps to the schema's own minimum/maximum on blur, silently: the form must not see
    them (docs/decisions/0112), while Param validation (the trigger's, on the api-server) still refuses the value."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    schema = BY_NAME[name].form_schema()
    assert not {"minimum", "maximum"} & set(schema), schema
    with pytest.raises(ParamValidationError, match=refusal):
        Param(None, **schema).resolve(value)
    assert Param(None, **schema).resolve(None) is None


def test_a_boolean_knob_is_a_drop_down_of_texts_naming_the_setting_it_stands_for() -> None:
    kwargs = BY_NAME["spot"].form_kwargs()
    assert kwargs["type"] == ["null", "string"] and kwargs["enum"] == [None, "true", "false"]
    assert kwargs["values_display"] == {None: "configured (aws.spot)", "true": "spot first", "false": "on-demand only"}
    assert "Empty: the configured value (aws.spot)." in kwargs["description"]


def test_a_knob_without_a_setting_says_what_empty_means() -> None:
    promote = BY_NAME["promote"]
    assert promote.empty_text() == "true, evaluate decides"
    assert promote.values_display() == {
        None: "true, evaluate decides",
        "true": "true: evaluate decides",
        "false": "false: left to the sweep",
    }
    assert promote.form_description().endswith(
        "Either true (the run's own gate decides) or false (the verdict is only logged). Empty: true, evaluate decides."
    )


def test_a_choice_knob_offers_empty_first() -> None:
    schema = BY_NAME["model"].form_schema()
    assert schema == {"type": ["null", "string"], "enum": [None, "default", "seed"]}
    assert BY_NAME["model"].schema == {"type": "string", "enum": ["default", "seed"]}  # the table is left as it is
    assert BY_NAME["epochs"].values_display() is None


def test_the_job_params_are_the_jobs_knobs_in_order() -> None:
    assert JOB_PARAMS == ("data_uri", "model", "epochs", "batch_size", "learning_rate")


@pytest.mark.parametrize(
    ("value", "schema", "expected"),
    [
        (0.5, {"type": "number", "maximum": 1}, None),
        (2, {"type": "number", "maximum": 1}, ("", 2)),
        (["a", 3], {"type": "array", "items": {"type": "string"}}, ("[1]", 3)),
        ({"a": [1, "x"]}, {"type": "object", "properties": {"a": {"items": {"type": "integer"}}}}, ("[a][1]", "x")),
        (math.inf, {"type": "number"}, ("", math.inf)),
        (-math.inf, {"type": "number"}, ("", -math.inf)),
    ],
)
def test_schema_violation_names_the_part_at_fault(value: object, schema: dict[str, object], expected: object) -> None:
    assert schema_violation(value, schema) == expected


def test_nan_is_refused_though_it_passes_every_bound() -> None:
    where, part = schema_violation(math.nan, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}) or ("-", 0.0)
    assert where == "" and math.isnan(part)
