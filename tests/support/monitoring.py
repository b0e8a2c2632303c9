"""Fixtures and test data of the run-metrics tests (registered in conftest): run reports per the report contract,
settings that point at a gateway, and Debian's Pushgateway and Prometheus on loopback, one pair per test module."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embedded.services.prometheus import Prometheus, Pushgateway
from orchestrator.config.settings import Settings, load_settings
from orchestrator.observe.metrics import NONE, PREFIX, grouping_key, totals_of
from orchestrator.observe.report import Cost, RunReport

RUN_ID = "manual__2026-11-26T20:00:00+00:00"
INSTANCE_ID = "i-0123456789abcdef0"
SHA = "a" * 40
GATEWAY_LOGIN = ("trainer", "right-password-31")


def success_report(**changes: Any) -> RunReport:
    report = RunReport(
        dag_id="ec2_training",
        run_id=RUN_ID,
        deployment="metrics-test",
        outcome="success",
        failed_step=None,
        error=None,
        git_sha=SHA,
        instance_id=INSTANCE_ID,
        instance_type="g6.xlarge",
        market="on-demand",
        links={"airflow": "http://127.0.0.1:8080/dags/ec2_training/runs/x", "mlflow": "http://127.0.0.1:5000/#/x"},
        metric_name="test_accuracy",
        metric_value=0.93,
        promoted=True,
        promotion_reason="beats the threshold and the champion",
        duration_s=912.5,
        phases_s={
            "ci_wait": 60.0,
            "launch": 12.0,
            "boot": 45.0,
            "bootstrap.packages": 30.0,
            "bootstrap.mlflow": 20.0,
            "training": 600.0,
            "evaluation": 15.0,
            "teardown": 8.0,
        },
        images_per_s=41544.0,
        test_metrics={"test_accuracy": 0.93, "test_f1": 0.91, "test_roc_auc": 0.97},
        cost=Cost(
            usd=0.2024,
            billed_s=728.0,
            training_s=600.0,
            non_training_s=128.0,
            training_share=600.0 / 728.0,
            usd_per_hour=1.0,
            price_source="fallback-table",
            region="us-east-1",
        ),
        mlflow_run_id="0123456789abcdef0123456789abcdef",
    )
    return dataclasses.replace(report, **changes)


def failed_before_launch() -> RunReport:
    """A run that found no capacity (the report runs once plan_launch passed): no instance, type, market or cost."""
    return success_report(
        outcome="failed",
        failed_step="launch",
        error="LaunchError: no capacity for g6.xlarge, g5.xlarge in us-east-1",
        instance_id=None,
        instance_type=None,
        market=None,
        metric_value=None,
        promoted=None,
        promotion_reason=None,
        duration_s=75.0,
        phases_s={"ci_wait": 60.0, "launch": 10.0},
        images_per_s=None,
        test_metrics={},
        cost=None,
        mlflow_run_id=None,
    )


def metrics_settings(url: str = "", **metrics: str) -> Settings:
    env = {"TRAINER__AWS__DEPLOYMENT": "metrics-test", "TRAINER__METRICS__PUSHGATEWAY_URL": url}
    env.update({f"TRAINER__METRICS__{name.upper()}": value for name, value in metrics.items()})
    return load_settings(env=env)


@pytest.fixture(scope="module")
def monitoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pushgateway, Prometheus]]:
    workdir = tmp_path_factory.mktemp("monitoring")
    with Pushgateway(workdir / "pushgateway") as gateway, Prometheus(workdir / "prometheus", [gateway.address]) as prom:
        yield gateway, prom


@pytest.fixture(scope="module")
def gateway_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushgateway]:
    """A Pushgateway that asks for GATEWAY_LOGIN; the tests reach it through a connection (`use_connection`)."""
    # Airflow sets up its logging on first import (seconds on a busy machine): done here, before any test's caplog
    # handler is in place and before a test times a push that reads a connection.
    import airflow.sdk  # noqa: F401
    import bcrypt  # paramiko's dependency; what Prometheus's web configuration expects

    workdir = tmp_path_factory.mktemp("gateway-auth")
    user, password = GATEWAY_LOGIN
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config = workdir / "web.yml"
    web_config.write_text(f"basic_auth_users:\n  {user}: {hashed}\n")
    with Pushgateway(workdir / "gw", web_config=web_config, login=GATEWAY_LOGIN) as gateway:
        yield gateway


def use_connection(monkeypatch: pytest.MonkeyPatch, password: str) -> None:
    """The connection `pushgateway_test` (metrics.conn_id) with the gateway's user and `password`."""
    conn = {"conn_type": "http", "login": GATEWAY_LOGIN[0], "password": password}
    monkeypatch.setenv("AIRFLOW_CONN_PUSHGATEWAY_TEST", json.dumps(conn))


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as resp:
        return json.load(resp)


def runs_without_an_instance(gateway_url: str, deployment: str, job: str = "ec2_trainer") -> dict[str, float]:
    """The runs by outcome the gateway counts in the deployment's group of runs that got no instance."""
    key = {"deployment": deployment, "instance_type": NONE, "market": NONE}
    return dict(totals_of(get_json(f"{gateway_url}/api/v1/metrics"), job, key).runs)


def query(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    """An instant PromQL query's result vector."""
    answer = get_json(f"{prom.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.25)
    return result


def assert_run_in_prometheus(prom: Prometheus, report: RunReport) -> dict[str, float]:
    """Wait until Prometheus has scraped this run's push (its group's latest run has its duration), then check the
    run's outcome, phases and cost there; returns the group's latest-run gauges by name."""
    selector = ",".join(f'{k}="{v}"' for k, v in grouping_key(report).items())

    def latest() -> dict[str, float]:
        """`name` or `name:<outcome|phase|metric>` -> value."""
        gauges = {}
        for found in query(prom, f'{{__name__=~"{PREFIX}last_run_.+",{selector}}}'):
            labels = found["metric"]
            key = ":".join([labels["__name__"], *(labels[k] for k in ("outcome", "phase", "metric") if k in labels)])
            gauges[key] = float(found["value"][1])
        return gauges

    gauges = wait_for(
        f"the run's series in Prometheus ({selector})",
        lambda: (g := latest()).get(f"{PREFIX}last_run_duration_seconds") == report.duration_s and g,
    )
    assert gauges[f"{PREFIX}last_run_outcome:{report.outcome}"] == 1.0
    for phase, seconds in report.phases_s.items():
        assert gauges[f"{PREFIX}last_run_phase_duration_seconds:{phase}"] == seconds
    if report.cost is not None:
        assert gauges[f"{PREFIX}last_run_cost_usd"] == report.cost.usd
        assert gauges[f"{PREFIX}last_run_instance_billed_seconds"] == report.cost.billed_s
    runs = query(prom, f'{PREFIX}runs_total{{{selector},outcome="{report.outcome}"}}')
    assert runs and float(runs[0]["value"][1]) >= 1
    return dict(gauges)
