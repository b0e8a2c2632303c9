"""The CI gate: wait, deferred, until every GitHub Actions workflow run of one commit has passed.

`CiGateOperator` resolves the git ref to a full sha, checks that its connection can download the commit's tree (the
instance gets it from `train`: a repository it cannot read fails here, before any launch), checks CI once, and if CI
is still running hands the wait to
`CiGateTrigger` (the triggerer polls; no worker slot sleeps). The token stays in the Airflow connection: the trigger
receives only the connection id and reads the connection itself, so no secret is serialized or pushed to XCom.
The deadlines count from the DAG run's start, so a retried task does not restart the wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from orchestrator.ci.github import DEFAULT_API_URL, GitHubClient
from orchestrator.ci.github_protocol import (
    GitHubError,
    GitHubResponseError,
    commit_checks_url,
    poll_interval_s,
)
from orchestrator.ci.verdict import CiVerdict, WorkflowRun, evaluate_ci, parse_allowed_conclusions
from orchestrator.contracts import CI_PASSED_AT_KEY, SHA_XCOM_KEY, classpath
from orchestrator.errors import ConfigError, fail_without_retry

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "github_default"
NO_RUNS_MESSAGE = "no GitHub Actions workflow run appeared for this commit"


def wait_started_at(context: Context, now: float) -> float:
    """When the CI wait began: the DAG run's start, so that a retry (after a GitHub outage) keeps the deadline of
    the first try instead of restarting it. Clearing a finished run resets that start, and with it the wait."""
    started = context["dag_run"].start_date
    return started.timestamp() if started is not None else now


def _seconds(value: Any, name: str) -> float:
    """A templated duration (rendered fields arrive as strings) as positive seconds."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class _InfoLogger(Protocol):
    def info(self, event: str, *args: Any) -> Any: ...


def _log_changes(logger: _InfoLogger, runs: Iterable[WorkflowRun], seen: dict[int, tuple[Any, ...]]) -> None:
    """Log each workflow's name/status/conclusion once, then again only when it changes."""
    for run in runs:
        key = (run.id, run.run_attempt, run.status, run.conclusion)
        if seen.get(run.workflow_id) != key:
            seen[run.workflow_id] = key
            logger.info(
                "workflow %r (attempt %d): %s/%s %s",
                run.label,
                run.run_attempt,
                run.status or "-",
                run.conclusion or "-",
                run.html_url,
            )


def _event(status: str, message: str, sha: str, verdict: CiVerdict | None = None) -> TriggerEvent:
    runs = verdict.runs if verdict else ()
    failing = verdict.failing if verdict else ()
    return TriggerEvent(
        {
            "status": status,
            "message": message,
            "sha": sha,
            "runs": [r.to_dict() for r in runs],
            "failing": [r.to_dict() for r in failing],
        }
    )


class CiGateTrigger(BaseTrigger):
    """Poll a commit's workflow runs until they all pass, one fails, or a deadline (epoch seconds) passes."""

    def __init__(
        self,
        conn_id: str,
        api_url: str,
        repo: str,
        sha: str,
        poll_interval_s: float,
        deadline: float,
        no_runs_deadline: float,
        allowed_conclusions: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.api_url = api_url
        self.repo = repo
        self.sha = sha
        self.poll_interval_s = poll_interval_s
        self.deadline = deadline
        self.no_runs_deadline = no_runs_deadline
        self.allowed_conclusions = list(allowed_conclusions)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            classpath(self),
            {
                "conn_id": self.conn_id,
                "api_url": self.api_url,
                "repo": self.repo,
                "sha": self.sha,
                "poll_interval_s": self.poll_interval_s,
                "deadline": self.deadline,
                "no_runs_deadline": self.no_runs_deadline,
                "allowed_conclusions": self.allowed_conclusions,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            client = await GitHubClient.afrom_connection(self.conn_id, self.api_url, self.repo)
        except Exception as exc:
            # An unreadable connection must end the wait with a message, not leave the task deferred.
            message = (
                f"cannot read connection {self.conn_id!r} ({type(exc).__name__}): define it, with the GitHub "
                "token as its password (empty for a public repository)"
            )
            yield _event("error", message, self.sha)
            return
        seen: dict[int, tuple[Any, ...]] = {}
        # The operator has just checked: the first poll waits one interval too.
        wait_until = self.deadline
        interval_s = self.poll_interval_s
        while True:
            await asyncio.sleep(max(0.0, min(interval_s, wait_until - time.time())))
            sent_before = client.requests_sent
            try:
                # The client is synchronous (requests) and may sleep between retries: keep it off the event loop.
                runs = await asyncio.to_thread(client.list_workflow_runs, self.sha)
            except GitHubResponseError as exc:
                # Named, not `terminal`: only an unreadable answer ends the wait; the task retries the rest (a 401 too).
                yield _event("invalid", str(exc), self.sha)
                return
            except GitHubError as exc:
                yield _event("error", str(exc), self.sha)
                return
            # More pages (or retries) per poll: anonymously, the next polls are spaced further apart.
            interval_s = poll_interval_s(interval_s, client.authenticated, client.requests_sent - sent_before)
            verdict = evaluate_ci(runs, self.allowed_conclusions)
            _log_changes(self.log, verdict.runs, seen)
            now = time.time()
            if verdict.state == "success":
                yield _event("success", verdict.message, self.sha, verdict)
                return
            if verdict.state == "failed":
                yield _event("failed", verdict.message, self.sha, verdict)
                return
            if verdict.state == "no_runs" and now >= self.no_runs_deadline:
                yield _event("timeout", NO_RUNS_MESSAGE, self.sha)
                return
            if now >= self.deadline:
                yield _event("timeout", f"CI did not finish in time; {verdict.message}", self.sha, verdict)
                return
            wait_until = self.no_runs_deadline if verdict.state == "no_runs" else self.deadline


class GitHubActionsLink(BaseOperatorLink):
    """The commit's checks page on GitHub, from the sha the gate resolved."""

    name = "GitHub Actions"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        sha = XCom.get_value(key=SHA_XCOM_KEY, ti_key=ti_key)
        if not sha:
            return ""
        return commit_checks_url(str(operator.api_url), str(operator.repo), str(sha))  # type: ignore[attr-defined]


class CiGateOperator(BaseOperator):
    """Resolve ``git_ref`` to a full sha and succeed only once every Actions workflow run on it has passed.

    Returns the full sha (the XCom return value). A red CI fails the task with no retry (`AirflowFailException`),
    naming the workflow and linking its run; so do a commit with no run after ``no_runs_timeout_s`` and runs still
    unfinished after ``timeout_s``. ``allowed_conclusions`` adds accepted conclusions (e.g. ``skipped``, ``neutral``).
    """

    template_fields: Sequence[str] = (
        "git_ref",
        "github_conn_id",
        "repo",
        "api_url",
        "allowed_conclusions",
        "timeout_s",
        "no_runs_timeout_s",
        "poll_interval_s",
    )
    operator_extra_links = (GitHubActionsLink(),)
    ui_color = "#e6f0ff"

    def __init__(
        self,
        *,
        git_ref: str,
        repo: str,
        api_url: str = DEFAULT_API_URL,
        github_conn_id: str = DEFAULT_CONN_ID,
        allowed_conclusions: str | Sequence[str] = (),
        timeout_s: float | str = 3600,
        no_runs_timeout_s: float | str = 600,
        poll_interval_s: float | str = 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.git_ref = git_ref
        self.repo = repo
        self.api_url = api_url
        self.github_conn_id = github_conn_id
        self.allowed_conclusions = allowed_conclusions
        self.timeout_s = timeout_s
        self.no_runs_timeout_s = no_runs_timeout_s
        self.poll_interval_s = poll_interval_s

    @classmethod
    def from_run_config(cls, config: str, **kwargs: Any) -> CiGateOperator:
        """The gate of a DAG whose resolved settings (Settings.to_dict() plus `git_ref`) are the Jinja expression
        `config`, e.g. "ti.xcom_pull(task_ids='resolve_config')". Rendered as text on purpose: native rendering
        would turn a ref such as `1.0`, `2024` or `1234567` into a number."""

        def field(expression: str) -> str:
            return "{{ " + config + expression + " }}"

        return cls(
            git_ref=field("['git_ref']"),
            repo=field("['github']['repo']"),
            api_url=field("['github']['api_url']"),
            github_conn_id=field("['github']['conn_id']"),
            allowed_conclusions=field("['github']['allowed_conclusions'] | join(',')"),
            timeout_s=field("['github']['ci_timeout_minutes'] * 60"),
            no_runs_timeout_s=field("['github']['ci_no_runs_timeout_minutes'] * 60"),
            poll_interval_s=field("['github']['ci_poll_seconds']"),
            **kwargs,
        )

    # An answer it cannot read is named here, not terminal: train retries one from the archive download.
    @fail_without_retry(GitHubResponseError)
    def execute(self, context: Context) -> str:
        allowed = parse_allowed_conclusions(self.allowed_conclusions)
        timeout_s = _seconds(self.timeout_s, "timeout_s")
        no_runs_timeout_s = _seconds(self.no_runs_timeout_s, "no_runs_timeout_s")
        configured_interval_s = _seconds(self.poll_interval_s, "poll_interval_s")
        client = GitHubClient.from_connection(self.github_conn_id, self.api_url, self.repo)
        sha = client.resolve_ref(self.git_ref)
        self.log.info("CI gate: %r in %s is commit %s", self.git_ref, self.repo, sha)
        # The instance gets the commit's tree from Airflow (it holds no GitHub credential): fail now, before
        # anything is paid for, if this connection cannot download it.
        client.check_source(sha)
        self.log.info(
            "Source: the tree of %s will be downloaded with connection %r (%s) and shipped to the instance",
            sha,
            self.github_conn_id,
            "token" if client.authenticated else "anonymous: public repositories only",
        )
        context["ti"].xcom_push(key=SHA_XCOM_KEY, value=sha)
        self.log.info("CI checks: %s", client.commit_checks_url(sha))
        sent_before = client.requests_sent
        verdict = evaluate_ci(client.list_workflow_runs(sha), allowed)
        _log_changes(self.log, verdict.runs, {})
        if verdict.state == "success":
            self.log.info("CI gate passed: %s", verdict.message)
            context["ti"].xcom_push(key=CI_PASSED_AT_KEY, value=time.time())
            return sha
        if verdict.state == "failed":
            raise AirflowFailException(f"{verdict.message} (commit {sha})")
        now = time.time()
        started = wait_started_at(context, now)
        deadline = started + timeout_s
        no_runs_deadline = started + min(no_runs_timeout_s, timeout_s)
        if verdict.state == "no_runs" and now >= no_runs_deadline:
            raise AirflowFailException(self._timeout_message(sha, NO_RUNS_MESSAGE))
        if now >= deadline:
            raise AirflowFailException(self._timeout_message(sha, f"CI did not finish in time; {verdict.message}"))
        interval_s = poll_interval_s(configured_interval_s, client.authenticated, client.requests_sent - sent_before)
        if interval_s > configured_interval_s:
            self.log.warning(
                "CI gate: connection %r has no GitHub token, and GitHub counts every anonymous request (a 304 too) "
                "against 60 an hour: polling every %.0f s instead of %.0f s to last the whole wait. For faster "
                "polls, put a token (fine-grained, read-only: actions, contents) in the connection's password",
                self.github_conn_id,
                interval_s,
                configured_interval_s,
            )
        self.log.info(
            "CI gate: %s; deferring (poll every %.0f s, %.0f s left of %.0f s)",
            verdict.message,
            interval_s,
            deadline - now,
            timeout_s,
        )
        self.defer(
            trigger=CiGateTrigger(
                conn_id=self.github_conn_id,
                api_url=self.api_url,
                repo=self.repo,
                sha=sha,
                poll_interval_s=interval_s,
                deadline=deadline,
                no_runs_deadline=no_runs_deadline,
                allowed_conclusions=sorted(allowed),
            ),
            method_name="execute_complete",
        )

    def _timeout_message(self, sha: str, message: str) -> str:
        checks = commit_checks_url(self.api_url, self.repo, sha)
        return (
            f"CI gate timed out for commit {sha} in {self.repo}: {message}. Check that the commit was pushed, "
            f"that a workflow runs on it (its 'on:' triggers) and that runners are available: {checks}; "
            "or raise timeout_s / no_runs_timeout_s"
        )

    @fail_without_retry()
    def execute_complete(self, context: Context, event: dict[str, Any]) -> str:
        status = event.get("status")
        sha = str(event.get("sha", ""))
        message = str(event.get("message", ""))
        checks = commit_checks_url(self.api_url, self.repo, sha)
        _log_changes(self.log, (WorkflowRun.from_api(run) for run in event.get("runs", [])), {})
        if status == "success":
            self.log.info("CI gate passed for %s: %s (%s)", sha, message, checks)
            context["ti"].xcom_push(key=CI_PASSED_AT_KEY, value=time.time())
            return sha
        if status in ("failed", "invalid"):
            raise AirflowFailException(f"{message} (commit {sha})")
        if status == "timeout":
            raise AirflowFailException(self._timeout_message(sha, message))
        # An API outage may pass: unlike a red CI, this honours the task's retries.
        raise GitHubError(f"CI gate could not read GitHub for commit {sha}: {message}")
