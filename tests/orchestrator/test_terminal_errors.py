"""An error no retry can fix fails every step on its first try: one mechanism (errors.fail_without_retry over each
project error's `terminal`) on the gate's and the operators' entry points and in the steps' bodies; any other error
leaves the task to its retries."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

import orchestrator
from orchestrator.ci.github_protocol import (
    GitHubCredentialsError,
    GitHubError,
    GitHubRefError,
    GitHubResponseError,
    GitHubSourceError,
)
from orchestrator.cloud.bake import BakeDeniedError
from orchestrator.cloud.ec2 import InstanceCapError, InstanceLostError, InstanceNotReadyError
from orchestrator.contracts_steps import LaunchedInstance, LaunchPlan, RunningInstance, StepResultError
from orchestrator.datasets.versions import DatasetError, IncompleteVersionError
from orchestrator.errors import ConfigError, OrchestratorError, fail_without_retry
from orchestrator.instance.ssh import (
    BootstrapFailedError,
    BootstrapTimeoutError,
    HostKeyMismatchError,
    SshTimeoutError,
)
from orchestrator.tracking.runs import TrackingError, TrackingServerError
from tests.support.step_results import LAUNCHED, PLAN, READY, RUNNING

# Every project error no step retries, subclasses included (ConfigError's: AmiNotFoundError, UserDataTooLargeError).
TERMINAL: tuple[type[OrchestratorError], ...] = (
    ConfigError,
    DatasetError,
    IncompleteVersionError,
    TrackingError,
    InstanceCapError,
    SshTimeoutError,
    BootstrapFailedError,
    BootstrapTimeoutError,
    GitHubRefError,
    GitHubCredentialsError,
    GitHubSourceError,
    StepResultError,
    BakeDeniedError,
)
# Terminal at some steps only: another step retries them, so the steps that do not name them.
NAMED_WHERE_TERMINAL: tuple[type[OrchestratorError], ...] = (
    InstanceNotReadyError,
    InstanceLostError,
    HostKeyMismatchError,
    GitHubResponseError,
)


def all_project_errors() -> set[type[OrchestratorError]]:
    """OrchestratorError and every subclass the package defines (all its modules imported)."""
    for module in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        importlib.import_module(module.name)
    found, todo = set(), [OrchestratorError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__.startswith("orchestrator.")}


def test_exactly_the_errors_no_retry_can_fix_are_terminal() -> None:
    errors = all_project_errors()
    assert {cls for cls in errors if cls.terminal} == {cls for cls in errors if issubclass(cls, TERMINAL)}
    assert not any(cls.terminal for cls in NAMED_WHERE_TERMINAL)


def error_of(cls: type[Exception], message: str) -> Exception:
    return cls(message, "Client.UserInitiatedShutdown") if cls is InstanceLostError else cls(message)


@pytest.mark.parametrize("error", TERMINAL, ids=lambda cls: cls.__name__)
def test_every_terminal_error_fails_on_its_first_try_in_any_block(error: type[Exception]) -> None:
    with pytest.raises(AirflowFailException, match=r"^no retry fixes this$"), fail_without_retry():
        raise error_of(error, "no retry fixes this")


@pytest.mark.parametrize(
    "error", [*NAMED_WHERE_TERMINAL, TrackingServerError, GitHubError, ValueError], ids=lambda cls: cls.__name__
)
def test_any_other_error_is_left_to_the_retries_unless_the_block_names_it(error: type[Exception]) -> None:
    raised = error_of(error, "transient")
    with pytest.raises(error) as left, fail_without_retry():
        raise raised
    assert left.value is raised
    with pytest.raises(AirflowFailException, match=r"^transient$"), fail_without_retry(error):
        raise raised


def spoilt_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every operator builds its settings first: make that fail as a bad setting or a missing connection does."""
    from orchestrator.config import resolve

    def settings_of(config: Any) -> Any:
        raise ConfigError("aws.region: 'nowhere' is invalid")

    # The operators import settings_of from resolve at call time and pass the settings down to the steps.
    monkeypatch.setattr(resolve, "settings_of", settings_of)
    return {}


class Ti:
    try_number = 1

    def xcom_pull(self, **_: Any) -> None:
        return None

    def get_first_reschedule_date(self, context: Any) -> None:
        return None


@pytest.mark.parametrize("step", ["ready", "ready_complete", "train", "train_complete", "launch_sensor"])
def test_a_config_error_fails_each_operator_on_its_first_try(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    from orchestrator.cloud.operators import InstanceLaunchSensor
    from orchestrator.instance.operators import InstanceReadyOperator
    from orchestrator.instance.training_operator import RemoteTrainingOperator

    config = spoilt_settings(monkeypatch)
    context: Any = {"ti": Ti()}
    calls = {
        "ready": lambda: InstanceReadyOperator(task_id="r", config=config, launched=LAUNCHED).execute(context),
        "ready_complete": lambda: InstanceReadyOperator(task_id="r", config=config, launched=LAUNCHED).execute_complete(
            context,
            {"status": "failed", "message": "x"},
        ),
        "train": lambda: RemoteTrainingOperator(task_id="t", config=config, ready=READY, git_sha="x").execute(context),
        "train_complete": lambda: RemoteTrainingOperator(
            task_id="t", config=config, ready=READY, git_sha="x"
        ).execute_complete(context, {"status": "disconnected", "failures": 1}),
        "launch_sensor": lambda: InstanceLaunchSensor(task_id="l", config=config, plan=PLAN).poke(context),
    }
    with pytest.raises(AirflowFailException, match=r"aws\.region: 'nowhere' is invalid"):
        calls[step]()


# The steps' settings, as far as the bodies below read them.
SETTINGS = SimpleNamespace(
    aws=SimpleNamespace(
        conn_id="aws",
        region="eu-west-1",
        project_tag="p",
        deployment="d",
        max_instances=1,
        instance_wait_minutes=1,
        launch_timeout_minutes=1,
    ),
    instance=SimpleNamespace(ready_timeout_minutes=1, poll_seconds=1.0, address="public_ip"),
    mlflow=SimpleNamespace(
        conn_id="mlflow",
        tracking_uri="http://mlflow",
        ui_base_url="http://mlflow",
        model_name="m",
        metric="acc",
        threshold=0.0,
        greater_is_better=True,
    ),
    training=SimpleNamespace(data_uri="s3://bucket/data/"),
    datasets=SimpleNamespace(),
)


def raiser(error: Exception) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise error

    return fail


def each_step(monkeypatch: pytest.MonkeyPatch, error: Exception) -> dict[str, Callable[[], Any]]:
    """Each step body whose block used to list its errors, with `error` raised where that step's own errors arise."""
    from orchestrator.cloud import ec2, ec2_describe, tasks
    from orchestrator.config import connections
    from orchestrator.datasets import s3, training_data
    from orchestrator.instance import ready, ssh
    from orchestrator.tracking import promotion, runs

    @contextlib.contextmanager
    def no_credentials(*_: Any) -> Iterator[None]:
        yield

    monkeypatch.setattr(connections, "aws_client", lambda *_: object())
    monkeypatch.setattr(connections, "AwsClients", lambda *_: SimpleNamespace(client=lambda *_: object()))
    monkeypatch.setattr(connections, "mlflow_credentials", lambda *_: SimpleNamespace(username="", password=""))
    monkeypatch.setattr(runs, "credentials_in_env", no_credentials)
    monkeypatch.setattr(ec2, "adopt_run_instance", lambda *_: None)
    monkeypatch.setattr(ec2, "instance_slot_free", raiser(error))
    monkeypatch.setattr(ec2_describe, "describe_instance", lambda *_: None)
    monkeypatch.setattr(ec2, "wait_until_running", raiser(error))
    monkeypatch.setattr(ready, "ssh_target", lambda *_: SimpleNamespace(host="h", port=22))
    monkeypatch.setattr(ssh, "wait_for_ssh", raiser(error))
    monkeypatch.setattr(promotion, "evaluate_and_promote", raiser(error))
    monkeypatch.setattr(s3, "identify", raiser(error))
    launched = LaunchedInstance.from_xcom(LAUNCHED)
    running = RunningInstance.from_xcom(RUNNING | {"started_at": 0.0, "deadline": 1.0})
    s: Any = SETTINGS
    return {
        "launch": lambda: tasks.launch(s, LaunchPlan.from_xcom(PLAN), waited_s=0.0),
        "wait_running": lambda: tasks.wait_running(s, launched),
        "wait_ready_in_worker": lambda: ready.wait_ready_in_worker(s, launched, running),
        "evaluate": lambda: promotion.evaluate(s, "run", promote=True),
        "training_data": lambda: training_data.training_data(s),
    }


STEPS = ["launch", "wait_running", "wait_ready_in_worker", "evaluate", "training_data"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("error", TERMINAL, ids=lambda cls: cls.__name__)
def test_every_terminal_error_fails_each_step_on_its_first_try(
    monkeypatch: pytest.MonkeyPatch, step: str, error: type[Exception]
) -> None:
    with pytest.raises(AirflowFailException, match=r"^no retry fixes this$"):
        each_step(monkeypatch, error_of(error, "no retry fixes this"))[step]()


# What each step names besides the terminal errors: fails at once there, and only there.
NAMED = {
    "wait_running": (InstanceNotReadyError, InstanceLostError),
    "wait_ready_in_worker": (HostKeyMismatchError,),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("error", [*NAMED_WHERE_TERMINAL, TrackingServerError], ids=lambda cls: cls.__name__)
def test_a_non_terminal_error_is_retried_where_the_step_does_not_name_it(
    monkeypatch: pytest.MonkeyPatch, step: str, error: type[Exception]
) -> None:
    raised = error_of(error, "a retry may help")
    if error in NAMED.get(step, ()):
        with pytest.raises(AirflowFailException, match=r"^a retry may help$"):
            each_step(monkeypatch, raised)[step]()
        return
    with pytest.raises(error) as left:
        each_step(monkeypatch, raised)[step]()
    assert left.value is raised
