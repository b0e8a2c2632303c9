"""orchestrator.observe.report: the run report's XCom round trip and what an error line may say."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from orchestrator.contracts_steps import Preemption
from orchestrator.observe.cost import BY_TEARDOWN, BilledInstance, Price, end_reason, run_cost
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
    volume_usd=0.0,
    saving_vs_on_demand_usd=0.0,  # on demand: nothing saved
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
    attempts=[
        {
            "instance_id": "i-0123456789abcdef0",
            "instance_type": "g6.xlarge",
            "market": "on-demand",
            "availability_zone": "us-east-1a",
            "launched_at": 1795723262.0,
            "ended_at": 1795723976.0,
            "billed_s": 714.0,
            "usd_per_hour": 0.8048,
            "price_source": "fallback-table",
            "root_volume_gb": 0,
            "usd": 0.1606,
            "ended_by": BY_TEARDOWN,
        }
    ],
)


def _spot(instance_id: str, zone: str, launched_at: float, ended_at: float, ended_by: str) -> BilledInstance:
    price = Price(0.3019, "spot-price-history", f"spot price in {zone}")
    return BilledInstance(
        instance_id,
        launched_at,
        ended_at,
        price,
        instance_type="g6.xlarge",
        market="spot",
        availability_zone=zone,
        ended_by=ended_by,
        root_volume_gb=100,
        volume_usd_per_gb_month=0.08,
        on_demand_usd_per_hour=0.8048,
    )


# A spot run EC2 interrupted once in zone a; it resumed on a relaunch in zone b.
_TAKEN_BACK = Preemption(
    "i-0aaaaaaaaaaaaaaa1", "g6.xlarge", "spot", "us-east-1a", "Server.SpotInstanceTermination", 1795724000.0
)
_ATTEMPTS = [
    _spot(
        "i-0aaaaaaaaaaaaaaa1",
        "us-east-1a",
        1795723262.0,
        1795723990.0,
        end_reason("terminated", None, _TAKEN_BACK.reason, False),
    ),
    _spot("i-0bbbbbbbbbbbbbbb2", "us-east-1b", 1795724030.0, 1795724830.0, BY_TEARDOWN),
]
PREEMPTED = replace(
    REPORT,
    instance_id="i-0aaaaaaaaaaaaaaa1",
    market="spot",
    cost=run_cost(_ATTEMPTS, 1200.0, "us-east-1"),
    preemptions=[_TAKEN_BACK.to_xcom()],
    attempts=[a.to_dict() for a in _ATTEMPTS],
    seconds_lost_to_preemption=30.0 + 95.0,
)


def test_report_round_trips_through_json() -> None:
    data = json.loads(json.dumps(REPORT.to_dict()))
    assert RunReport.from_dict(data) == REPORT
    assert data["cost"]["price_source"] == "fallback-table"
    assert REPORT.succeeded


def test_a_preempted_report_round_trips_and_costs_the_sum_of_its_attempts() -> None:
    data = json.loads(json.dumps(PREEMPTED.to_dict()))
    assert RunReport.from_dict(data) == PREEMPTED
    assert PREEMPTED.cost is not None
    assert PREEMPTED.cost.usd == round(sum(a["usd"] for a in data["attempts"]), 6)
    assert PREEMPTED.cost.billed_s == sum(a["billed_s"] for a in data["attempts"]) == 728.0 + 800.0
    assert [a["availability_zone"] for a in data["attempts"]] == ["us-east-1a", "us-east-1b"]
    assert data["attempts"][0]["ended_by"] == "taken back by EC2 (Server.SpotInstanceTermination)"


def test_an_earlier_report_without_attempts_still_reads() -> None:
    data = REPORT.to_dict()
    for key in ("attempts", "seconds_lost_to_preemption", "preemptions"):
        del data[key]
    for key in ("volume_usd", "saving_vs_on_demand_usd"):
        del data["cost"][key]
    old = RunReport.from_dict(data)
    assert (old.attempts, old.seconds_lost_to_preemption) == ([], 0.0)
    assert old.cost is not None and (old.cost.volume_usd, old.cost.saving_vs_on_demand_usd) == (0.0, None)


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
