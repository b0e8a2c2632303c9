"""EC2 faults, answered by the moto server as EC2 answers them (error code and HTTP status): botocore retries them
inside each call, a bounded number of HTTP attempts, and nothing retries around it."""

from __future__ import annotations

from typing import Any

import pytest

from embedded.deploy.stack import EmbeddedStack
from orchestrator.config.connections import AWS_RETRIES
from tests.support.aws_cloud import http_errors
from tests.support.faults import DagRunFaults
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow


def run_with_http_errors(
    monkeypatch: pytest.MonkeyPatch, dag_faults: DagRunFaults, *errors: tuple[str, str, int, int | None], **conf: Any
) -> tuple[list[list[int]], Any, str]:
    """A training DAG run while each (action, code, status, failures) of `errors` fails as `http_errors` makes it:
    the statuses each action's requests got, the run, its log. The errors are undone when the run ends: the checks
    after it describe instances themselves (and the SSH recorder stays installed)."""
    with monkeypatch.context() as patched:
        sent = [http_errors(patched, *error) for error in errors]
        dag_run = run_dag(**conf)
        log = dag_faults.log()
    return sent, dag_run, log


def test_throttling_and_a_failed_terminate_are_retried_inside_botocore(
    env: EmbeddedStack,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    dag_faults: DagRunFaults,
) -> None:
    # The first requests of each API fail; the emulator itself never calls these three, so every one is the pipeline's.
    (run, describe, terminate), dag_run, log = run_with_http_errors(
        monkeypatch,
        dag_faults,
        ("RunInstances", "RequestLimitExceeded", 503, 2),
        ("DescribeInstances", "RequestLimitExceeded", 503, 2),
        ("TerminateInstances", "InternalError", 500, 1),
        git_ref=sha,
    )

    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert set(states.values()) == {"success"}
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 1 and tis["terminate"].try_number == 1, "retried inside the calls"
    assert run == [503, 503, 200], "two throttled RunInstances requests, then exactly one launch"
    assert describe[:3] == [503, 503, 200]
    assert terminate[:2] == [500, 200]
    (instance_id,) = assert_all_terminated(env, dag_run, 1)
    assert f"launched instance {instance_id}" in log
    assert f"Instance {instance_id}: terminated" in log
    dag_faults.record(
        dag_run,
        log,
        "EC2 RunInstances x2 + DescribeInstances x2 throttled (503), TerminateInstances x1 InternalError (500)",
        "retried inside botocore; 1 instance, terminated; run succeeds",
        f"HTTP requests run={run} terminate={terminate[:2]}; describe {len(describe)}; launch and terminate try 1; "
        "run success",
    )


def test_throttling_that_never_ends_is_bounded_and_launches_nothing(
    env: EmbeddedStack,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    dag_faults: DagRunFaults,
) -> None:
    (run,), dag_run, log = run_with_http_errors(
        monkeypatch, dag_faults, ("RunInstances", "RequestLimitExceeded", 503, None), git_ref=sha
    )

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["launch"] == "failed" and states["terminate"] == "success"
    tries = {ti.task_id: ti for ti in dag_run.get_task_instances()}["launch"].try_number
    # Each task try makes one RunInstances call of at most AWS_RETRIES attempts (the old nested loops: 18 per call).
    assert len(run) == tries * AWS_RETRIES["total_max_attempts"] == 3 * 5
    assert "RequestLimitExceeded: injected RequestLimitExceeded" in log, "the failure keeps EC2's reason"
    assert_all_terminated(env, dag_run, 0)
    dag_faults.record(
        dag_run,
        log,
        "EC2 RunInstances throttled (503) on every request",
        "bounded: launch fails after its tries x the client's attempts; nothing launched",
        f"{len(run)} HTTP requests = {tries} launch tries x {AWS_RETRIES['total_max_attempts']} attempts; "
        "error names RequestLimitExceeded; 0 instances; run failed",
    )
