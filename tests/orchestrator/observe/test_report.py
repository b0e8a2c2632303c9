"""orchestrator.observe.report: the run report's XCom round trip and what an error line may say."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from orchestrator.observe.report import MAX_ERROR_CHARS, Cost, RunReport, error_line
from orchestrator.redaction import scrub

COST = Cost(
    usd=0.1606,
    billed_s=714.0,
    training_s=600.0,
    non_training_s=114.0,
    training_share=0.8403,
    usd_per_hour=0.8048,
    price_source="fallback-table",
    region="us-east-1",
)
REPORT = RunReport(
    dag_id="ec2_training",
    run_id="manual__2026-11-26T20:00:00+00:00",
    deployment="prod",
    outcome="success",
    failed_step=None,
    error=None,
    git_sha="a" * 40,
    instance_id="i-0123456789abcdef0",
    instance_type="g6.xlarge",
    market="on-demand",
    links={"airflow": "http://airflow/dags/ec2_training/runs/x", "mlflow": "http://mlflow/#/experiments/1/runs/r"},
    metric_name="test_accuracy",
    metric_value=0.93,
    promoted=True,
    promotion_reason="0.9300 passes the threshold 0.9000; there is no champion yet",
    duration_s=900.5,
    phases_s={"ci_wait": 1.0, "launch": 20.0, "boot": 30.0, "bootstrap.gpu": 2.0, "training": 600.0},
    images_per_s=1234.5,
    test_metrics={"test_accuracy": 0.93, "test_loss": 0.2},
    cost=COST,
    mlflow_run_id="r" * 32,
)


def test_report_round_trips_through_json() -> None:
    data = json.loads(json.dumps(REPORT.to_dict()))
    assert RunReport.from_dict(data) == REPORT
    assert data["cost"]["price_source"] == "fallback-table"
    assert REPORT.succeeded


def test_report_without_cost_round_trips() -> None:
    failed = replace(REPORT, outcome="failed", failed_step="wait_ready", error="boom", cost=None, promoted=None)
    assert RunReport.from_dict(failed.to_dict()) == failed
    assert not failed.succeeded


def test_from_dict_names_missing_fields_and_ignores_unknown_ones() -> None:
    data = REPORT.to_dict()
    del data["outcome"], data["mlflow_run_id"]
    with pytest.raises(KeyError, match=r"RunReport: missing fields \['outcome'\]"):
        RunReport.from_dict(data)
    data = {**REPORT.to_dict(), "added_later": 1}
    assert RunReport.from_dict(data) == REPORT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:hunter2@mlflow.example.com/api failed", "https://***@mlflow.example.com/api failed"),
        ("posting to https://hooks.slack.com/services/T0/B0/XYZ failed", "posting to *** failed"),
        ("bad credentials ghp_" + "a" * 36, "bad credentials ***"),
        ("key AKIAABCDEFGHIJKLMNOP refused", "key *** refused"),
        ("Authorization: Bearer abc.def", "Authorization: ***"),
        ("password=s3cret rejected", "password=*** rejected"),
        ("plain message", "plain message"),
    ],
)
def test_scrub(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_error_line_is_the_first_line_scrubbed_and_bounded() -> None:
    assert error_line(None) is None
    assert error_line("\n  first line  \nsecond") == "first line"
    assert error_line(ValueError("bad value\ntraceback")) == "ValueError: bad value"
    assert error_line(TimeoutError()) == "TimeoutError"
    assert error_line(RuntimeError("token: abc123")) == "RuntimeError: token: ***"
    long = error_line("x" * 1000)
    assert long is not None and len(long) == MAX_ERROR_CHARS and long.endswith("…")


def test_airflow_wrappers_are_left_out() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    assert error_line(AirflowFailException("aws.region: 'x' is invalid")) == "aws.region: 'x' is invalid"
