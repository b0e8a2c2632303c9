"""embedded.services.slack_webhook and embedded.services.smtp_server: they answer as Slack's incoming webhooks and a
submission server do, so a message they accept is one the real service would take."""

from __future__ import annotations

import json
import mailbox
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.services.slack_webhook import SlackWebhookStandIn
from embedded.services.smtp_server import LocalSmtpServer

GOOD = {"text": "fallback", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]}


@pytest.fixture
def slack(tmp_path: Path) -> Iterator[SlackWebhookStandIn]:
    with SlackWebhookStandIn(tmp_path / "slack") as standin:
        yield standin


def _post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (json.dumps(GOOD).encode(), (200, "ok")),
        (json.dumps({"text": "plain text only"}).encode(), (200, "ok")),
        (b"text=not json", (400, "invalid_payload")),
        (b"[1, 2]", (400, "invalid_payload")),
        (json.dumps({"username": "x"}).encode(), (400, "no_text")),
        (
            json.dumps({"text": "t", "blocks": [{"type": "header", "text": {"type": "mrkdwn", "text": "x"}}]}).encode(),
            (400, "invalid_blocks"),
        ),
        (
            json.dumps(
                {"text": "t", "blocks": [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}]}
            ).encode(),
            (400, "invalid_blocks"),
        ),
        (
            json.dumps(
                {"text": "t", "blocks": [{"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * 11}]}
            ).encode(),
            (400, "invalid_blocks"),
        ),
        (json.dumps({"text": "t", "blocks": [{"type": "divider"}] * 51}).encode(), (400, "invalid_blocks")),
    ],
)
def test_the_webhook_answers_as_slack_does(slack: SlackWebhookStandIn, body: bytes, answer: tuple[int, str]) -> None:
    assert _post(slack.url, body) == answer
    assert len(slack.received) == (1 if answer[0] == 200 else 0)
    assert len(list(slack.folder.glob("*.json"))) == len(slack.received)


def test_the_webhook_refuses_another_url_and_injects_outages(slack: SlackWebhookStandIn) -> None:
    assert _post(slack.base_url + "/services/T0/B0/wrong", json.dumps(GOOD).encode()) == (404, "no_service")
    slack.fail_next(1, 500, "rollup_error")
    assert _post(slack.url, json.dumps(GOOD).encode()) == (500, "rollup_error")
    assert _post(slack.url, json.dumps(GOOD).encode()) == (200, "ok")
    assert slack.requests == 3


def test_the_mail_server_keeps_mail_in_a_maildir_and_refuses_auth_in_clear_text(tmp_path: Path) -> None:
    with LocalSmtpServer(tmp_path / "plain") as plain:
        with smtplib.SMTP("127.0.0.1", plain.port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], "Subject: hello\r\n\r\nbody\r\n")
        [kept] = list(mailbox.Maildir(plain.mailbox_dir, create=False))
        assert kept["Subject"] == "hello" and plain.received[0].rcpt_tos == ("b@example.com",)
        plain.fail_next(1, "554 5.7.1 Rejected")
        with smtplib.SMTP("127.0.0.1", plain.port, timeout=10) as client, pytest.raises(smtplib.SMTPDataError):
            client.sendmail("a@example.com", ["b@example.com"], "Subject: again\r\n\r\nbody\r\n")
    with LocalSmtpServer(tmp_path / "auth", credentials=("user", "pass")) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.ehlo()
            assert not client.has_extn("auth")  # no AUTH before STARTTLS, as real servers do
            with pytest.raises(smtplib.SMTPSenderRefused, match="Authentication required"):
                client.sendmail("a@example.com", ["b@example.com"], "Subject: x\r\n\r\nbody\r\n")
        assert server.received == []
