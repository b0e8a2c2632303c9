"""A run that fails before its launch's setup succeeded has no report: its failing step announces it, and counts it in
the run metrics, itself (orchestrator.observe.early_failure), here against the real Pushgateway on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from embedded.services.prometheus import Pushgateway
from orchestrator.observe.early_failure import announce_early_failure
from orchestrator.observe.metrics import PREFIX
from tests.support.monitoring import get_json, runs_without_an_instance

DEPLOYMENT = "early-failure-test"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushgateway]:
    with Pushgateway(tmp_path_factory.mktemp("gateway")) as running:
        yield running


@pytest.fixture(scope="module")
def training_like_dag() -> Any:
    """ec2_training's shape where it matters: ci_gate before the setup plan_launch, whose teardown is report."""
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    with DAG("early_failure_test", schedule=None) as dag:
        ci_gate = EmptyOperator(task_id="ci_gate")
        plan_launch = EmptyOperator(task_id="plan_launch").as_setup()
        launch = EmptyOperator(task_id="launch")
        report = EmptyOperator(task_id="report").as_teardown(setups=plan_launch)
        ci_gate >> plan_launch >> launch >> report
    return dag


def failure_context(dag: Any, task_id: str) -> dict[str, Any]:
    """What Airflow hands an on_failure_callback, as far as announce_early_failure reads it."""
    return {
        "dag": dag,
        "run_id": "manual__2026-12-07T00:00:00+00:00",
        "ti": SimpleNamespace(task_id=task_id, xcom_pull=lambda **_: None),
        "dag_run": SimpleNamespace(start_date=datetime.now(UTC) - timedelta(seconds=42)),
        "exception": RuntimeError("CI failed on abc1234: workflow tests concluded failure"),
    }


def test_a_failure_before_launch_is_counted_in_the_run_metrics(
    training_like_dag: Any,
    gateway: Pushgateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, only the report pushed metrics: runs failed at ci_gate or plan_launch left runs_total at failed=0."""
    # No resolve_config XCom (the context's pulls find none): the deployment's own settings, from the environment.
    monkeypatch.setenv("TRAINER__AWS__DEPLOYMENT", DEPLOYMENT)
    monkeypatch.setenv("TRAINER__METRICS__PUSHGATEWAY_URL", gateway.url)
    with caplog.at_level(logging.INFO, logger="orchestrator.observe"):
        announce_early_failure(failure_context(training_like_dag, "ci_gate"))
        announce_early_failure(failure_context(training_like_dag, "plan_launch"))
    assert "WARNING" not in caplog.text, caplog.text
    assert runs_without_an_instance(gateway.url, DEPLOYMENT) == {"success": 0.0, "failed": 2.0}
    group = next(
        g for g in get_json(f"{gateway.url}/api/v1/metrics")["data"] if g["labels"]["deployment"] == DEPLOYMENT
    )
    outcome = {m["labels"]["outcome"]: float(m["value"]) for m in group[f"{PREFIX}last_run_outcome"]["metrics"]}
    assert outcome == {"success": 0.0, "failed": 1.0}
    assert f"{PREFIX}last_run_cost_usd" not in group  # no instance, no cost

    # A step after the setup: the report will push this run's metrics, so the callback adds nothing.
    announce_early_failure(failure_context(training_like_dag, "launch"))
    assert runs_without_an_instance(gateway.url, DEPLOYMENT) == {"success": 0.0, "failed": 2.0}
