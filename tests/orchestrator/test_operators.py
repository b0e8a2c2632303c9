"""The training operator's contract with the remote job: a killed task leaves no job running on the instance."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.operators import RemoteTrainingOperator
from orchestrator.remote_job import RemoteJob, job_dir_for
from orchestrator.ssh import SshTarget, connect


def test_killing_the_task_kills_the_remote_job(ssh_target: SshTarget, remote_state_dir: Path) -> None:
    job = RemoteJob(lambda: connect(ssh_target, timeout_s=10), job_dir_for(str(remote_state_dir), "killed-task"))
    job.start_or_attach(["sleep", "300"])
    deadline = time.monotonic() + 10
    while not Path(job.paths.pid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    operator = RemoteTrainingOperator(task_id="train", config={}, ready={}, git_sha="0" * 40)
    operator._job = job  # as execute() leaves it while streaming

    operator.on_kill()

    assert job.exit_code() == 143  # SIGTERM reached the job's process group
    job.close()


def test_on_kill_before_any_job_is_harmless() -> None:
    RemoteTrainingOperator(task_id="train", config={}, ready={}, git_sha="0" * 40).on_kill()
