"""orchestrator.observe.publish: the cost lands on the training's MLflow run; a publisher's failure changes nothing."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from embedded.services.mlflow_server import MlflowServer
from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import PRICE_SOURCE_TAG, USD_PER_HOUR_TAG
from orchestrator.observe.publish import cost_metrics, publish
from tests.orchestrator.observe.test_report import PREEMPTED, REPORT
from tests.support.mlflow_servers import FaultProxy


def _settings(tracking_uri: str) -> Settings:
    s = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"})
    return s.model_copy(
        update={"mlflow": s.mlflow.model_copy(update={"tracking_uri": tracking_uri, "conn_id": "no_such_connection"})}
    )


def _new_run(tracking_uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(f"cost-{uuid.uuid4().hex[:8]}")
    return str(client.create_run(experiment_id).info.run_id)


def test_the_cost_is_logged_on_the_training_run(mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    run_id = _new_run(mlflow_server.url)
    assert publish(_settings(mlflow_server.url), replace(REPORT, mlflow_run_id=run_id)) == ["mlflow"]
    data = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).data
    assert data.metrics == {
        "cost_usd": pytest.approx(0.1606),
        "billed_seconds": 714.0,
        "non_training_seconds": 114.0,
        "training_share": pytest.approx(0.8403),
        "attempts": 1.0,
        "preemptions": 0.0,
        "seconds_lost_to_preemption": 0.0,
        "saving_vs_on_demand": 0.0,
    }
    assert (data.tags[PRICE_SOURCE_TAG], data.tags[USD_PER_HOUR_TAG]) == ("fallback-table", "0.8048")
    # A second report (a retried task) overwrites rather than fails.
    assert publish(_settings(mlflow_server.url), replace(REPORT, mlflow_run_id=run_id)) == ["mlflow"]


def test_a_preempted_run_counts_its_attempts_the_seconds_lost_and_the_saving() -> None:
    assert PREEMPTED.cost is not None
    metrics = cost_metrics(PREEMPTED, PREEMPTED.cost)
    assert metrics["cost_usd"] == PREEMPTED.cost.usd
    assert (metrics["attempts"], metrics["preemptions"], metrics["seconds_lost_to_preemption"]) == (2.0, 1.0, 125.0)
    # 728 + 800 spot seconds at 0.8048 on demand instead of 0.3019.
    assert metrics["saving_vs_on_demand"] == pytest.approx(1528 / 3600 * (0.8048 - 0.3019), abs=1e-6)
    unknown = replace(PREEMPTED.cost, saving_vs_on_demand_usd=None)
    assert "saving_vs_on_demand" not in cost_metrics(PREEMPTED, unknown)


def test_nothing_to_log_without_an_instance_or_a_run(mlflow_server: MlflowServer) -> None:
    assert publish(_settings(mlflow_server.url), replace(REPORT, cost=None)) == ["mlflow"]
    assert publish(_settings(mlflow_server.url), replace(REPORT, mlflow_run_id=None)) == ["mlflow"]


def test_an_mlflow_outage_is_a_warning(
    mlflow_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # 403: MLflow's client does not retry it.
    mlflow_proxy.fault = lambda method, path: (403, "Permission denied") if "/runs/" in path else None
    assert publish(_settings(mlflow_proxy.url), replace(REPORT, mlflow_run_id="f" * 32)) == []
    assert "not published to mlflow: TrackingServerError: MLflow failed while logging the cost" in caplog.text
