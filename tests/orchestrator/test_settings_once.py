"""One settings object per task (issue 20): wait_ready validates its settings once, whichever path it takes, and
passes them down to the steps rather than each step building them again from the config."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.cloud.ec2_describe import InstanceInfo
from orchestrator.config.settings import Settings, load_settings
from orchestrator.contracts import RUNNING_KEY
from orchestrator.instance.operators import InstanceReadyOperator
from orchestrator.instance.ssh import SshTimeoutError
from tests.support.step_results import LAUNCHED, RUNNING


class _Ti:
    """The task instance as wait_ready uses it: its own XComs, pushed and pulled back."""

    def __init__(self, pushed: dict[str, Any]) -> None:
        self.pushed = pushed

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        return self.pushed.get(key)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every Settings built from a config from now on (settings_of builds through Settings.from_dict), around an
    instance that runs and answers."""
    from orchestrator.cloud import ec2, ec2_describe
    from orchestrator.config import connections
    from orchestrator.instance import postmortem, ssh

    found: list[Any] = []
    from_dict = Settings.from_dict

    def counting(cls: type[Settings], data: Any) -> Settings:
        found.append(data)
        return from_dict(data)

    monkeypatch.setattr(Settings, "from_dict", classmethod(counting))
    # The instance runs and answers, its bootstrap succeeds; nothing reaches AWS or a host.
    info = InstanceInfo("i-0abc", "running", "g6.xlarge", "10.0.0.1", "10.0.0.1", None)
    monkeypatch.setattr(connections, "aws_client", lambda *_: object())
    monkeypatch.setattr(connections, "ssh_private_key", lambda *_: "not a key")
    monkeypatch.setattr(ec2_describe, "describe_instance", lambda *_: info)
    monkeypatch.setattr(ec2, "wait_until_running", lambda *_, **__: info)
    monkeypatch.setattr(ssh, "wait_for_ssh", lambda *_, **__: None)
    monkeypatch.setattr(ssh, "wait_for_bootstrap", lambda *_, **__: SimpleNamespace(phases_s={"user": 0.0}))
    monkeypatch.setattr(postmortem, "collect", lambda *_, **__: {})
    return found


def _operator(*, deferrable: bool) -> InstanceReadyOperator:
    config = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"}).to_dict()
    config["training"]["deferrable"] = deferrable
    return InstanceReadyOperator(task_id="wait_ready", config=config, launched=LAUNCHED)


def _never(*_: Any, **__: Any) -> None:
    raise SshTimeoutError("no SSH after 1 s")


@pytest.mark.parametrize("fails", [False, True], ids=["ready", "failed"])
def test_wait_ready_in_a_worker_builds_its_settings_once(
    built: list[Any], monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.instance import ssh

    operator = _operator(deferrable=False)
    context: Any = {"ti": _Ti({})}
    if fails:
        # The failure asks EC2 whether the instance is gone and collects its logs: with these settings too.
        monkeypatch.setattr(ssh, "wait_for_ssh", _never)
        with pytest.raises(AirflowFailException, match=r"^no SSH after 1 s"):
            operator.execute(context)
    else:
        assert operator.execute(context)["address"] == "10.0.0.1"
    assert len(built) == 1


def test_a_deferred_wait_ready_builds_its_settings_once_on_each_side(built: list[Any]) -> None:
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    pushed: dict[str, Any] = {}
    context: Any = {"ti": _Ti(pushed)}
    with pytest.raises(TaskDeferred):
        _operator(deferrable=True).execute(context)
    assert len(built) == 1 and pushed[RUNNING_KEY]["address"] == "10.0.0.1"

    # Each event is handled by a fresh operator, as on whichever worker resumes the task.
    built.clear()
    resumed: Any = {"ti": _Ti({RUNNING_KEY: RUNNING})}
    event = {"status": "ready", "seconds_to_ssh": 30.0, "seconds_to_ready": 90.0, "bootstrap_phases_s": {}}
    assert _operator(deferrable=True).execute_complete(resumed, event)["address"] == RUNNING["address"]
    assert len(built) == 1

    built.clear()
    with pytest.raises(AirflowFailException, match=r"^bootstrap failed"):
        _operator(deferrable=True).execute_complete(resumed, {"status": "failed", "message": "bootstrap failed"})
    assert len(built) == 1
