"""orchestrator.observe.notify: what the messages say, and sending them through the providers' notifiers to a real
SMTP server and a Slack webhook stand-in on 127.0.0.1; a channel that fails is a warning that leaks nothing."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import airflow.sdk  # noqa: F401 - Airflow sets up logging on import: before caplog adds its handler
import pytest

from embedded.process import free_port
from embedded.services.slack_webhook import SlackWebhookStandIn, verdict
from embedded.services.smtp_server import LocalSmtpServer, TlsFiles
from orchestrator.config.settings import Settings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.observe.notify import compose_email, compose_slack, send_notifications
from orchestrator.observe.report import RunReport
from tests.orchestrator.observe.test_report import PREEMPTED, REPORT

SMTP_CONN = "notify_smtp"
SLACK_CONN = "notify_slack"
SMTP_LOGIN = "trainer-mailer"
SMTP_PASSWORD = "planted-smtp-password-5f0c2d"
LINKS = {
    "airflow": "http://127.0.0.1:8080/dags/ec2_training/runs/manual__1",
    "ci": "https://github.com/org/repo/commit/" + "a" * 40 + "/checks",
    "mlflow": "http://127.0.0.1:5000/#/experiments/1/runs/" + "r" * 32,
    "mlflow_runs": "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
}
SUCCESS = replace(REPORT, links=LINKS)
FAILURE = replace(
    REPORT,
    outcome="failed",
    failed_step="train",
    error="training exited with code 3: see the train | lines\nTraceback (most recent call last):",
    metric_name=None,
    metric_value=None,
    promoted=None,
    promotion_reason=None,
    links=LINKS,
)


def notify_settings(**notify: Any) -> Settings:
    env = {"TRAINER__AWS__DEPLOYMENT": "test"}
    env.update({f"TRAINER__NOTIFY__{key.upper()}": str(value) for key, value in notify.items()})
    return load_settings(env=env)


BOTH = {"slack_webhook_conn_id": SLACK_CONN, "smtp_conn_id": SMTP_CONN, "email_to": "ml-team@example.com"}


def _smtp_conn(port: int, **extra: Any) -> str:
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@example.com", **extra},
        }
    )


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[LocalSmtpServer]:
    with LocalSmtpServer(tmp_path / "smtp") as server:
        yield server


@pytest.fixture
def slack(tmp_path: Path) -> Iterator[SlackWebhookStandIn]:
    with SlackWebhookStandIn(tmp_path / "slack") as standin:
        yield standin


@pytest.fixture
def connections(
    smtp: LocalSmtpServer, slack: SlackWebhookStandIn, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalSmtpServer, SlackWebhookStandIn]:
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", _smtp_conn(smtp.port, retry_limit=0))
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{SLACK_CONN.upper()}", json.dumps({"conn_type": "slackwebhook", "password": slack.url})
    )
    return smtp, slack


def mail_text(message: Any) -> str:
    """The e-mail's text as a person reads it (the provider sends it as escaped text in an HTML <pre>)."""
    import html

    body = message.get_body(preferencelist=("html", "plain")).get_content()
    return html.unescape(body.removeprefix("<pre>").rstrip().removesuffix("</pre>"))


def _slack_text(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False)


def _no_secret(text: str, slack: SlackWebhookStandIn | None = None) -> None:
    assert SMTP_PASSWORD not in text
    if slack is not None:
        assert slack.path.rsplit("/", 1)[1] not in text  # the webhook's token
        assert slack.path not in text


# ---- composition (pure)


def test_the_success_message_says_metric_promotion_duration_cost_and_links() -> None:
    mail, chat = compose_email(SUCCESS), compose_slack(SUCCESS)
    assert mail.subject == (
        "[ec2-trainer prod] ec2_training succeeded: test_accuracy 0.9300, promoted (manual__2026-11-26T20:00:00+00:00)"
    )
    for needle in (
        "test_accuracy = 0.9300",
        "promoted to champion: 0.9300 passes the threshold 0.9000; there is no champion yet",
        "15 min 00 s",
        "$0.1606 (billed 714 s at $0.8048/h, training 84% of it; price: fallback-table, us-east-1)",
        "i-0123456789abcdef0 (g6.xlarge, on-demand)",
        "a" * 40,
        *(
            f"{label}: {LINKS[key]}"
            for key, label in (
                ("airflow", "Airflow run"),
                ("ci", "CI run"),
                ("mlflow", "MLflow run"),
                ("mlflow_runs", "MLflow runs"),
            )
        ),
    ):
        assert needle in mail.body
    assert "Failed step" not in mail.body
    text = _slack_text({"text": chat.text, "blocks": chat.blocks})
    for needle in ("test_accuracy = 0.9300", "promoted to champion", "15 min 00 s", "$0.1606", "|Airflow run>"):
        assert needle in text
    # Slack would take it: Block Kit's shape and limits, as the stand-in checks them.
    assert verdict({"text": chat.text, "blocks": chat.blocks}) == (200, "ok")


def test_the_failure_message_says_step_first_error_line_and_links() -> None:
    mail, chat = compose_email(FAILURE), compose_slack(FAILURE)
    assert mail.subject == "[ec2-trainer prod] ec2_training FAILED at train (manual__2026-11-26T20:00:00+00:00)"
    assert "Failed step: train" in mail.body
    assert "Error:       training exited with code 3: see the train | lines" in mail.body
    assert "Traceback" not in mail.body and "Traceback" not in json.dumps(chat.blocks)
    assert "not evaluated (the model gate did not run)" in mail.body
    assert all(url in mail.body for url in LINKS.values())
    assert "FAILED at train" in chat.text
    assert "```training exited with code 3: see the train | lines```" in json.dumps(chat.blocks)
    assert verdict({"text": chat.text, "blocks": chat.blocks}) == (200, "ok")


def test_a_preempted_run_lists_its_attempts_the_seconds_lost_and_the_saving() -> None:
    mail, chat = compose_email(replace(PREEMPTED, links=LINKS)), compose_slack(replace(PREEMPTED, links=LINKS))
    recovery = "Spot recovery: 2 instances, 1 taken back by EC2; 2 min 05 s lost to it; $0.2135 saved against on-demand"
    attempts = [
        "1. i-0aaaaaaaaaaaaaaa1 (g6.xlarge, spot, us-east-1a): billed 728 s, $0.0633; taken back by EC2 "
        "(Server.SpotInstanceTermination)",
        "2. i-0bbbbbbbbbbbbbbb2 (g6.xlarge, spot, us-east-1b): billed 800 s, $0.0695; terminated by the teardown",
    ]
    assert recovery in mail.body
    assert "\nAttempts:\n" + "".join(f"  {line}\n" for line in attempts) in mail.body
    text = _slack_text({"text": chat.text, "blocks": chat.blocks})
    assert "2 min 05 s lost to it" in text and all(line in text for line in attempts)
    assert verdict({"text": chat.text, "blocks": chat.blocks}) == (200, "ok")
    # A run EC2 never interrupted: its one instance is the Instance line, nothing more.
    for message in (compose_email(SUCCESS).body, _slack_text({"blocks": compose_slack(SUCCESS).blocks})):
        assert "Spot recovery" not in message and "Attempts" not in message


def test_a_checkpoint_that_could_not_be_written_is_a_warning_in_every_channel() -> None:
    warning = "Checkpoints failed, training went on without them: cannot write epoch 1 to s3://b/ckpt/r1/: AccessDenied"
    report = replace(SUCCESS, warnings=[warning])
    assert re.search(rf"\nWarning: +{re.escape(warning)}\n", compose_email(report).body)
    assert warning in _slack_text({"blocks": compose_slack(report).blocks})
    assert "Warning" not in compose_email(SUCCESS).body


def test_a_run_without_an_instance_says_so() -> None:
    early = replace(FAILURE, failed_step="ci_gate", error="CI failed on abc", cost=None, instance_id=None, links={})
    body = compose_email(early).body
    assert "Cost:        none (no instance was launched)" in body
    assert "Instance" not in body and "Links" not in body


def test_links_lose_credentials_and_text_is_escaped_for_slack() -> None:
    odd = replace(
        FAILURE,
        run_id="manual__<b>&x",
        error="bad <value> & more\r\nsecond line",
        links={"airflow": "https://user:hunter2pass@airflow.example.com/x", "mlflow": "javascript:alert(1)"},
    )
    mail, chat = compose_email(odd), compose_slack(odd)
    assert "hunter2pass" not in mail.body and "hunter2pass" not in json.dumps(chat.blocks)
    assert "https://airflow.example.com/x" in mail.body and "javascript" not in mail.body
    assert "\r" not in mail.subject and "\n" not in mail.subject
    assert "bad &lt;value&gt; &amp; more" in json.dumps(chat.blocks) and "second line" not in json.dumps(chat.blocks)
    assert "&lt;pre&gt;" not in mail.html() and "bad &lt;value&gt;" in mail.html()


# ---- settings


def test_notifications_are_off_by_default(connections: tuple[LocalSmtpServer, SlackWebhookStandIn]) -> None:
    smtp, slack = connections
    settings = notify_settings()
    assert not settings.notify.enabled
    assert send_notifications(settings, FAILURE) == []
    assert smtp.received == [] and slack.requests == 0


@pytest.mark.parametrize(
    ("notify", "match"),
    [
        ({"smtp_conn_id": SMTP_CONN}, r"notify.email_to: \[\] is invalid; expected at least one address"),
        ({"email_to": "not-an-address"}, r"notify.email_to\[0\]: 'not-an-address' is invalid"),
        ({"email_from": "a b@c"}, r"notify.email_from: 'a b@c' is invalid"),
        ({"on": "always"}, r"notify.on: 'always' is invalid; expected failure or success or both"),
        ({"slack_webhook_conn_id": "has space"}, r"notify.slack_webhook_conn_id: 'has space' is invalid"),
        ({"timeout_seconds": "0"}, r"notify.timeout_seconds: 0 is invalid"),
    ],
)
def test_bad_settings_name_the_field(notify: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        notify_settings(**notify)


@pytest.mark.parametrize(("on", "success_sent", "failure_sent"), [("failure", 0, 2), ("success", 2, 0), ("both", 2, 2)])
def test_on_chooses_which_runs_are_announced(
    connections: tuple[LocalSmtpServer, SlackWebhookStandIn], on: str, success_sent: int, failure_sent: int
) -> None:
    settings = notify_settings(**BOTH, on=on)
    assert len(send_notifications(settings, SUCCESS)) == success_sent
    assert len(send_notifications(settings, FAILURE)) == failure_sent


# ---- sending to real servers


def test_both_channels_deliver_the_report(
    connections: tuple[LocalSmtpServer, SlackWebhookStandIn],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smtp, slack = connections
    caplog.set_level(logging.DEBUG)
    assert send_notifications(notify_settings(**BOTH), FAILURE) == ["slack", "email"]
    [mail] = smtp.received
    assert (mail.mail_from, mail.rcpt_tos) == ("airflow@example.com", ("ml-team@example.com",))
    assert mail.message["Subject"] == compose_email(FAILURE).subject
    assert mail_text(mail.message) == compose_email(FAILURE).body
    assert len(list((smtp.mailbox_dir / "new").iterdir())) == 1  # kept in the Maildir too
    [payload] = slack.received
    assert payload["text"] == compose_slack(FAILURE).text and payload["blocks"] == compose_slack(FAILURE).blocks
    assert payload["unfurl_links"] is False
    out = capsys.readouterr()
    _no_secret(caplog.text + out.out + out.err + json.dumps(payload) + mail.message.as_string(), slack)


def test_a_dead_port_or_a_failing_server_is_a_warning_and_changes_nothing(
    connections: tuple[LocalSmtpServer, SlackWebhookStandIn],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smtp, slack = connections
    caplog.set_level(logging.INFO)
    settings = notify_settings(**BOTH)
    # The receivers answer as in an outage: Slack's 500 rollup_error, the mail server's 451.
    slack.fail_next(1, 500, "rollup_error")
    smtp.fail_next(1)
    assert send_notifications(settings, FAILURE) == []
    assert "slack notification (connection 'notify_slack') was not sent" in caplog.text
    assert "Status Code: 500" in caplog.text and "rollup_error" in caplog.text
    assert "email notification (connection 'notify_smtp') was not sent" in caplog.text
    assert "SMTPDataError: (451" in caplog.text
    # Nothing listens: connection refused, at once.
    dead = free_port()
    dead_url = slack.url.replace(f":{slack.url.split(':')[2].split('/')[0]}/", f":{dead}/")
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{SLACK_CONN.upper()}", json.dumps({"conn_type": "slackwebhook", "password": dead_url})
    )
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", _smtp_conn(dead))
    caplog.clear()
    assert send_notifications(settings, SUCCESS) == []
    assert caplog.text.count("was not sent; the run's outcome is unchanged") == 2
    assert "ConnectionRefusedError" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if "was not sent" in r.getMessage())
    out = capsys.readouterr()
    _no_secret(caplog.text + out.out + out.err, slack)
    assert smtp.received == [] and slack.received == []


def test_a_webhook_url_that_slack_does_not_know_is_a_warning_without_the_url(
    connections: tuple[LocalSmtpServer, SlackWebhookStandIn],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, slack = connections
    revoked = slack.base_url + "/services/T0/B0/planted-revoked-token-7a1e"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{SLACK_CONN.upper()}", json.dumps({"conn_type": "slackwebhook", "password": revoked})
    )
    assert send_notifications(notify_settings(slack_webhook_conn_id=SLACK_CONN), FAILURE) == []
    assert "Status Code: 404" in caplog.text and "no_service" in caplog.text
    assert "planted-revoked-token" not in caplog.text


@pytest.fixture
def tls_smtp(tmp_path: Path) -> Iterator[tuple[LocalSmtpServer, TlsFiles]]:
    tls = TlsFiles.self_signed(tmp_path / "tls")
    with LocalSmtpServer(
        tmp_path / "smtp-tls", credentials=(SMTP_LOGIN, SMTP_PASSWORD), tls=tls, require_starttls=True
    ) as server:
        yield server, tls


def _submission_conn(port: int, **extra: Any) -> str:
    """As for a submission server on 587: STARTTLS (disable_ssl: no implicit TLS), login and password."""
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": "127.0.0.1",
            "port": port,
            "login": SMTP_LOGIN,
            "password": SMTP_PASSWORD,
            "extra": {"disable_ssl": True, "from_email": "airflow@example.com", "retry_limit": 0, **extra},
        }
    )


def test_smtp_starttls_and_login_as_the_connection_says(
    tls_smtp: tuple[LocalSmtpServer, TlsFiles],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, tls = tls_smtp
    caplog.set_level(logging.INFO)
    settings = notify_settings(smtp_conn_id=SMTP_CONN, email_to="ml-team@example.com")
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", _submission_conn(server.port))
    # The certificate is verified (ssl_context "default"): trusted only once its CA is.
    assert send_notifications(settings, SUCCESS) == []
    assert "SSLCertVerificationError" in caplog.text or "CERTIFICATE_VERIFY_FAILED" in caplog.text
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))
    assert send_notifications(settings, SUCCESS) == ["email"]
    [mail] = server.received
    assert (mail.login, mail.tls) == (SMTP_LOGIN, True)
    # No STARTTLS: the server offers no AUTH in clear text, so nothing is sent (and the password never travels).
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", _submission_conn(server.port, disable_tls=True))
    caplog.clear()
    assert send_notifications(settings, SUCCESS) == []
    assert "SMTPNotSupportedError" in caplog.text
    # A wrong password: refused, and the warning does not repeat it.
    wrong = json.loads(_submission_conn(server.port))
    wrong["password"] = "planted-wrong-password-91b3"
    monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN.upper()}", json.dumps(wrong))
    caplog.clear()
    assert send_notifications(settings, SUCCESS) == []
    assert "SMTPAuthenticationError" in caplog.text and "planted-wrong-password" not in caplog.text
    assert len(server.received) == 1
    out = capsys.readouterr()
    _no_secret(caplog.text + out.out + out.err + mail.message.as_string())


def test_reports_round_tripped_through_xcom_compose_the_same() -> None:
    again = RunReport.from_dict(json.loads(json.dumps(FAILURE.to_dict())))
    assert compose_email(again) == compose_email(FAILURE) and compose_slack(again) == compose_slack(FAILURE)
