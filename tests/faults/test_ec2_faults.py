"""EC2 faults, answered by the moto server as EC2 answers them (error code and HTTP status): botocore retries them
inside each call, a bounded number of HTTP attempts, and nothing retries around it."""

from __future__ import annotations

import pytest

from embedded.deploy.stack import EmbeddedStack
from orchestrator.config.connections import AWS_RETRIES
from tests.support.aws_cloud import http_errors
from tests.support.fault_table import FaultTable
from tests.support.faults import output, record_run
from tests.support.pipeline import ProcessListSampler, assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow


def test_throttling_and_a_failed_terminate_are_retried_inside_botocore(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    processes: ProcessListSampler,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    # The first requests of each API fail; the emulator itself never calls these three, so every one is the pipeline's.
    # Only for the run: the checks below describe instances themselves (and the SSH recorder stays installed).
    with monkeypatch.context() as faults:
        run = http_errors(faults, "RunInstances", "RequestLimitExceeded", 503, failures=2)
        describe = http_errors(faults, "DescribeInstances", "RequestLimitExceeded", 503, failures=2)
        terminate = http_errors(faults, "TerminateInstances", "InternalError", 500, failures=1)
        dag_run = run_dag(git_ref=sha)
        log = output(capfd, caplog)

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
    record_run(
        fault_table,
        "EC2 RunInstances x2 + DescribeInstances x2 throttled (503), TerminateInstances x1 InternalError (500)",
        "retried inside botocore; 1 instance, terminated; run succeeds",
        f"HTTP requests run={run} terminate={terminate[:2]}; describe {len(describe)}; launch and terminate try 1; "
        "run success",
        stack=env,
        dag_run=dag_run,
        planted=planted,
        log=log,
        processes=processes,
    )


def test_throttling_that_never_ends_is_bounded_and_launches_nothing(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    processes: ProcessListSampler,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    with monkeypatch.context() as faults:
        run = http_errors(faults, "RunInstances", "RequestLimitExceeded", 503)
        dag_run = run_dag(git_ref=sha)
        log = output(capfd, caplog)

    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["launch"] == "failed" and states["terminate"] == "success"
    tries = {ti.task_id: ti for ti in dag_run.get_task_instances()}["launch"].try_number
    # Each task try makes one RunInstances call of at most AWS_RETRIES attempts (the old nested loops: 18 per call).
    assert len(run) == tries * AWS_RETRIES["total_max_attempts"] == 3 * 5
    assert "RequestLimitExceeded: injected RequestLimitExceeded" in log, "the failure keeps EC2's reason"
    assert_all_terminated(env, dag_run, 0)
    record_run(
        fault_table,
        "EC2 RunInstances throttled (503) on every request",
        "bounded: launch fails after its tries x the client's attempts; nothing launched",
        f"{len(run)} HTTP requests = {tries} launch tries x {AWS_RETRIES['total_max_attempts']} attempts; "
        "error names RequestLimitExceeded; 0 instances; run failed",
        stack=env,
        dag_run=dag_run,
        planted=planted,
        log=log,
        processes=processes,
    )
