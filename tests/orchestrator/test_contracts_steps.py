"""orchestrator.contracts_steps: the step results keep today's XCom format exactly (a task queued or deferred before an
upgrade reads its upstream's XCom as written before it), and a malformed one fails naming the step and the key."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from orchestrator.contracts_steps import (
    Evaluation,
    LaunchedInstance,
    LaunchPlan,
    ReadyInstance,
    RunningInstance,
    StepResultError,
)
from tests.support.step_results import EVALUATION, LAUNCHED, PLAN, READY, RUNNING

TODAY: list[tuple[Any, dict[str, Any]]] = [
    (LaunchPlan, PLAN),
    (LaunchedInstance, LAUNCHED),
    (RunningInstance, RUNNING),
    (ReadyInstance, READY),
    (Evaluation, EVALUATION),
    (Evaluation, EVALUATION | {"champion_value": 0.9, "promoted": False, "model_version": None}),
]


def types_of(value: Any) -> Any:
    """The JSON shape: every key and its value's type, nested objects included."""
    if isinstance(value, dict):
        return {key: types_of(item) for key, item in value.items()}
    return type(value)


@pytest.mark.parametrize(("cls", "xcom"), TODAY, ids=lambda p: getattr(p, "__name__", ""))
def test_todays_xcom_round_trips_with_the_same_keys_and_types(cls: Any, xcom: dict[str, Any]) -> None:
    stored = json.loads(json.dumps(xcom))  # as the XCom backend keeps it
    written = cls.from_xcom(stored).to_xcom()
    assert written == xcom
    assert types_of(written) == types_of(xcom)
    assert json.loads(json.dumps(written)) == stored


@pytest.mark.parametrize(("cls", "xcom"), TODAY[:5], ids=lambda p: getattr(p, "__name__", ""))
def test_each_missing_key_names_the_step_and_the_key(cls: Any, xcom: dict[str, Any]) -> None:
    for key in xcom:
        with pytest.raises(StepResultError, match=rf"^{cls.STEP}'s XCom \(.+\) has no key '{key}': clear that step"):
            cls.from_xcom({k: v for k, v in xcom.items() if k != key})


@pytest.mark.parametrize(
    ("cls", "xcom", "key", "value"),
    [
        (LaunchPlan, PLAN, "root_volume_gb", "100"),
        (LaunchPlan, PLAN, "root_volume_gb", 100.0),
        (LaunchedInstance, LAUNCHED, "market", "reserved"),
        (LaunchedInstance, LAUNCHED, "reused", "false"),
        (RunningInstance, RUNNING, "deadline", None),
        (ReadyInstance, READY, "port", True),  # a bool is an int to isinstance
        (ReadyInstance, READY, "bootstrap_phases_s", {"gpu": "1.0"}),
        (ReadyInstance, READY, "address", 10),
        (Evaluation, EVALUATION, "promoted", 1),
        (Evaluation, EVALUATION, "value", None),
    ],
)
def test_a_value_of_another_type_names_the_step_and_the_key(
    cls: Any, xcom: dict[str, Any], key: str, value: Any
) -> None:
    with pytest.raises(StepResultError, match=rf"^{cls.STEP}'s XCom \(.+\): '{key}' is {re.escape(repr(value))}, not "):
        cls.from_xcom(xcom | {key: value})


def test_no_object_at_all_is_named() -> None:
    with pytest.raises(StepResultError, match=r"^launch's XCom \(the launched instance\) is NoneType, not a JSON"):
        LaunchedInstance.from_xcom(None)


def test_whole_numbers_read_as_numbers_and_unknown_keys_are_ignored() -> None:
    """A number written as 2 reads as 2.0; a key a newer version added does not stop an older one from reading."""
    running = RunningInstance.from_xcom(RUNNING | {"started_at": 1764151200, "added_later": "x"})
    assert running.started_at == 1764151200.0 and isinstance(running.started_at, float)
    assert "added_later" not in running.to_xcom()


class _Ti:
    def xcom_pull(self, **_: Any) -> None:
        return None

    def get_first_reschedule_date(self, context: Any) -> None:
        return None


@pytest.mark.parametrize("step", ["launch", "wait_ready", "wait_ready_complete", "train", "train_complete"])
def test_a_malformed_upstream_xcom_fails_the_consumer_on_its_first_try(step: str) -> None:
    """No retry rewrites the upstream's XCom: the consumer fails at once, saying which step to run again."""
    from orchestrator.cloud.operators import InstanceLaunchSensor
    from orchestrator.config.settings import load_settings
    from orchestrator.instance.operators import InstanceReadyOperator
    from orchestrator.instance.training_operator import RemoteTrainingOperator

    config = load_settings(env={"TRAINER__AWS__DEPLOYMENT": "test"}).to_dict()
    context: Any = {"ti": _Ti()}
    no_key = {k: v for k, v in LAUNCHED.items() if k != "host_public_key"}
    no_address = {k: v for k, v in READY.items() if k != "address"}
    calls = {
        "launch": lambda: InstanceLaunchSensor(task_id="launch", config=config, plan=PLAN | {"ami_id": 1}).poke(
            context
        ),
        "wait_ready": lambda: InstanceReadyOperator(task_id="wait_ready", config=config, launched=no_key).execute(
            context
        ),
        "wait_ready_complete": lambda: InstanceReadyOperator(
            task_id="wait_ready", config=config, launched=no_key
        ).execute_complete(context, {"status": "ready"}),
        "train": lambda: RemoteTrainingOperator(task_id="train", config=config, ready=no_address, git_sha="0").execute(
            context
        ),
        "train_complete": lambda: RemoteTrainingOperator(
            task_id="train", config=config, ready=no_address, git_sha="0"
        ).execute_complete(context, {"status": "exited", "exit_code": 0}),
    }
    named = {
        "launch": r"plan_launch's XCom \(the launch plan\): 'ami_id' is 1",
        "wait_ready": r"launch's XCom \(the launched instance\) has no key 'host_public_key'",
        "wait_ready_complete": r"launch's XCom \(the launched instance\) has no key 'host_public_key'",
        "train": r"wait_ready's XCom \(the ready instance\) has no key 'address'",
        "train_complete": r"wait_ready's XCom \(the ready instance\) has no key 'address'",
    }
    with pytest.raises(AirflowFailException, match=f"^{named[step]}"):
        calls[step]()
