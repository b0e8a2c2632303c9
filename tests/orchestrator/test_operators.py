"""The training operator's contract with the remote job: a killed task leaves no job running on the instance."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.operators import RemoteTrainingOperator
from orchestrator.remote_job import RemoteJob, job_dir_for
from orchestrator.ssh import SshTarget, connect
from tests.leak_scan import SshTraffic

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
