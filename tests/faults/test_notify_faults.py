"""A notifier that fails: the Slack webhook answers 500 and the mail server is down; both are warnings, nothing raises,
and neither the webhook URL nor the SMTP password shows anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path

import airflow.sdk  # noqa: F401 - Airflow sets up logging on import: before caplog adds its handler
import pytest

from embedded.process import free_port
from embedded.services.slack_webhook import SlackWebhookStandIn
from orchestrator.observe.notify import send_notifications
from tests.orchestrator.observe.test_notify import BOTH, FAILURE, SLACK_CONN, SMTP_CONN, notify_settings
from tests.support.fault_table import FaultTable
from tests.support.faults import record_nothing_launched
from tests.support.pipeline import ProcessListSampler


def test_failing_notifiers_are_warnings_that_leak_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> None:
    planted = {"smtp password": "planted-smtp-password-c4e81f"}
    dead_port = free_port()
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{SMTP_CONN.upper()}",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": dead_port,
                "login": "mailer",
                "password": planted["smtp password"],
                "extra": {"disable_ssl": True, "from_email": "airflow@example.com"},
            }
        ),
    )
    with SlackWebhookStandIn(tmp_path / "slack") as slack:
        planted["webhook token"] = slack.path.rsplit("/", 1)[1]
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{SLACK_CONN.upper()}", json.dumps({"conn_type": "slackwebhook", "password": slack.url})
        )
        slack.fail_next(1, 500, "rollup_error")
        started = time.monotonic()
        sent = send_notifications(notify_settings(**BOTH), FAILURE)
        elapsed = time.monotonic() - started
        assert (sent, slack.requests, slack.received) == ([], 1, [])
    warnings = [r.getMessage() for r in caplog.records if "was not sent" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "Status Code: 500" in warnings[0] and "ConnectionRefusedError" in warnings[1]
    out = capsys.readouterr()
    record_nothing_launched(
        fault_table,
        "unit: Slack webhook answers 500, SMTP server down (send_notifications)",
        "a warning per channel; returns normally with no channel sent; no secret shown",
        f"2 warnings ('Status Code: 500 ... rollup_error', 'ConnectionRefusedError') in {elapsed:.1f} s; sent []",
        planted=planted,
        places={"log": caplog.text, "output": out.out + out.err, "process list": processes.text()},
    )
