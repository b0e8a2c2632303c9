"""orchestrator.tracking.runs' run names: what tells a run apart first, the short commit last (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator.contracts import SET_RUN_ID
from orchestrator.datasets.retrain import base_run_id
from orchestrator.tracking.runs import run_name, training_run_lead

SHA = "a0ca4de" + "0" * 33
AT = datetime(2026, 11, 26, 12, 30, 59, tzinfo=UTC)


def test_a_sweeps_set_leads_with_its_number_and_the_values_it_sets() -> None:
    run_id = SET_RUN_ID.format(run_id="manual__2026-11-26T12:00:00+00:00", number=1)
    lead = training_run_lead(run_id, "manual", AT, {"learning_rate": 0.001})
    assert run_name(lead, SHA) == "set 1 lr=0.001 · a0ca4de"
    twelve = SET_RUN_ID.format(run_id="s", number=12)
    assert training_run_lead(twelve, "manual", AT, {"batch_size": 256, "epochs": 3}) == "set 12 batch=256 epochs=3"
    assert training_run_lead(twelve, "manual", AT, {}) == "set 12"  # a set of the configured values


def test_a_long_value_is_cut_and_a_uri_shows_its_last_part() -> None:
    run_id = SET_RUN_ID.format(run_id="s", number=2)
    swept = {"data_uri": "s3://bucket/datasets/hurricane/versions/v2026-11-26/", "model": "a-very-long-model-name"}
    assert training_run_lead(run_id, "manual", AT, swept) == "set 2 data=v2026-11-26 model=a-very-long…"


@pytest.mark.parametrize(
    ("run_id", "run_type", "lead"),
    [
        ("manual__2026-11-26T12:30:59+00:00", "manual", "12:30 manual"),  # the form, the REST API, the CLI
        ("scheduled__2026-11-26T12:30:00+00:00", "scheduled", "12:30 scheduled"),
        ("asset_triggered__2026-11-26T12:30:59", "asset_triggered", "12:30 new data"),
        (base_run_id("b" * 40, "c" * 64), "manual", "12:30 retrain"),  # ec2_retrain's run
        ("manual__settings", "operator_triggered", "12:30 operator_triggered"),
    ],
)
def test_any_other_run_leads_with_when_and_how_it_was_triggered(run_id: str, run_type: str, lead: str) -> None:
    assert training_run_lead(run_id, run_type, AT, {"epochs": 3}) == lead


def test_the_trigger_time_is_utc() -> None:
    paris = AT.astimezone(timezone(timedelta(hours=1)))
    assert training_run_lead("manual__x", "manual", paris, {}) == "12:30 manual"


def test_names_stay_short_for_mlflows_runs_table() -> None:
    # A set that varies every knob, each at its longest: a sweep varies one or two.
    longest = training_run_lead(
        SET_RUN_ID.format(run_id="s", number=16),
        "manual",
        AT,
        {
            "data_uri": "s3://b/" + "v" * 40,
            "model": "default",
            "epochs": 1000,
            "batch_size": 4096,
            "learning_rate": 3e-4,
        },
    )
    assert len(run_name(longest, SHA)) <= 90
