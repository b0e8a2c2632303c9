"""The Pushgateway failing the report step's push, at unit level (push_run_metrics against real servers on loopback):
down, hanging, refusing the credentials, or a connection that is not there. Each is a warning in the log, never an
exception (a run's outcome never depends on its metrics), it ends within the configured timeout, and no password
shows in the log."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from embedded.process import free_port
from embedded.services.prometheus import Pushgateway
from orchestrator.observe.metrics import push_run_metrics
from tests.support.fault_table import FaultTable
from tests.support.faults import record_nothing_launched
from tests.support.monitoring import GATEWAY_LOGIN, metrics_settings, success_report, use_connection

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0
WRONG_PASSWORD = "planted-wrong-password-58"


@pytest.fixture
def hanging_gateway() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def push_and_watch(url: str, caplog: pytest.LogCaptureFixture, conn_id: str = "") -> float:
    settings = metrics_settings(url, conn_id=conn_id, timeout_seconds=str(TIMEOUT_S))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="orchestrator.observe.metrics"):
        push_run_metrics(settings, success_report())  # returns: nothing raised
    return time.monotonic() - started


def record(
    fault_table: FaultTable, caplog: pytest.LogCaptureFixture, scenario: str, elapsed: float, expected_text: str
) -> None:
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("Run metrics not pushed to the Pushgateway http://127.0.0.1:"), warning
    assert expected_text in warning
    # Each HTTP request is bounded by the timeout; a push is at most two of them (read the totals, then PUT).
    assert elapsed < 2 * TIMEOUT_S + 2, f"{elapsed:.1f} s"
    record_nothing_launched(
        fault_table,
        f"unit: push_run_metrics, {scenario}",
        "a warning in the report step's log, nothing raised",
        f"warning after {elapsed:.1f} s: '...{expected_text}'",
        planted={"password": WRONG_PASSWORD, "right password": GATEWAY_LOGIN[1]},
        places={"log": caplog.text},
    )


def test_pushgateway_down(caplog: pytest.LogCaptureFixture, fault_table: FaultTable) -> None:
    elapsed = push_and_watch(f"http://127.0.0.1:{free_port()}", caplog)
    record(fault_table, caplog, "Pushgateway down (closed port)", elapsed, "Connection refused")


def test_pushgateway_hanging(hanging_gateway: str, caplog: pytest.LogCaptureFixture, fault_table: FaultTable) -> None:
    elapsed = push_and_watch(hanging_gateway, caplog)
    assert elapsed >= TIMEOUT_S
    record(fault_table, caplog, f"Pushgateway never answering, timeout {TIMEOUT_S:.0f} s", elapsed, "timed out")


def test_pushgateway_refusing_the_password(
    gateway_with_auth: Pushgateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    use_connection(monkeypatch, WRONG_PASSWORD)
    elapsed = push_and_watch(gateway_with_auth.url, caplog, conn_id="pushgateway_test")
    record(fault_table, caplog, "Pushgateway refusing the password (basic auth)", elapsed, "HTTP Error 401")


def test_metrics_connection_missing(
    gateway_with_auth: Pushgateway, caplog: pytest.LogCaptureFixture, fault_table: FaultTable
) -> None:
    elapsed = push_and_watch(gateway_with_auth.url, caplog, conn_id="pushgateway_missing")
    record(
        fault_table,
        caplog,
        "metrics.conn_id names no connection",
        elapsed,
        "metrics.conn_id: Airflow connection 'pushgateway_missing' not found",
    )
