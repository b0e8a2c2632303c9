"""The training operator's contract with the remote job: a killed task leaves no job running on the instance."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.api.datamodels._generated import DagRunType
from structlog.testing import capture_logs

from embedded.services.mlflow_server import MlflowServer
from orchestrator.contracts_steps import ReadyInstance
from orchestrator.instance.job_script import job_dir_for
from orchestrator.instance.remote_job import RemoteJob
from orchestrator.instance.ssh import SshTarget, connect
from orchestrator.instance.training_operator import RemoteTrainingOperator
from tests.support.leak_scan import SshTraffic
from tests.support.step_results import READY

KILL_LOGGED = "Task killed: stopping the remote training job"


def test_killing_the_task_kills_the_remote_job(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_traffic: SshTraffic
) -> None:
    job = RemoteJob(lambda: connect(ssh_target, timeout_s=10), job_dir_for(str(remote_state_dir), "killed-task"))
    job.start_or_attach(["sleep", "300"])
    deadline = time.monotonic() + 10
    while not Path(job.paths.pid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    operator = RemoteTrainingOperator(task_id="train", config={}, ready={}, git_sha="0" * 40)
    operator._job = job  # as execute() leaves it while streaming

    sent_before = len(ssh_traffic.commands)

    with capture_logs() as logged:
        operator.on_kill()

    assert job.exit_code() == 143  # SIGTERM reached the job's process group
    job.close()
    kills = [c for c in ssh_traffic.commands[sent_before:] if 'kill -TERM -- "-$pg"' in c]
    assert len(kills) == 1, ssh_traffic.commands[sent_before:]
    assert any(KILL_LOGGED in entry["event"] for entry in logged), logged


def test_on_kill_before_any_job_is_harmless(ssh_traffic: SshTraffic, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed before execute() made a job (e.g. while queued): no connection, no command, nothing logged as killed."""
    import paramiko

    connects: list[Any] = []
    monkeypatch.setattr(paramiko.SSHClient, "connect", lambda client, *args, **kwargs: connects.append(args))
    operator = RemoteTrainingOperator(task_id="train", config={}, ready={}, git_sha="0" * 40)

    with capture_logs() as logged:
        operator.on_kill()  # raises nothing

    assert connects == []
    assert ssh_traffic.commands == [] and ssh_traffic.writes == []
    assert logged == []


class _TaskInstance:
    task_id = "train"

    def __init__(self, try_number: int) -> None:
        self.try_number = try_number
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str, key: str) -> Any:
        return self.pushed.get(key)


def test_a_retry_reads_the_result_an_earlier_try_finished_in_mlflow(mlflow_server: MlflowServer) -> None:
    """Only a FINISHED run of this DAG run's job counts, and only on a retry (issue 19: an outage killed every try
    that followed a job which trained to its end)."""
    from mlflow import MlflowClient

    from orchestrator.config.settings import load_settings
    from orchestrator.contracts import JOB_KEY_TAG, MLFLOW_RUN_ID_KEY
    from orchestrator.instance.job_script import job_key

    experiment = f"retry-{uuid.uuid4().hex[:8]}"
    env = {
        "TRAINER__AWS__DEPLOYMENT": "test",
        "TRAINER__MLFLOW__TRACKING_URI": mlflow_server.url,
        "TRAINER__MLFLOW__EXPERIMENT": experiment,
    }
    operator = RemoteTrainingOperator(
        task_id="train", config=load_settings(env=env).to_dict(), ready={}, git_sha="0" * 40
    )
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment(experiment)

    def run_of(dag_run_id: str, status: str) -> str:
        run = client.create_run(experiment_id, tags={JOB_KEY_TAG: job_key(operator.dag_id, dag_run_id)})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return str(run.info.run_id)

    def finished(try_number: int, dag_run_id: str = "manual__1") -> tuple[str | None, dict[str, Any]]:
        ti = _TaskInstance(try_number)
        return operator._finished_by_an_earlier_try({"ti": ti, "run_id": dag_run_id}), ti.pushed  # type: ignore[arg-type]

    run_of("manual__1", "RUNNING")
    run_of("manual__1", "FAILED")
    other = run_of("manual__2", "FINISHED")
    assert finished(2) == (None, {}), "a running or failed training is no result"
    done = run_of("manual__1", "FINISHED")
    assert finished(1) == (None, {}), "a first try trains"
    found, pushed = finished(3)
    assert found == done and pushed[MLFLOW_RUN_ID_KEY] == done
    assert finished(2, "manual__2")[0] == other


class _EndedJob:
    """A job that ended, as _finish sees it: its log read over SSH, then its connection closed."""

    def __init__(self) -> None:
        self.log_read = False
        self.closed = False

    def read_log(self) -> str:
        self.log_read = True
        return "train | epoch 3/200\n"

    def close(self) -> None:
        self.closed = True


def gone_instance(reason: str, market: str = "spot") -> Any:
    from orchestrator.cloud.ec2_describe import InstanceInfo

    return InstanceInfo(
        "i-1", "terminated", "g6.xlarge", None, None, None, f"{reason}: ...", reason, None, "us-east-1a", market
    )


@pytest.mark.parametrize("exit_code", [143, 137])
@pytest.mark.parametrize(
    ("reason", "market", "max_preemptions", "failure"),
    [
        (
            "Client.UserInitiatedShutdown",
            "spot",
            3,
            r"TerminateInstances call ended it: .*reaper of expired instances\. It ended",
        ),
        (
            "Server.SpotInstanceTermination",
            "on-demand",
            3,
            r"EC2 interrupted the spot instance to take its capacity back\. It ended while",
        ),
        ("Server.SpotInstanceTermination", "spot", 0, r"interruption 1 of this run, more than aws.max_preemptions = 0"),
        ("Server.SpotInstanceTermination", "spot", 3, None),
    ],
)
def test_a_job_stopped_by_the_instances_shutdown_is_reported_as_the_instances_end_or_recovered(
    exit_code: int, reason: str, market: str, max_preemptions: int, failure: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EC2's terminate and a spot reclaim shut the OS down: the job's wrapper records 143 (137 after the grace) before
    the power goes, and train may read it first. The failure names why the instance went, not a bare exit code; a
    spot instance EC2 took back within aws.max_preemptions is not a failure: train relaunches (Preempted)."""
    import airflow.sdk
    from airflow.sdk.exceptions import AirflowFailException

    import orchestrator.cloud.tasks as cloud_tasks
    from orchestrator.config.settings import load_settings
    from orchestrator.instance.recovery import Preempted

    asked: list[str] = []
    monkeypatch.setattr(
        cloud_tasks, "instance_state", lambda s, instance_id: asked.append(instance_id) or gone_instance(reason, market)
    )
    ti = _TaskInstance(1)
    monkeypatch.setattr(airflow.sdk, "get_current_context", lambda: {"ti": ti})
    env = {"TRAINER__AWS__DEPLOYMENT": "test", "TRAINER__AWS__MAX_PREEMPTIONS": str(max_preemptions)}
    config = load_settings(env=env).to_dict()
    operator = RemoteTrainingOperator(task_id="train", config=config, ready=READY, git_sha="0" * 40)
    operator._ready = ReadyInstance.from_xcom(READY | {"instance_id": "i-1"})  # as execute() reads it
    ended: list[bool] = []
    monkeypatch.setattr(operator, "_end_mlflow_run", lambda: ended.append(True))
    job = _EndedJob()

    if failure is None:
        with pytest.raises(Preempted) as lost:
            operator._finish({"ti": ti}, job, exit_code)  # type: ignore[arg-type]
        assert lost.value.info.state_reason_code == reason and ended == []
    else:
        with pytest.raises(AirflowFailException, match=failure):
            operator._finish({"ti": ti}, job, exit_code)  # type: ignore[arg-type]
        assert ended and ended[0]
    assert asked == ["i-1"]
    assert job.closed and not job.log_read


def test_the_mlflow_run_name_leads_with_the_dag_runs_trigger_or_its_sets_values() -> None:
    """What train reads of its DAG run for the name: the run type and time, and the job knobs the run's Params set
    (a set's; those left empty train the configured values)."""
    dag_run = SimpleNamespace(run_type=DagRunType.MANUAL, run_after=datetime(2026, 11, 26, 12, 30, tzinfo=UTC))
    empty = {"data_uri": None, "model": None, "epochs": None, "batch_size": None, "learning_rate": None}
    form: Any = {"dag_run": dag_run, "run_id": "manual__2026-11-26T12:30:00+00:00", "params": empty}
    assert RemoteTrainingOperator._run_lead(form) == "12:30 manual"
    a_set: Any = {"dag_run": dag_run, "run_id": "sweep__1__set2", "params": empty | {"learning_rate": 0.003}}
    assert RemoteTrainingOperator._run_lead(a_set) == "set 2 lr=0.003"
