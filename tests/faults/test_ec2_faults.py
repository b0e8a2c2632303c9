"""EC2 faults, injected server-side in the moto backend: throttling and a failed terminate are retried."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from embedded.stack import EmbeddedStack
from tests.fault_table import FaultTable
from tests.faults.support import output, record_run
from tests.pipeline_fixtures import ProcessListSampler, assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow


def test_throttling_and_a_failed_terminate_are_retried(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    processes: ProcessListSampler,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend

    calls: collections.Counter[str] = collections.Counter()
    # The first calls of each API fail; the emulator itself never calls these three, so every call is the pipeline's.
    faults = {
        "run_instances": (2, "RequestLimitExceeded", "Request limit exceeded."),
        "describe_instances": (2, "RequestLimitExceeded", "Request limit exceeded."),
        "terminate_instances": (1, "InternalError", "An internal error has occurred."),
    }

    def faulty(name: str, failures: int, code: str, message: str) -> Any:
        original = getattr(EC2Backend, name)

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if calls[name] <= failures:
                raise EC2ClientError(code, message)
            return original(self, *args, **kwargs)

        return call

    for name, (failures, code, message) in faults.items():
        monkeypatch.setattr(EC2Backend, name, faulty(name, failures, code, message))
    dag_run = run_dag(git_ref=sha)
    log = output(capfd, caplog)
    monkeypatch.undo()  # the checks below describe instances themselves

    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert set(states.values()) == {"success"}
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 1 and tis["terminate"].try_number == 1, "retried inside the calls"
    assert calls["run_instances"] == 3, "two throttled RunInstances, then exactly one launch"
    assert calls["describe_instances"] >= 3
    assert calls["terminate_instances"] >= 2
    assert "EC2 answered InternalError (attempt 1/6); retrying" in log
    (instance_id,) = assert_all_terminated(env, dag_run, 1)
    assert f"launched instance {instance_id}" in log
    assert f"Instance {instance_id}: terminated" in log
    record_run(
        fault_table,
        "EC2 RunInstances x2 + DescribeInstances x2 throttled, TerminateInstances x1 InternalError",
        "retried; 1 instance, terminated; run succeeds",
        f"calls run={calls['run_instances']} describe={calls['describe_instances']} "
        f"terminate={calls['terminate_instances']}; throttles retried inside botocore (not logged), "
        "InternalError retried and logged by the orchestrator; run success",
        stack=env,
        dag_run=dag_run,
        planted=planted,
        log=log,
        processes=processes,
    )
