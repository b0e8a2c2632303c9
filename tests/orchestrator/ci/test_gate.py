"""The CI gate operator and trigger through real `dag.test()` runs against the GitHub stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from embedded.services.github_standin import ABSENT, GitHubStandIn
from tests.support.github_api import make_repo

REPO = "local/ec2-trainer"
TOKEN = "ghs_ci_gate_test_token_456"
BRANCHES = ("green", "pending", "red", "noruns", "slow")


@pytest.fixture(scope="module")
def shas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A repository with one commit per scenario branch."""
    path = tmp_path_factory.mktemp("repo")
    make_repo(path)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    result = {}
    for branch in BRANCHES:
        git = ["git", "-C", str(path)]
        subprocess.run([*git, "checkout", "-q", "-b", branch, "main"], check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", branch], check=True, env=env)
        out = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
        result[branch] = out.stdout.strip()
    return path, result


@pytest.fixture(scope="module")
def standin(shas: tuple[Path, dict[str, str]]) -> Iterator[GitHubStandIn]:
    with GitHubStandIn(shas[0], REPO, token=TOKEN) as server:
        yield server


@pytest.fixture
def dag(airflow_db: Path, dags_folder: Path, standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_VAR_CI_GATE_TEST_API_URL", standin.url)
    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps({"conn_type": "http", "password": TOKEN}))
    bag = DagBag(dag_folder=str(dags_folder / "ci_gate_test_dag.py"))
    assert not bag.import_errors
    return bag.get_dag("ci_gate_test")


def run_gate(dag: Any, **conf: Any) -> tuple[Any, Any]:
    dagrun = dag.test(run_conf=conf)
    return dagrun, dagrun.get_task_instance("ci_gate")


def xcom(ti: Any, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, key=key)
            .one_or_none()
        )
        return None if row is None else XComModel.deserialize_value(row)


def output(capfd: pytest.CaptureFixture[str]) -> str:
    """What the run logged: Airflow's structlog writes task, trigger and DAG-test logs to stdout/stderr."""
    captured = capfd.readouterr()
    return captured.out + captured.err


def runs_polls(standin: GitHubStandIn) -> int:
    return standin.request_count(f"/repos/{REPO}/actions/runs")


def test_green_at_once(dag: Any, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]) -> None:
    sha = shas[1]["green"]
    # A run recorded from the real API in 2020-2021 has no name: it is read, not "malformed".
    legacy = {"name": ABSENT, "path": ".github/workflows/lint.yml", "workflow_id": 2}
    standin.set_runs(sha, [{"name": "CI"}, legacy])
    before = runs_polls(standin)
    dagrun, ti = run_gate(dag, git_ref="green")
    assert dagrun.state == "success"
    assert ti.state == "success"
    assert runs_polls(standin) - before == 1
    assert xcom(ti, "return_value") == sha
    assert xcom(ti, "_link_GitHubActionsLink") == f"{standin.url}/{REPO}/commit/{sha}/checks"


def test_pending_then_green_defers_and_completes(
    dag: Any, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]], capfd: pytest.CaptureFixture[str]
) -> None:
    sha = shas[1]["pending"]
    standin.script(
        sha,
        [
            [{"status": None}, {"name": None, "path": ABSENT, "workflow_id": 2, "status": "queued"}],
            [{"status": "in_progress"}, {"name": "Lint", "workflow_id": 2, "conclusion": "skipped"}],
            [{"conclusion": "success"}, {"name": "Lint", "workflow_id": 2, "conclusion": "skipped"}],
        ],
    )
    before = runs_polls(standin)
    dagrun, ti = run_gate(dag, git_ref=sha[:12], allowed_conclusions="skipped")
    out = output(capfd)
    assert dagrun.state == "success"
    # One check in execute, then the trigger polled until green: the wait went through the deferral.
    assert runs_polls(standin) - before == 3
    assert xcom(ti, "return_value") == sha
    assert "workflow 'CI' (attempt 1): -/-" in out
    assert "workflow 'workflow 2' (attempt 1): queued/-" in out
    assert TOKEN not in out


def test_red_fails_naming_the_workflow(
    dag: Any, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]], capfd: pytest.CaptureFixture[str]
) -> None:
    sha = shas[1]["red"]
    standin.script(
        sha,
        [
            [{"status": "in_progress"}, {"name": "GPU smoke", "workflow_id": 7, "status": "queued"}],
            [{"status": "in_progress"}, {"name": "GPU smoke", "workflow_id": 7, "conclusion": "failure"}],
        ],
    )
    dagrun, ti = run_gate(dag, git_ref="red")
    out = output(capfd)
    assert dagrun.state == "failed"
    assert ti.state == "failed"
    assert "workflow 'GPU smoke' completed/failure" in out
    assert f"{standin.url}/{REPO}/actions/runs/" in out
    assert TOKEN not in out


def test_already_red_fails_without_deferring(
    dag: Any, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]], capfd: pytest.CaptureFixture[str]
) -> None:
    sha = shas[1]["slow"]
    standin.set_runs(sha, [{"name": "Tests", "conclusion": "startup_failure"}])
    before = runs_polls(standin)
    dagrun, _ = run_gate(dag, git_ref="slow")
    out = output(capfd)
    assert dagrun.state == "failed"
    assert runs_polls(standin) - before == 1
    assert "workflow 'Tests' completed/startup_failure" in out


def test_no_runs_times_out(
    dag: Any, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]], capfd: pytest.CaptureFixture[str]
) -> None:
    standin.set_runs(shas[1]["noruns"], [])
    dagrun, _ = run_gate(dag, git_ref="noruns", no_runs_timeout_s=1)
    out = output(capfd)
    assert dagrun.state == "failed"
    assert "no GitHub Actions workflow run appeared" in out
    assert "Check that the commit was pushed" in out


def test_unknown_branch_fails_with_a_clear_message(dag: Any, capfd: pytest.CaptureFixture[str]) -> None:
    dagrun, _ = run_gate(dag, git_ref="not-pushed-yet")
    out = output(capfd)
    assert dagrun.state == "failed"
    assert "branch or commit 'not-pushed-yet' not found in local/ec2-trainer: push it first" in out


def collect_events(trigger: Any) -> list[Any]:
    async def run() -> list[Any]:
        return [event async for event in trigger.run()]

    return asyncio.run(run())


@pytest.fixture
def conn_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps({"conn_type": "http", "password": TOKEN}))


def trigger_for(standin: GitHubStandIn, sha: str, **overrides: Any) -> Any:
    from orchestrator.ci.gate import CiGateTrigger

    now = time.time()
    args: dict[str, Any] = {
        "conn_id": "github_ci_gate_test",
        "api_url": standin.url,
        "repo": REPO,
        "sha": sha,
        "poll_interval_s": 0.05,
        "deadline": now + 10,
        "no_runs_deadline": now + 10,
        "allowed_conclusions": [],
    }
    args.update(overrides)
    return CiGateTrigger(**args)


def test_trigger_serializes_without_secrets(standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]) -> None:
    from airflow.sdk.module_loading import import_string

    trigger = trigger_for(standin, shas[1]["green"], allowed_conclusions=["skipped"])
    classpath, kwargs = trigger.serialize()
    assert classpath == "orchestrator.ci.gate.CiGateTrigger"
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)
    assert TOKEN not in json.dumps(kwargs)


def test_trigger_times_out_while_runs_stay_pending(airflow_db: Path, conn_env: None, standin: GitHubStandIn) -> None:
    sha = "4" * 40
    standin.set_runs(sha, [{"name": "Long", "status": "in_progress"}])
    (event,) = collect_events(trigger_for(standin, sha, deadline=time.time() + 0.3))
    assert event.payload["status"] == "timeout"
    assert "CI did not finish in time; waiting for 1 of 1 workflow(s): 'Long' in_progress" in event.payload["message"]
    assert event.payload["runs"][0]["name"] == "Long"


def test_trigger_reports_a_malformed_answer_as_final(airflow_db: Path, conn_env: None, standin: GitHubStandIn) -> None:
    standin.malformed_next(payload={"message": "this is not the runs API"})
    (event,) = collect_events(trigger_for(standin, "5" * 40))
    assert event.payload["status"] == "invalid"
    assert "has no 'workflow_runs' list" in event.payload["message"]


def test_trigger_green_rerun_of_an_older_run_decides(airflow_db: Path, conn_env: None, standin: GitHubStandIn) -> None:
    sha = "6" * 40
    # Run 9 failed, run 10 of the same workflow (created later) failed, then run 9 was re-run and passed.
    standin.set_runs(
        sha,
        [
            {"id": 9, "run_attempt": 2, "created_at": "2024-05-01T10:00:00Z", "run_started_at": "2024-05-01T12:00:00Z"},
            {"id": 10, "created_at": "2024-05-01T11:00:00Z", "conclusion": "failure"},
        ],
    )
    (event,) = collect_events(trigger_for(standin, sha))
    assert event.payload["status"] == "success"
    assert [(r["id"], r["run_attempt"]) for r in event.payload["runs"]] == [(9, 2)]


def test_trigger_first_poll_waits_one_interval(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator has just checked when the trigger starts: polling again at once wastes a request."""
    sha = "8" * 40
    standin.script(sha, [[{"status": "in_progress"}], [{"conclusion": "success"}]])
    polls_at_each_sleep: list[tuple[int, float]] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        polls_at_each_sleep.append((runs_polls(standin), seconds))
        await real_sleep(0)

    monkeypatch.setattr("orchestrator.ci.gate.asyncio.sleep", sleep)
    before = runs_polls(standin)
    (event,) = collect_events(trigger_for(standin, sha, poll_interval_s=30, deadline=time.time() + 3600))
    assert event.payload["status"] == "success"
    assert polls_at_each_sleep == [(before, 30), (before + 1, 30)]


def test_polling_an_unchanged_commit_costs_one_request_of_the_budget(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn
) -> None:
    sha = "9" * 40
    polls = 6
    standin.script(sha, [[{"id": 5, "status": "in_progress"}]] * polls + [[{"id": 5, "conclusion": "success"}]])
    used_before = standin.rate_used()
    (event,) = collect_events(trigger_for(standin, sha, poll_interval_s=0.01))
    assert event.payload["status"] == "success"
    served = standin.served(f"/repos/{REPO}/actions/runs")[-(polls + 1) :]
    assert [s.status for s in served] == [200] + [304] * (polls - 1) + [200]
    # With a token, the five 304s were free: the whole wait cost two requests of the hourly budget.
    assert standin.rate_used() - used_before == 2


def execute_gate(standin: GitHubStandIn, sha: str, started: datetime, **kwargs: Any) -> Any:
    from orchestrator.ci.gate import CiGateOperator

    operator = CiGateOperator(
        task_id="ci_gate",
        git_ref=sha,
        repo=REPO,
        api_url=standin.url,
        github_conn_id="github_ci_gate_test",
        timeout_s=3600,
        no_runs_timeout_s=600,
        poll_interval_s=30,
        **kwargs,
    )
    context = {"ti": SimpleNamespace(xcom_push=lambda **_: None), "dag_run": SimpleNamespace(start_date=started)}
    return operator.execute(context)  # type: ignore[arg-type]


def test_a_retry_keeps_the_first_tries_deadline(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    sha = shas[1]["slow"]
    standin.set_runs(sha, [{"name": "Long", "status": "in_progress"}])
    started = datetime.now(UTC) - timedelta(minutes=50)
    with pytest.raises(TaskDeferred) as deferred:
        execute_gate(standin, sha, started)
    trigger = deferred.value.trigger
    assert trigger.deadline == started.timestamp() + 3600
    assert trigger.no_runs_deadline == started.timestamp() + 600


def test_a_retry_after_the_deadline_fails_at_once(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    sha = shas[1]["slow"]
    standin.set_runs(sha, [{"name": "Long", "status": "in_progress"}])
    started = datetime.now(UTC) - timedelta(minutes=61)
    with pytest.raises(AirflowFailException, match=r"timed out .* CI did not finish in time; waiting for 1 of 1"):
        execute_gate(standin, sha, started)


def test_a_malformed_answer_fails_without_retry(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.ci.gate import CiGateOperator

    standin.malformed_next(
        payload={"total_count": 1, "workflow_runs": [{"id": 1, "status": "completed"}]},
        path=f"/repos/{REPO}/actions/runs",
    )
    with pytest.raises(AirflowFailException, match=r"workflow run this gate cannot read: .* 'workflow_id' is missing"):
        execute_gate(standin, shas[1]["slow"], datetime.now(UTC))
    operator = CiGateOperator(task_id="t", git_ref="main", repo=REPO)
    with pytest.raises(AirflowFailException, match="cannot read"):
        operator.execute_complete({}, {"status": "invalid", "sha": "a" * 40, "message": "cannot read"})  # type: ignore[arg-type]


def test_trigger_missing_connection_is_an_error_event(airflow_db: Path, standin: GitHubStandIn) -> None:
    (event,) = collect_events(trigger_for(standin, "7" * 40, conn_id="no_such_conn_xyz"))
    assert event.payload["status"] == "error"
    assert "cannot read connection 'no_such_conn_xyz'" in event.payload["message"]


@pytest.mark.parametrize("runs", [1, 230])
def test_an_anonymous_60_minute_wait_stays_within_githubs_60_requests_an_hour(
    airflow_db: Path,
    shas: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    runs: int,
) -> None:
    """The whole CI timeout polled without a token, on an injected clock: every request (304s and pages too) counted
    by a stand-in that charges anonymous requests as GitHub does, with the gate's first two requests on top."""
    from types import SimpleNamespace

    from orchestrator.ci.github_protocol import ANONYMOUS_REQUESTS_PER_HOUR, poll_interval_s

    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps({"conn_type": "http"}))
    clock = [1_000_000.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr("orchestrator.ci.gate.asyncio.sleep", sleep)
    monkeypatch.setattr("orchestrator.ci.gate.time", SimpleNamespace(time=lambda: clock[0]))
    sha = "7" * 40
    with GitHubStandIn(shas[0], REPO) as anonymous:
        anonymous.set_runs(sha, [{"name": f"CI {i}", "status": "in_progress"} for i in range(runs)])
        # The operator's resolve and first listing, before it defers.
        gate_requests = 1 + -(-runs // 100)
        start = clock[0]
        trigger = trigger_for(
            anonymous,
            sha,
            poll_interval_s=poll_interval_s(30, False, gate_requests - 1),
            deadline=start + 3600,
            no_runs_deadline=start + 600,
        )
        (event,) = collect_events(trigger)
        used = anonymous.rate_used(authenticated=False)
    assert event.payload["status"] == "timeout", event.payload["message"]
    assert clock[0] - start >= 3600
    assert 0 < used + gate_requests <= ANONYMOUS_REQUESTS_PER_HOUR


def test_anonymous_gate_warns_once_and_defers_with_a_budget_interval(
    airflow_db: Path,
    shas: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps({"conn_type": "http"}))
    sha = shas[1]["slow"]
    with GitHubStandIn(shas[0], REPO) as anonymous:
        anonymous.set_runs(sha, [{"name": f"CI {i}", "status": "in_progress"} for i in range(230)])
        with pytest.raises(TaskDeferred) as deferred:
            execute_gate(anonymous, sha, datetime.now(UTC))
    # Three pages a poll, 45 requests an hour for polling: one poll every 240 s, not the configured 30 s.
    assert deferred.value.trigger.poll_interval_s == 240
    logged = output(capfd) + caplog.text
    assert logged.count("has no GitHub token") == 1
    assert "polling every 240 s instead of 30 s" in logged
    assert "put a token (fine-grained, read-only: actions, contents) in the connection's password" in logged


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ({"conn_type": "http"}, r"cannot be read .* anonymously .* a fine-grained token with 'contents: read'"),
        ({"conn_type": "http", "password": "ghp_wrong"}, r"\(401\): the token .* is wrong, expired or revoked"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_a_private_repository_the_connection_cannot_read_fails_the_gate_at_once(
    airflow_db: Path,
    standin: GitHubStandIn,
    shas: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    conn: dict[str, str],
    expected: str,
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps(conn))
    before = runs_polls(standin)
    # AirflowFailException: no retry, nothing launched after it; CI was not even polled.
    with pytest.raises(AirflowFailException, match=expected) as failed:
        execute_gate(standin, "green", datetime.now(UTC))
    assert "ghp_wrong" not in str(failed.value)
    assert runs_polls(standin) == before


def test_the_gate_checks_that_the_commits_tree_can_be_downloaded(
    airflow_db: Path, conn_env: None, standin: GitHubStandIn, shas: tuple[Path, dict[str, str]]
) -> None:
    sha = shas[1]["green"]
    before = standin.request_count(f"/repos/{REPO}/tarball/{sha}")
    assert execute_gate(standin, sha, datetime.now(UTC)) == sha
    assert standin.request_count(f"/repos/{REPO}/tarball/{sha}") == before + 1
    # Only the redirect was read: the archive is downloaded by train, not by the gate.
    assert standin.served_prefix("/_codeload/") == []
