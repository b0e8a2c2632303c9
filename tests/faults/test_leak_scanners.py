"""The leak scanners catch what they are for: each test plants a secret where one scanner looks and expects that
scanner, and only it, to report it. A scanner that reports nothing proves nothing unless it can fail."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from embedded.deploy.stack import EmbeddedStack
from orchestrator.instance.job_script import job_dir_for
from orchestrator.instance.remote_job import RemoteJob
from orchestrator.instance.ssh import SshTarget, connect
from tests.support.leak_scan import COMMANDS, SshTraffic, leaks_beyond_logs, run_job_paths, ssh_leaks
from tests.support.pipeline import instances_of, run_dag, task_states


def test_ssh_scan_reports_a_secret_in_a_command_or_a_write_outside_the_env_file(
    ssh_target: SshTarget, remote_state_dir: Path, ssh_traffic: SshTraffic
) -> None:
    planted = {"mlflow": "planted-mlflow-password-probe", "aws": "planted-aws-secret-probe"}
    paths = job_dir_for(str(remote_state_dir), "scan-probe")
    job = RemoteJob(lambda: connect(ssh_target, timeout_s=10), paths)
    client = connect(ssh_target, timeout_s=10)
    try:
        # Legitimate: the MLflow password in the env file's upload.
        job.start_or_attach(["true"], env={"MLFLOW_TRACKING_PASSWORD": planted["mlflow"]})
        assert ssh_leaks(planted, ssh_traffic, paths) == {}
        # Leaks: a control command, the MLflow password written next to the env file, another secret in the upload.
        client.exec_command(f"true # {planted['aws']}")[1].channel.recv_exit_status()
        sftp = client.open_sftp()
        sftp.putfo(io.BytesIO(planted["mlflow"].encode()), f"{paths.env_file}.bak")
        with sftp.open(paths.upload(paths.env_file, "0" * 12), "w") as handle:
            handle.write(f"AWS_SECRET_ACCESS_KEY={planted['aws']}\n")
        sftp.close()
    finally:
        client.close()
        job.close()

    writes = {write.path: i for i, write in enumerate(ssh_traffic.writes, 1)}
    assert ssh_leaks(planted, ssh_traffic, paths) == {
        f"aws in {COMMANDS}": 1,
        f"mlflow in SFTP write #{writes[f'{paths.env_file}.bak']} to {paths.env_file}.bak": 1,
        f"aws in SFTP write #{writes[paths.upload(paths.env_file, '0' * 12)]} to "
        f"{paths.upload(paths.env_file, '0' * 12)}": 1,
    }


@pytest.mark.slow
def test_every_scanner_reports_its_planted_leak_after_a_dag_run(
    env: EmbeddedStack,
    sha: str,
    planted: dict[str, str],
    ssh_traffic: SshTraffic,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One run with a leak for each scanner: a control command, an SFTP write beside the env file, a file on the
    instance's disk, an MLflow tag and an MLflow text artifact. The scan must report exactly those."""
    from mlflow import MlflowClient

    run_command, upload = RemoteJob._run, RemoteJob._upload
    commands_leaked: list[str] = []

    def leaky_run(job: RemoteJob, command: str, timeout_s: float = 60.0) -> str:
        if not commands_leaked:  # the first control command only, as a shell comment
            commands_leaked.append(command)
            command = f"{command} # {planted['aws']}"
        return run_command(job, command, timeout_s)

    def leaky_upload(sftp: Any, path: str, text: str, mode: int) -> None:
        upload(sftp, path, text, mode)
        env_file = path.rpartition(".upload-")[0]
        if env_file.endswith("/job.env"):  # a copy of the env file: the MLflow password outside its one place
            upload(sftp, f"{env_file}.bak", text, mode)

    monkeypatch.setenv("TRAINER__MLFLOW__MODEL_NAME", "hurricane-damage-cnn-leak-scan")
    with monkeypatch.context() as leaky:
        leaky.setattr(RemoteJob, "_run", leaky_run)
        leaky.setattr(RemoteJob, "_upload", staticmethod(leaky_upload))
        dag_run = run_dag(git_ref=sha)
    assert dag_run.state == "success", task_states(dag_run)
    assert commands_leaked, "no control command was sent"

    ids = instances_of(env, dag_run)
    (instance_id,) = ids
    paths = run_job_paths(env, dag_run.dag_id, dag_run.run_id)
    inst = env.cloud.instances[instance_id]
    env.cloud.host_path(inst, f"{paths.job_dir}/notes.txt").write_text(f"token={planted['github']}\n")
    (run_id,) = (ti.xcom_pull(task_ids="train") for ti in dag_run.get_task_instances() if ti.task_id == "train")
    client = MlflowClient(env.mlflow.url)
    client.set_tag(run_id, "leaked", planted["aws"])
    client.log_text(run_id, f"password={planted['mlflow']}\n", "notes/leak.txt")

    found = leaks_beyond_logs(planted, env, dag_run.dag_id, dag_run.run_id, ids, ssh_traffic)

    writes = {write.path: i for i, write in enumerate(ssh_traffic.writes, 1)}
    on_disk = f"file on {instance_id}: {env.disk_root}/"
    job_dir = Path(paths.job_dir).relative_to(env.disk_root)
    assert found == {
        f"aws in {COMMANDS}": 1,
        f"mlflow in SFTP write #{writes[f'{paths.env_file}.bak']} to {paths.env_file}.bak": 1,
        f"mlflow in {on_disk}{job_dir}/job.env.bak": 1,
        f"github in {on_disk}{job_dir}/notes.txt": 1,
        f"env file left on {instance_id}: {job_dir.name}/job.env.bak": 1,
        f"aws in MLflow run {run_id} tags": 1,
        f"mlflow in MLflow run {run_id} artifact notes/leak.txt": 1,
    }
