"""wait_ready when its wait ends without a ready instance (instance.operators.InstanceReadyOperator._not_ready): EC2
took the spot instance back (a new one is made ready), it still runs after SSH was lost for a while (the wait goes on
from the log offset it reached, within the same deadline), or it ended any other way (the run fails naming its end).
EC2's answer is stubbed; the recovery itself is tested in test_recovery.py and, end to end, in tests/faults."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from orchestrator.cloud.ec2_describe import InstanceInfo
from orchestrator.config.settings import load_settings
from orchestrator.contracts import RUNNING_KEY
from orchestrator.instance.operators import InstanceReadyOperator
from orchestrator.instance.ssh import InstanceUnreachableError
from tests.support.step_results import LAUNCHED, READY, RUNNING

UNREACHABLE = {"status": "unreachable", "message": "SSH to 10.0.0.1 has failed for 30 s", "log_offset": 123}


class _Ti:
    def __init__(self, pushed: dict[str, Any]) -> None:
        self.pushed = pushed

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        return self.pushed.get(key)


def state(name: str, reason: str | None = None) -> InstanceInfo:
    return InstanceInfo(
        LAUNCHED["instance_id"],
        name,
        "g6.xlarge",
        None,
        None,
        None,
        state_reason=f"{reason}: as EC2 says it" if reason else None,
        state_reason_code=reason,
        market="spot",
    )


@pytest.fixture
def ec2_says(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set what EC2 says of the instance; returns the instances `recover` was asked to replace."""
    from orchestrator.cloud import tasks
    from orchestrator.instance import postmortem, recovery

    answer: list[InstanceInfo] = []
    recovered: list[str] = []

    def recover(s: Any, ti: Any, lost: InstanceInfo, *_: Any) -> Any:
        from orchestrator.contracts_steps import ReadyInstance

        recovered.append(lost.instance_id)
        return ReadyInstance.from_xcom({**READY, "instance_id": "i-0relaunched"})

    monkeypatch.setattr(tasks, "instance_state", lambda *_: answer[-1])
    monkeypatch.setattr(recovery, "recover", recover)
    monkeypatch.setattr(postmortem, "for_run", lambda *_, **__: {})

    def says(info: InstanceInfo) -> list[str]:
        answer.append(info)
        return recovered

    return says


def operator(deferrable: bool = True) -> InstanceReadyOperator:
    config = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"}).to_dict()
    config["training"]["deferrable"] = deferrable
    return InstanceReadyOperator(task_id="wait_ready", config=config, launched=LAUNCHED)


def test_an_instance_that_still_runs_is_waited_on_from_the_log_offset_within_the_same_deadline(ec2_says: Any) -> None:
    recovered = ec2_says(state("running"))
    with pytest.raises(TaskDeferred) as deferred:
        operator().execute_complete({"ti": _Ti({RUNNING_KEY: RUNNING})}, UNREACHABLE)
    trigger = deferred.value.trigger
    assert (trigger.log_offset, trigger.started_at, trigger.deadline) == (
        123,
        RUNNING["started_at"],
        RUNNING["deadline"],
    )
    assert recovered == []


def test_a_spot_instance_ec2_took_back_is_replaced(ec2_says: Any) -> None:
    recovered = ec2_says(state("terminated", "Server.SpotInstanceTermination"))
    ready = operator().execute_complete({"ti": _Ti({RUNNING_KEY: RUNNING})}, UNREACHABLE)
    assert ready["instance_id"] == "i-0relaunched" and recovered == [LAUNCHED["instance_id"]]


@pytest.mark.parametrize(
    "event",
    [UNREACHABLE, {"status": "timeout", "message": "Bootstrap wrote no marker within 600s"}],
    ids=["unreachable", "timeout"],
)
def test_an_instance_ended_any_other_way_fails_the_run_naming_its_end(ec2_says: Any, event: dict[str, Any]) -> None:
    recovered = ec2_says(state("terminated", "Client.UserInitiatedShutdown"))
    with pytest.raises(
        AirflowFailException, match=r"terminated \(Client.UserInitiatedShutdown.*ended before it was ready"
    ):
        operator().execute_complete({"ti": _Ti({RUNNING_KEY: RUNNING})}, event)
    assert recovered == []


def test_a_timeout_on_a_running_instance_fails_rather_than_waiting_past_its_deadline(ec2_says: Any) -> None:
    ec2_says(state("running"))
    with pytest.raises(AirflowFailException, match="wrote no marker"):
        operator().execute_complete(
            {"ti": _Ti({RUNNING_KEY: RUNNING})}, {"status": "timeout", "message": "Bootstrap wrote no marker"}
        )


def test_in_a_worker_a_spot_instance_lost_during_the_bootstrap_is_replaced(
    ec2_says: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cloud import tasks
    from orchestrator.contracts_steps import RunningInstance
    from orchestrator.instance import ready

    def unreachable(*_: Any) -> Any:
        raise InstanceUnreachableError("SSH to 10.0.0.1 has failed for 30 s during the bootstrap", 7)

    monkeypatch.setattr(tasks, "wait_running", lambda *_: RunningInstance.from_xcom(RUNNING))
    monkeypatch.setattr(ready, "wait_ready_in_worker", unreachable)
    recovered = ec2_says(state("terminated", "Server.SpotInstanceTermination"))
    assert operator(deferrable=False).execute({"ti": _Ti({})})["instance_id"] == "i-0relaunched"
    assert recovered == [LAUNCHED["instance_id"]]
