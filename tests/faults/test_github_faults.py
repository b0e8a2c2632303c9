"""GitHub faults: 5xx bursts and rate limits are waited out; malformed answers (failing without retry), commits with no
runs and re-runs are decided clearly.

The burst runs the whole training DAG; the other cases need only the CI gate, so they run the gate's test DAG
(tests/dag_fixtures/ci_gate_test_dag.py, no retries) against the same GitHub stand-in: nothing can be launched there.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from embedded.deploy.stack import GITHUB_REPO, EmbeddedStack
from embedded.services.github_standin import ABSENT
from tests.support.faults import DagRunFaults
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow

GREEN = [{"name": "CI", "status": "completed", "conclusion": "success"}]
# The client's back-off before each retry of a 5xx: 2 s, 4 s, 8 s.
BURST_BACKOFF_S = 2 + 4 + 8


@pytest.fixture
def gate(env: EmbeddedStack, dags_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CI gate's test DAG, pointed at the embedded stack's GitHub stand-in."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_VAR_CI_GATE_TEST_API_URL", env.github_url)
    monkeypatch.setenv(
        "AIRFLOW_CONN_GITHUB_CI_GATE_TEST", json.dumps({"conn_type": "http", "password": env.github_token})
    )
    bag = DagBag(dag_folder=str(dags_folder / "ci_gate_test_dag.py"))
    assert not bag.import_errors
    return bag.get_dag("ci_gate_test")


def run_gate(gate: Any, dag_faults: DagRunFaults, state: str, **conf: Any) -> tuple[Any, str]:
    """One run of the gate's test DAG, ending in `state` as its only task does, with nothing launched; and its log."""
    dag_run = gate.test(run_conf=conf)
    log = dag_faults.log()
    assert (dag_run.state, task_states(dag_run)) == (state, {"ci_gate": state})
    assert_all_terminated(dag_faults.stack, dag_run, 0)
    return dag_run, log


@pytest.fixture
def scripted(env: EmbeddedStack, sha: str) -> Any:
    """The stand-in's runs for HEAD, restored to one green run afterwards (other tests train HEAD)."""
    yield env.github
    env.github.set_runs(sha, GREEN)


def test_5xx_burst_and_rate_limit_are_waited_out(
    env: EmbeddedStack,
    sha: str,
    dag_faults: DagRunFaults,
) -> None:
    commits = f"/repos/{GITHUB_REPO}/commits/{sha}"
    before = env.github.request_count(commits)
    env.github.fail_next(3, 502)

    def rate_limit_after_the_first_502() -> None:
        # Timed from the burst's first request, the reset falls about 2 s after the burst's back-off ends.
        deadline = time.monotonic() + 120
        while env.github.request_count(commits) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        env.github.rate_limit_next(BURST_BACKOFF_S + 2)

    limiter = threading.Thread(target=rate_limit_after_the_first_502, daemon=True)
    limiter.start()
    dag_run = run_dag(git_ref=sha)
    limiter.join(timeout=5)
    log = dag_faults.log()

    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert set(states.values()) == {"success"}
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["ci_gate"].try_number == 1, "the client waits the faults out inside one try"
    assert env.github.request_count(commits) - before == 5  # 3 x 502, 1 x 403, then the answer
    assert set(re.findall(r"HTTP 502 on GET \S+; retry (\d+)/", log)) == {"1", "2", "3"}
    waits = sorted(set(re.findall(r"rate limited \(HTTP 403\) on GET \S+; retry \d+/\d+ in ([\d.]+) s", log)))
    assert len(waits) == 1, f"the rate limit was not logged once: {waits}"
    assert 1.0 <= float(waits[0]) <= 5.0, f"waited {waits[0]} s for a reset ~2 s away"
    assert_all_terminated(env, dag_run, 1)
    dag_faults.record(
        dag_run,
        log,
        "GitHub 502 x3 then rate limit (DAG)",
        "gate retries, waits for the reset, run succeeds",
        f"3 retries (2+4+8 s back-off), waited {float(waits[0]):.1f} s for the reset; ci_gate try 1; run success",
    )


def test_malformed_answer_fails_the_gate_clearly_without_retry(
    env: EmbeddedStack,
    gate: Any,
    sha: str,
    dag_faults: DagRunFaults,
) -> None:
    runs_path = f"/repos/{GITHUB_REPO}/actions/runs"
    # A run without the workflow_id GitHub always sends: something else answers at api_url.
    env.github.malformed_next(payload={"total_count": 1, "workflow_runs": [{"id": 1}]}, path=runs_path)
    before = env.github.request_count(runs_path)
    dag_run, log = run_gate(gate, dag_faults, "failed", git_ref=sha)

    assert "GitHub answered a workflow run this gate cannot read" in log
    assert "'workflow_id' is missing" in log
    assert "check that api_url points at the GitHub REST API" in log
    assert env.github.request_count(runs_path) - before == 1, "the same answer was asked for again"
    assert "AirflowFailException" in log, "a malformed answer must fail without the task's retries"
    dag_faults.record(
        dag_run,
        log,
        "GitHub answers a run without workflow_id (gate DAG)",
        "clear error, gate fails without retry, nothing launched",
        "ci_gate failed at once: 'workflow run this gate cannot read ... check api_url'; 1 request; 0 instances",
    )


def test_commit_without_workflow_runs_fails_after_the_no_runs_timeout(
    gate: Any,
    sha: str,
    scripted: Any,
    dag_faults: DagRunFaults,
) -> None:
    scripted.set_runs(sha, [])
    started = time.monotonic()
    dag_run, log = run_gate(gate, dag_faults, "failed", git_ref=sha, no_runs_timeout_s=2)
    elapsed = time.monotonic() - started

    assert "no GitHub Actions workflow run appeared for this commit" in log
    assert elapsed < 30, f"the 2 s no-runs timeout took {elapsed:.0f} s"
    dag_faults.record(
        dag_run,
        log,
        "commit with no workflow runs (gate DAG, 2 s)",
        "fails 'no workflow run', nothing launched",
        f"ci_gate failed after {elapsed:.0f} s: 'no ... workflow run appeared'",
    )


def test_green_rerun_of_an_older_run_decides_over_a_newer_red_run(
    gate: Any,
    sha: str,
    scripted: Any,
    dag_faults: DagRunFaults,
) -> None:
    scripted.set_runs(
        sha,
        [
            # Run 4242 failed, run 4243 of the same workflow (created later) failed, then 4242 was re-run and
            # passed: GitHub lists 4242 once, at attempt 2, with its first attempt's created_at.
            {
                "id": 4242,
                "workflow_id": 7,
                "run_attempt": 2,
                "created_at": "2024-05-01T10:00:00Z",
                "run_started_at": "2024-05-01T12:00:00Z",
            },
            {"id": 4243, "workflow_id": 7, "created_at": "2024-05-01T11:00:00Z", "conclusion": "failure"},
            # A second workflow recorded the way the 2020-2021 API answered: no name.
            {"id": 4244, "workflow_id": 8, "name": ABSENT, "path": ".github/workflows/lint.yml"},
        ],
    )
    dag_run, log = run_gate(gate, dag_faults, "success", git_ref=sha)

    assert dag_run.get_task_instance("ci_gate").xcom_pull(task_ids="ci_gate") == sha
    assert "CI gate passed: all 2 workflow(s) passed" in log
    assert "workflow 'CI' (attempt 2): completed/success" in log
    assert "workflow 'lint.yml' (attempt 1): completed/success" in log
    assert "completed/failure" not in log, "the older attempt's newer sibling must not decide"
    dag_faults.record(
        dag_run,
        log,
        "re-run of an older run passed after a newer run failed; an unnamed run (gate DAG)",
        "the latest attempt decides: gate passes",
        "ci_gate success on run 4242 attempt 2; run 4243 (red, created later) ignored; unnamed run read",
    )
