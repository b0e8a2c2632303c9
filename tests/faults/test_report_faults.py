"""Run-report faults at unit level (a whole DAG run costs minutes): AWS refusing the price lookups and MLflow refusing
the cost. The report must still be made, say where its price came from and why, and never raise into the run."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any
from unittest.mock import Mock

import pytest

from embedded.deploy.stack import EmbeddedStack
from orchestrator.config.settings import NotifySettings, load_settings
from orchestrator.observe.publish import publish
from orchestrator.observe.report import Cost
from tests.orchestrator.observe.test_report import REPORT
from tests.support.fault_table import FaultTable
from tests.support.faults import record_nothing_launched
from tests.support.mlflow_servers import FaultProxy
from tests.support.pipeline import ProcessListSampler

pytestmark = pytest.mark.slow


def test_prices_denied_and_mlflow_refusing_the_cost(
    env: EmbeddedStack,
    planted: dict[str, str],
    mlflow_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> None:
    from orchestrator.config import connections
    from orchestrator.observe.pricing import instance_price

    made = connections.AwsClients.client
    denied = {"Code": "AccessDeniedException", "Message": "User is not authorized to perform: pricing:GetProducts"}
    throttled = {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}
    requests: list[str] = []

    def refusing(self: connections.AwsClients, service: str, **kwargs: Any) -> Any:
        client = made(self, service, **kwargs)

        def answer(error: dict[str, str], status: int) -> Any:
            def handler(model: Any, **kwargs: Any) -> Any:
                requests.append(model.name)
                return Mock(status_code=status), {"Error": error}

            return handler

        client.meta.events.register("before-call.pricing.GetProducts", answer(denied, 400))
        client.meta.events.register("before-call.ec2.DescribeSpotPriceHistory", answer(throttled, 503))
        return client

    monkeypatch.setattr(connections.AwsClients, "client", refusing)
    aws = connections.AwsClients("aws_default", "us-east-1")
    on_demand = instance_price(aws, "us-east-1", "g6.xlarge", "on-demand", None, time.time())
    spot = instance_price(aws, "us-east-1", "g5.xlarge", "spot", "us-east-1a", time.time())
    assert (on_demand.source, on_demand.usd_per_hour) == ("fallback-table", 0.8048)
    assert "AccessDeniedException: User is not authorized" in on_demand.detail
    assert (spot.source, spot.usd_per_hour) == ("fallback-table", 1.006)
    assert "DescribeSpotPriceHistory: RequestLimitExceeded" in spot.detail
    # One call each: answered at the client boundary, before botocore's own retries (which would retry the
    # throttling, not the denial) come in; the report's lookups add no retry loop of their own.
    assert (requests.count("GetProducts"), requests.count("DescribeSpotPriceHistory")) == (1, 1)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow_proxy.fault = lambda method, path: (403, "Permission denied") if "/runs/" in path else None
    s = load_settings()
    # Only the MLflow publisher: this report is made up, and must not reach the stack's mailbox or Prometheus.
    s = s.model_copy(
        update={
            "mlflow": s.mlflow.model_copy(update={"tracking_uri": mlflow_proxy.url}),
            "notify": NotifySettings(),
            "metrics": s.metrics.model_copy(update={"pushgateway_url": ""}),
        }
    )
    cost = Cost(0.0335, 150.0, 75.0, 75.0, 0.5, on_demand.usd_per_hour, on_demand.source, "us-east-1")
    assert publish(s, replace(REPORT, cost=cost, mlflow_run_id="f" * 32)) == []  # nothing raised
    assert "Run report not published to mlflow: TrackingServerError" in caplog.text

    record_nothing_launched(
        fault_table,
        "unit: report: Price List API AccessDenied, spot history throttled, MLflow 403 on the cost",
        "prices from config/prices.toml naming why; cost not logged, a warning; nothing raised",
        f"fallback-table {on_demand.usd_per_hour} and {spot.usd_per_hour} USD/h, each naming the AWS error code; "
        "MLflow 403 logged as a warning; publish returned []",
        planted=planted,
        places={"log": caplog.text, "process list": processes.text()},
    )
