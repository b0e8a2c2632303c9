"""Notifications about a finished run: an e-mail and a Slack message composed from its RunReport, sent through the
maintained providers' notifiers (SMTP: SmtpNotifier; Slack incoming webhook: SlackWebhookNotifier).

Composition is pure (`compose_email`, `compose_slack`); `send_notifications` sends through each channel whose
connection id is set, each guarded: a channel that fails is logged as a warning, without its secrets (the webhook URL,
the SMTP password), and never raises, so it cannot change the run's outcome nor keep the teardown from finishing.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from orchestrator.config.settings import NotifySettings, Settings
    from orchestrator.observe.report import Cost, RunReport

log = logging.getLogger(__name__)

SLACK = "slack"
EMAIL = "email"
# Labels of the report's links, in the order people open them.
_LINK_LABELS = {"airflow": "Airflow run", "ci": "CI run", "mlflow": "MLflow run", "mlflow_runs": "MLflow runs"}
_MAX_ERROR = 300
_SLACK_HEADER_MAX = 150
_SLACK_FIELD_MAX = 2000
_SLACK_SECTION_MAX = 3000
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# Any URL in a provider's error text: its path or query may be the credential (a webhook's token).
_URL_RE = re.compile(r"(?P<base>[A-Za-z][A-Za-z0-9+.-]*://[^/\s'\"]+)[^\s'\"]*")


@dataclass(frozen=True)
class Email:
    subject: str
    body: str

    def html(self) -> str:
        """The body as the SMTP provider sends it (an HTML part only): the plain text, escaped, kept as laid out."""
        return f"<pre>{html.escape(self.body)}</pre>"


@dataclass(frozen=True)
class SlackMessage:
    text: str  # the notification's and a screen reader's fallback
    blocks: list[dict[str, Any]]


def wanted(notify: NotifySettings, outcome: str) -> bool:
    """Whether a run with this outcome ("success" or "failed") is announced at all."""
    return notify.enabled and (notify.on == "both" or (notify.on == "success") == (outcome == "success"))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, limit: int) -> str:
    """The first line, without control characters, at most `limit` characters."""
    return _cut(_CONTROL_RE.sub(" ", text.strip().splitlines()[0] if text.strip() else "").strip(), limit)


def _safe_url(url: str) -> str | None:
    """An http(s) URL for people, without any user:password part; None for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _links(report: RunReport) -> list[tuple[str, str]]:
    out = []
    for key, label in _LINK_LABELS.items():
        url = _safe_url(report.links.get(key) or "")
        if url:
            out.append((label, url))
    return out


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def cost_text(cost: Cost | None) -> str:
    if cost is None:
        return "none (no instance was launched)"
    return (
        f"${cost.usd:.4f} (billed {cost.billed_s:.0f} s at ${cost.usd_per_hour:.4f}/h, "
        f"training {cost.training_share:.0%} of it; price: {cost.price_source}, {cost.region})"
    )


def recovery_text(report: RunReport) -> str | None:
    """What spot recovery took and what spot saved, when EC2 took an instance back; None otherwise (one instance: the
    Instance line says it all)."""
    if not report.preemptions:
        return None
    saving = report.cost.saving_vs_on_demand_usd if report.cost else None
    parts = [
        f"{len(report.attempts)} instances, {len(report.preemptions)} taken back by EC2",
        f"{duration_text(report.seconds_lost_to_preemption)} lost to it",
        *([f"${saving:.4f} saved against on-demand"] if saving is not None else []),
    ]
    return "; ".join(parts)


def attempt_text(attempt: Mapping[str, Any]) -> str:
    """One instance the run launched (an attempt record of RunReport.attempts), on one line."""
    kind = ", ".join(str(attempt[k]) for k in ("instance_type", "market", "availability_zone") if attempt.get(k))
    line = (
        f"{attempt['instance_id']} ({kind}): billed {attempt['billed_s']:.0f} s, ${attempt['usd']:.4f}; "
        f"{attempt['ended_by']}"
    )
    return _one_line(line, _MAX_ERROR)


def attempt_lines(report: RunReport) -> list[str]:
    """Each instance of a run EC2 interrupted, numbered, oldest first; none for a run without a preemption."""
    return [f"{n}. {attempt_text(a)}" for n, a in enumerate(report.attempts, 1)] if report.preemptions else []


def _promotion_text(report: RunReport) -> str:
    reason = _one_line(report.promotion_reason or "", _MAX_ERROR)
    if report.promoted is None:
        return "not evaluated (the model gate did not run)"
    verdict = "promoted to champion" if report.promoted else "not promoted"
    return f"{verdict}: {reason}" if reason else verdict


def _metric_text(report: RunReport) -> str:
    if report.metric_name is None or report.metric_value is None:
        return "none recorded"
    return f"{report.metric_name} = {report.metric_value:.4f}"


def _failed(report: RunReport) -> bool:
    return report.outcome != "success"


def facts(report: RunReport) -> list[tuple[str, str]]:
    """What the run did, as (label, value) lines, the same in every channel."""
    rows: list[tuple[str, str]] = []
    if _failed(report):
        rows += [
            ("Failed step", report.failed_step or "unknown"),
            ("Error", _one_line(report.error or "", _MAX_ERROR) or "no error message recorded"),
        ]
    rows += [
        ("Metric", _metric_text(report)),
        ("Model", _promotion_text(report)),
        ("Duration", duration_text(report.duration_s)),
        ("Cost", cost_text(report.cost)),
    ]
    if recovery := recovery_text(report):
        rows.append(("Spot recovery", recovery))
    rows += [("Warning", _one_line(warning, _MAX_ERROR)) for warning in report.warnings]
    if report.git_sha:
        rows.append(("Commit", report.git_sha))
    if report.instance_id:
        kind = ", ".join(x for x in (report.instance_type, report.market) if x)
        rows.append(("Instance", f"{report.instance_id} ({kind})" if kind else report.instance_id))
    if report.images_per_s:
        rows.append(("Throughput", f"{report.images_per_s:,.0f} images/s"))
    return rows


def _headline(report: RunReport) -> str:
    if _failed(report):
        return f"{report.dag_id} FAILED at {report.failed_step or 'an unknown step'}"
    if report.metric_name is not None and report.metric_value is not None:
        promoted = {True: ", promoted", False: ", not promoted", None: ""}[report.promoted]
        return f"{report.dag_id} succeeded: {report.metric_name} {report.metric_value:.4f}{promoted}"
    return f"{report.dag_id} succeeded"


def compose_email(report: RunReport) -> Email:
    subject = _one_line(f"[ec2-trainer {report.deployment}] {_headline(report)} ({report.run_id})", 250)
    width = max(len(label) for label, _ in facts(report))
    lines = [f"{_headline(report)}: run {report.run_id} (deployment {report.deployment})", ""]
    lines += [f"{label + ':':<{width + 1}} {value}" for label, value in facts(report)]
    if attempts := attempt_lines(report):
        lines += ["", "Attempts:", *(f"  {line}" for line in attempts)]
    links = _links(report)
    if links:
        lines += ["", "Links:", *(f"  {label}: {url}" for label, url in links)]
    return Email(subject=subject, body="\n".join(lines) + "\n")


def _mrkdwn(text: str) -> str:
    """Slack's three control characters, escaped as its formatting rules ask."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_link(url: str, label: str) -> str:
    return f"<{quote(url, safe=':/?#[]@!$&()*+,;=%~.-_')}|{_mrkdwn(label)}>"


def compose_slack(report: RunReport) -> SlackMessage:
    headline = _headline(report)
    icon = ":x:" if _failed(report) else ":white_check_mark:"
    fields = [
        {"type": "mrkdwn", "text": _cut(f"*{label}*\n{_mrkdwn(value)}", _SLACK_FIELD_MAX)}
        for label, value in facts(report)
        if label not in ("Error", "Commit")
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _one_line(headline, _SLACK_HEADER_MAX)}},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"{icon} run `{_mrkdwn(report.run_id)}` ({_mrkdwn(report.deployment)})"},
        },
    ]
    if _failed(report):
        error = _one_line(report.error or "", _MAX_ERROR) or "no error message recorded"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Error*\n```{_mrkdwn(error)}```"}})
    # A section holds at most 10 fields.
    blocks += [{"type": "section", "fields": fields[i : i + 10]} for i in range(0, len(fields), 10)]
    if attempts := attempt_lines(report):
        text = _cut("*Attempts*\n" + "\n".join(_mrkdwn(line) for line in attempts), _SLACK_SECTION_MAX)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    context = [f"commit `{report.git_sha[:12]}`"] if report.git_sha else []
    context += [_slack_link(url, label) for label, url in _links(report)]
    if context:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " | ".join(context)}]})
    return SlackMessage(text=f"{headline} ({report.run_id})", blocks=blocks)


# notify() takes Airflow's task context; ours passes none: the messages are complete, nothing is templated.
_NO_CONTEXT: Any = {}


def _send_slack(notify: NotifySettings, report: RunReport) -> None:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    message = compose_slack(report)
    SlackWebhookNotifier(
        slack_webhook_conn_id=notify.slack_webhook_conn_id,
        text=message.text,
        blocks=message.blocks,
        unfurl_links=False,
        unfurl_media=False,
        timeout=notify.timeout_seconds,
        # One attempt: slack_sdk's retry handlers log the request's full URL (the webhook's secret) at INFO.
        retry_handlers=[],
    ).notify(_NO_CONTEXT)


def _send_email(notify: NotifySettings, report: RunReport) -> None:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    message = compose_email(report)
    SmtpNotifier(
        to=list(notify.email_to),
        from_email=notify.email_from or None,
        subject=message.subject,
        html_content=message.html(),
        smtp_conn_id=notify.smtp_conn_id,
    ).notify(_NO_CONTEXT)


def _connection_secrets(conn_id: str) -> list[str]:
    """The values of a connection that must never be shown: its password, and any credential in its extra."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:
        return []
    extra = conn.extra_dejson or {}
    values = [conn.password or "", *(str(extra.get(k) or "") for k in ("access_token", "client_secret"))]
    return [v.strip() for v in values if len(v.strip()) >= 4]


def redact(text: str, secrets: list[str]) -> str:
    """`text` without the given secrets and with every URL cut to its scheme and host."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _URL_RE.sub(lambda m: m["base"] + "/***", text)


def _reason(exc: Exception, conn_id: str) -> str:
    detail = _one_line(str(exc), _MAX_ERROR)
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__, _connection_secrets(conn_id))


def send_notifications(settings: Settings, report: RunReport) -> list[str]:
    """Send the report through every configured channel; return the channels that took it. Never raises."""
    notify = settings.notify
    if not wanted(notify, report.outcome):
        return []
    channels: list[tuple[str, str, Callable[[NotifySettings, RunReport], None]]] = [
        (SLACK, notify.slack_webhook_conn_id, _send_slack),
        (EMAIL, notify.smtp_conn_id, _send_email),
    ]
    sent = []
    for channel, conn_id, send in channels:
        if not conn_id:
            continue
        try:
            send(notify, report)
        except Exception as exc:  # a notifier must never change the run's outcome
            log.warning(
                "The %s notification (connection %r) was not sent; the run's outcome is unchanged: %s",
                channel,
                conn_id,
                _reason(exc, conn_id),
            )
        else:
            log.info("Sent the %s notification of run %s (connection %r)", channel, report.run_id, conn_id)
            sent.append(channel)
    return sent
