"""The SSH triggers against the real loopback sshd: what they log, the events they fire, and kill versus shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from embedded.process import free_port
from embedded.services.mlflow_server import MlflowServer
from orchestrator.cloud.hostkeys import generate_host_key
from orchestrator.instance.job_script import job_dir_for
from orchestrator.instance.remote_job import RemoteJob
from orchestrator.instance.ssh import BootstrapWatch, SshTarget, connect
from orchestrator.instance.triggers import BootstrapTrigger, RemoteJobTrigger
from tests.support.sshd import SshKeyPair

CONN_ID = "trigger_ssh_test"
FIVE_LINES_EXIT_3 = ["bash", "-c", "for i in 1 2 3 4 5; do echo line $i; done; exit 3"]


@pytest.fixture
def ssh_conn(airflow_db: Path, monkeypatch: pytest.MonkeyPatch, ssh_client_keypair: SshKeyPair) -> str:
    """The SSH connection the triggers read their private key from, as a deployment defines it."""
    extra = {"private_key": ssh_client_keypair.private_pem}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({"conn_type": "ssh", "extra": extra}))
    return CONN_ID


def messages(logged: list[dict[str, Any]]) -> list[str]:
    """The trigger's log lines as they read in the task log (structlog keeps the %-arguments apart)."""
    return [entry["event"] % tuple(entry.get("positional_args", ())) for entry in logged]


def events_of(trigger: Any) -> list[Any]:
    async def run() -> list[Any]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(run())


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def started_job(ssh_target: SshTarget, state: Path, command: list[str], key: str = "job") -> RemoteJob:
    job = RemoteJob(lambda: connect(ssh_target, timeout_s=10), job_dir_for(str(state), key), poll_s=0.1)
    assert job.start_or_attach(command)
    wait_until(lambda: Path(job.paths.pid).exists())
    return job


def job_trigger(ssh_target: SshTarget, conn_id: str, job: RemoteJob, **overrides: Any) -> RemoteJobTrigger:
    args: dict[str, Any] = {
        "ssh_conn_id": conn_id,
        "host": ssh_target.host,
        "port": ssh_target.port,
        "user": ssh_target.user,
        "host_public_key": ssh_target.host_public_key,
        "job_dir": job.paths.job_dir,
        "poll_s": 0.1,
        "deadline": time.time() + 60,
        "timeout_s": 60.0,
        **overrides,
    }
    return RemoteJobTrigger(**args)


# ---- the training job ----------------------------------------------------------------------------------------


def test_job_trigger_logs_every_line_and_fires_the_exit_code(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    job = started_job(ssh_target, remote_state_dir, FIVE_LINES_EXIT_3)
    with capture_logs() as logged:
        (event,) = events_of(job_trigger(ssh_target, ssh_conn, job))
    job.close()

    assert event["status"] == "exited" and event["exit_code"] == 3
    assert [m for m in messages(logged) if m.startswith("train | ")] == [f"train | line {i}" for i in range(1, 6)]
    # Where another follower would resume: the end of the log, every line having been handed on.
    assert event["offset"] == Path(job.paths.log).stat().st_size


def test_job_trigger_resumes_at_an_offset_without_repeating_a_line(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    job = started_job(ssh_target, remote_state_dir, FIVE_LINES_EXIT_3)
    wait_until(lambda: Path(job.paths.exit_code).exists())
    job.close()
    two_lines = len(b"line 1\nline 2\n")
    with capture_logs() as logged:
        (event,) = events_of(job_trigger(ssh_target, ssh_conn, job, from_offset=two_lines))
    assert event["status"] == "exited"
    assert [m for m in messages(logged) if m.startswith("train | ")] == [
        "train | line 3",
        "train | line 4",
        "train | line 5",
    ]


def test_job_trigger_serializes_no_secret_and_is_rebuilt_from_its_class_path(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str, ssh_client_keypair: SshKeyPair
) -> None:
    job = started_job(ssh_target, remote_state_dir, ["true"])
    job.close()
    classpath, kwargs = job_trigger(ssh_target, ssh_conn, job).serialize()
    # Stored in the metadata database: the connection's id, never its key.
    assert "PRIVATE KEY" not in json.dumps(kwargs)
    assert ssh_client_keypair.private_pem.splitlines()[1] not in json.dumps(kwargs)
    # As the triggerer rebuilds it: by its class path, which must be importable from the DAGs folder.
    module, _, name = classpath.rpartition(".")
    (event,) = events_of(getattr(importlib.import_module(module), name)(**kwargs))
    assert event["status"] == "exited" and event["exit_code"] == 0


def test_job_trigger_stops_at_its_deadline_and_leaves_the_job_running(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    job = started_job(ssh_target, remote_state_dir, ["sleep", "300"])
    try:
        (event,) = events_of(job_trigger(ssh_target, ssh_conn, job, deadline=time.time() + 1, timeout_s=1.0))
        assert event["status"] == "timeout"
        assert "Stopped following remote job" in event["message"] and "still running" in event["message"]
        assert job.exit_code() is None
    finally:
        job.kill(grace_s=1)
        job.close()


def test_job_trigger_reports_a_connection_it_cannot_open_as_a_drop(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    """Nothing listens: the operator hears `disconnected` (it asks EC2 about the instance, then follows again)."""
    job = started_job(ssh_target, remote_state_dir, ["true"])
    job.close()
    (event,) = events_of(job_trigger(ssh_target, ssh_conn, job, port=free_port(), failures=2))
    assert event["status"] == "disconnected"
    assert event["failures"] == 3
    assert event["deadline"] > time.time() and event["offset"] == 0


def test_job_trigger_without_its_connection_fires_an_error(
    ssh_target: SshTarget, remote_state_dir: Path, airflow_db: Path
) -> None:
    job = started_job(ssh_target, remote_state_dir, ["true"])
    job.close()
    (event,) = events_of(job_trigger(ssh_target, "no_such_ssh_conn", job))
    assert event["status"] == "error"
    assert "connection 'no_such_ssh_conn' not found" in event["message"]


def test_user_kill_stops_the_job_and_ends_its_mlflow_run_killed(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str, mlflow_server: MlflowServer
) -> None:
    """The task marked failed or cleared while deferred: the triggerer cancels the trigger and calls on_kill."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.create_experiment(f"killed-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    job = started_job(ssh_target, remote_state_dir, ["sleep", "300"])
    # No such connection: an open tracking server, as mlflow_credentials reads it.
    trigger = job_trigger(
        ssh_target, ssh_conn, job, mlflow_run_id=run_id, tracking_uri=mlflow_server.url, mlflow_conn_id="no_such"
    )

    async def cancel_by_user() -> None:
        following = asyncio.ensure_future(anext(trigger.run()))
        await asyncio.sleep(0.5)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await trigger.on_kill()

    with capture_logs() as logged:
        asyncio.run(cancel_by_user())
    assert job.exit_code() == 143  # SIGTERM reached the job's process group
    job.close()
    assert any("Task killed while deferred" in m for m in messages(logged))
    assert client.get_run(run_id).info.status == "KILLED"


def test_triggerer_shutdown_leaves_the_job_running(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    """A triggerer stopping cancels its triggers without calling on_kill: the job trains on, to be followed again."""
    job = started_job(ssh_target, remote_state_dir, ["bash", "-c", "sleep 2; echo done"])
    trigger = job_trigger(ssh_target, ssh_conn, job)

    async def shut_down() -> None:
        following = asyncio.ensure_future(anext(trigger.run()))
        await asyncio.sleep(0.5)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following

    asyncio.run(shut_down())
    wait_until(lambda: Path(job.paths.exit_code).exists())
    assert job.exit_code() == 0
    assert job.read_log() == "done\n"
    job.close()


# ---- the bootstrap ---------------------------------------------------------------------------------------------


def bootstrap_trigger(ssh_target: SshTarget, conn_id: str, state: Path, **overrides: Any) -> BootstrapTrigger:
    now = time.time()
    args: dict[str, Any] = {
        "ssh_conn_id": conn_id,
        "host": ssh_target.host,
        "port": ssh_target.port,
        "user": ssh_target.user,
        "host_public_key": ssh_target.host_public_key,
        "state_dir": str(state),
        "poll_s": 0.1,
        "started_at": now,
        "deadline": now + 30,
        **overrides,
    }
    return BootstrapTrigger(**args)


def test_bootstrap_trigger_streams_the_log_until_ok(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    (remote_state_dir / "bootstrap.log").write_text("step one\nstep two\n")
    (remote_state_dir / "bootstrap.status").write_text("ok\n")
    with capture_logs() as logged:
        (event,) = events_of(bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir))
    assert event["status"] == "ready"
    assert 0 <= event["seconds_to_ssh"] <= event["seconds_to_ready"]
    lines = messages(logged)
    assert [m for m in lines if m.startswith("bootstrap | ")] == ["bootstrap | step one", "bootstrap | step two"]
    assert any("with the pinned host key" in m for m in lines)


def test_bootstrap_trigger_fires_the_error_marker_with_the_log_tail(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    (remote_state_dir / "bootstrap.log").write_text("installing\nE: disk full\n")
    (remote_state_dir / "bootstrap.status").write_text("error: packages: apt failed\n")
    (event,) = events_of(bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir))
    assert event["status"] == "failed"
    assert "failed: error: packages: apt failed" in event["message"] and "E: disk full" in event["message"]


def test_bootstrap_trigger_refuses_another_host_key(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    (remote_state_dir / "bootstrap.status").write_text("ok\n")
    impostor_key = generate_host_key().public_line
    (event,) = events_of(bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir, host_public_key=impostor_key))
    assert event["status"] == "failed"
    assert "possible man-in-the-middle" in event["message"]


def test_bootstrap_trigger_times_out_without_a_marker(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    (remote_state_dir / "bootstrap.log").write_text("still waiting for apt\n")
    now = time.time()
    (event,) = events_of(bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir, started_at=now, deadline=now + 1))
    assert event["status"] == "timeout"
    assert "wrote no marker" in event["message"] and "still waiting for apt" in event["message"]


def test_bootstrap_trigger_hands_an_instance_unreachable_after_it_answered_back_with_its_log_offset(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The triggerer holds no AWS connection: the operator asks EC2 whether the instance went (a spot interruption)
    and, if it still runs, defers again from the offset the event carries, which the trigger serializes."""
    (remote_state_dir / "bootstrap.log").write_text("step one\n")
    monkeypatch.setattr("orchestrator.instance.ssh.UNREACHABLE_AFTER_S", 0.3)
    original = BootstrapWatch.poll
    polls: list[int] = []

    def failing_after_the_first(self: BootstrapWatch, client: Any, *, with_tail: bool = False) -> tuple[str, str]:
        polls.append(1)
        if len(polls) > 1:
            raise EOFError("connection closed")
        return original(self, client, with_tail=with_tail)

    monkeypatch.setattr(BootstrapWatch, "poll", failing_after_the_first)
    (event,) = events_of(bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir))
    assert event["status"] == "unreachable"
    assert event["log_offset"] == len("step one\n")
    assert "during the bootstrap (connection closed)" in event["message"]
    _, kwargs = bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir, log_offset=9).serialize()
    assert kwargs["log_offset"] == 9


def test_bootstrap_trigger_times_out_when_ssh_never_answers(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_conn: str
) -> None:
    now = time.time()
    trigger = bootstrap_trigger(ssh_target, ssh_conn, remote_state_dir, port=free_port(), deadline=now + 1)
    with capture_logs() as logged:
        (event,) = events_of(trigger)
    assert event["status"] == "timeout"
    assert "did not accept a login" in event["message"]
    assert any("not ready yet" in m for m in messages(logged))
