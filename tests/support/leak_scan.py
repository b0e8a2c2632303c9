"""Where a planted secret could leak besides logs, XComs and user-data: what went over SSH, what a run left on its
instances' disks, and what it recorded in MLflow.

The process list is only sampled, so a short-lived control command could carry a secret unseen; these scans read
what was sent and what was left instead. Under `dag.test()` the tasks run in the test process, so paramiko's own
methods are wrapped here and no product code is instrumented.

The MLflow credentials are the one secret with a legitimate destination on the instance: the remote job's 0600 env
file, uploaded over SFTP and deleted by the job as it starts. The upload to that one path may carry them (and
nothing else planted); a write anywhere else may not, and no env file may be left once the run is over.
"""

from __future__ import annotations

import posixpath
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from embedded.cloud import EmulatedInstance
from embedded.deploy.stack import EmbeddedStack
from orchestrator.instance.command import parse_mlflow_run_id
from orchestrator.instance.job_script import JobPaths, job_dir_for, job_key

# Keys of the `planted` secrets that the env-file upload carries on purpose: the MLflow credentials.
ENV_FILE_SECRETS = frozenset({"mlflow"})
COMMANDS = "commands sent over SSH"
_WRITE_MODES = frozenset("wax+")


@dataclass
class SftpWrite:
    """One remote file opened for writing, and every byte written through that handle."""

    path: str
    content: bytearray


class SshTraffic:
    """Every command string sent with `exec_command` and every SFTP write, by any paramiko client of this process.

    The wrappers sit on paramiko's classes, so one recorder at a time; `active()` hands it to helpers that a test's
    signature does not reach (the fault suite's record_run).
    """

    _active: ClassVar[SshTraffic | None] = None

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.writes: list[SftpWrite] = []
        self._lock = threading.Lock()

    @classmethod
    def active(cls) -> SshTraffic:
        if cls._active is None:
            raise RuntimeError("no SSH traffic recorder is installed: request the ssh_traffic fixture")
        return cls._active

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record from now until `monkeypatch` is undone."""
        import paramiko

        if SshTraffic._active is not None:
            raise RuntimeError("an SSH traffic recorder is already installed")
        exec_command, sftp_open = paramiko.Channel.exec_command, paramiko.SFTPClient.open

        def recording_exec(channel: Any, command: str | bytes) -> Any:
            with self._lock:
                self.commands.append(_text(command))
            return exec_command(channel, command)

        def recording_open(sftp: Any, filename: str | bytes, mode: str = "r", bufsize: int = -1) -> Any:
            handle = sftp_open(sftp, filename, mode, bufsize)
            if _WRITE_MODES & set(mode):
                self._follow(handle, _text(filename))
            return handle

        # Channel.exec_command is what SSHClient.exec_command ends in; `file` is open's alias (put/putfo use it).
        monkeypatch.setattr(paramiko.Channel, "exec_command", recording_exec)
        monkeypatch.setattr(paramiko.SFTPClient, "open", recording_open)
        monkeypatch.setattr(paramiko.SFTPClient, "file", recording_open)
        monkeypatch.setattr(SshTraffic, "_active", self)

    def _follow(self, handle: Any, path: str) -> None:
        """Record what the handle sends: BufferedFile.write and flush both end in `_write`, chunk by chunk."""
        write = SftpWrite(path, bytearray())
        with self._lock:
            self.writes.append(write)
        send = handle._write

        def recording_write(data: bytes) -> int:
            sent: int = send(data)
            with self._lock:
                write.content += bytes(data[:sent])
            return sent

        handle._write = recording_write

    def places(self, env_upload: re.Pattern[str]) -> tuple[dict[str, str], dict[str, str]]:
        """(the commands and every SFTP write, the writes to paths that `env_upload` matches in full)."""
        with self._lock:
            places = {COMMANDS: "\n".join(self.commands)}
            env_writes = {}
            for i, write in enumerate(self.writes, 1):
                name = f"SFTP write #{i} to {write.path}"
                target = env_writes if env_upload.fullmatch(write.path) else places
                target[name] = write.content.decode(errors="replace")
        return places, env_writes


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def run_job_paths(stack: EmbeddedStack, dag_id: str, run_id: str) -> JobPaths:
    """The remote job's files for a DAG run, as the instance sees them."""
    return job_dir_for(str(stack.state_dir), job_key(dag_id, run_id))


def env_upload_pattern(paths: JobPaths) -> re.Pattern[str]:
    """The env file's upload name of this job, with any caller's random suffix (the job renames it into place)."""
    return re.compile(re.escape(paths.upload(paths.env_file, "")) + "[0-9a-f]{12}")


def booted(stack: EmbeddedStack, instance_ids: Iterable[str]) -> list[EmulatedInstance]:
    """The emulator's instances among `instance_ids` (an instance refused before boot has no disk)."""
    return [stack.cloud.instances[i] for i in instance_ids if i in stack.cloud.instances]


def tree_text(root: Path, label: str) -> dict[str, str]:
    """Every regular file under `root` as text (binary bytes replaced, so ASCII secrets still show), by name."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            try:
                found[f"{label}{path.relative_to(root)}"] = path.read_bytes().decode(errors="replace")
            except FileNotFoundError:
                continue  # removed while the tree was listed
    return found


def disk_places(stack: EmbeddedStack, instances: Iterable[EmulatedInstance]) -> dict[str, str]:
    """Every file on the instances' emulated disks (state folder, bootstrap files, job folders), after the run."""
    places = {}
    for inst in instances:
        root = stack.cloud.host_path(inst, stack.disk_root)
        places.update(tree_text(root, f"file on {inst.instance_id}: {stack.disk_root}/"))
    return places


def env_files_left(stack: EmbeddedStack, instances: Iterable[EmulatedInstance], paths: JobPaths) -> list[str]:
    """Env files (or their uploads, or copies) still in any job folder: the job deletes its own as it starts."""
    left = []
    for inst in instances:
        jobs = stack.cloud.host_path(inst, stack.state_dir / "jobs")
        pattern = f"*/{posixpath.basename(paths.env_file)}*"
        left += [f"{inst.instance_id}: {path.relative_to(jobs)}" for path in sorted(jobs.glob(pattern))]
    return left


def mlflow_run_ids(stack: EmbeddedStack, instances: Iterable[EmulatedInstance], paths: JobPaths) -> list[str]:
    """The MLflow runs the job created, as its log announced them (none when it failed before MLflow began); a job
    resumed on a relaunched instance announces the run it continues again, so each run is listed once."""
    ids: dict[str, None] = {}
    for inst in instances:
        log = stack.cloud.host_path(inst, paths.log)
        run_id = parse_mlflow_run_id(log.read_text(errors="replace")) if log.is_file() else None
        if run_id:
            ids[run_id] = None
    return list(ids)


def mlflow_places(tracking_uri: str, run_ids: Iterable[str]) -> dict[str, str]:
    """Each run's params, tags and artifacts, and those of the models it logged, read through the MLflow client."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri)
    places = {}
    with tempfile.TemporaryDirectory(prefix="leak-scan-") as scratch:
        for run_id in run_ids:
            run = client.get_run(run_id)
            places[f"MLflow run {run_id} params"] = _pairs(run.data.params)
            places[f"MLflow run {run_id} tags"] = _pairs(run.data.tags)
            local = Path(scratch) / run_id
            local.mkdir()
            client.download_artifacts(run_id, "", str(local))
            places.update(tree_text(local, f"MLflow run {run_id} artifact "))
            # MLflow 3 keeps a logged model's files with the model, not under the run's artifacts.
            for model in client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
            ):
                places[f"MLflow model {model.model_id} params"] = _pairs(model.params)
                places[f"MLflow model {model.model_id} tags"] = _pairs(model.tags)
                files = Path(
                    download_artifacts(
                        artifact_uri=model.artifact_location,
                        dst_path=str(Path(scratch) / model.model_id),
                        tracking_uri=tracking_uri,
                    )
                )
                places.update(tree_text(files, f"MLflow model {model.model_id} artifact "))
    return places


def _pairs(values: Mapping[str, Any]) -> str:
    """key=value lines, unescaped (JSON would escape some characters a secret may hold)."""
    return "\n".join(f"{key}={value}" for key, value in sorted(values.items()))


def planted_found(planted: Mapping[str, str], places: Mapping[str, str]) -> dict[str, int]:
    """Occurrences of each planted value in each place, as {"<secret> in <place>": count}; empty when none leaked."""
    found = {
        f"{secret} in {place}": text.count(value) for secret, value in planted.items() for place, text in places.items()
    }
    return {where: count for where, count in found.items() if count}


def ssh_leaks(planted: Mapping[str, str], traffic: SshTraffic, paths: JobPaths) -> dict[str, int]:
    """Planted secrets in the commands and SFTP writes; the job's env-file upload may hold the MLflow ones only."""
    sent, env_uploads = traffic.places(env_upload_pattern(paths))
    others = {key: value for key, value in planted.items() if key not in ENV_FILE_SECRETS}
    return planted_found(planted, sent) | planted_found(others, env_uploads)


def leaks_beyond_logs(
    planted: Mapping[str, str],
    stack: EmbeddedStack,
    dag_id: str,
    run_id: str,
    instance_ids: Iterable[str],
    traffic: SshTraffic,
) -> dict[str, int]:
    """Planted secrets in what the run sent over SSH, left on its instances' disks and recorded in MLflow, plus
    every env file left behind; empty when none."""
    paths = run_job_paths(stack, dag_id, run_id)
    instances = booted(stack, instance_ids)
    job_dirs = [d for d in (stack.cloud.host_path(i, paths.job_dir) for i in instances) if d.is_dir()]
    if job_dirs and not any(paths.job_dir in command for command in traffic.commands):
        raise AssertionError(
            f"the run's job folder exists ({job_dirs}) but no SSH command naming it was recorded: the recorder was "
            "not installed where the tasks ran, so the scan would prove nothing"
        )
    places = {
        **disk_places(stack, instances),
        **mlflow_places(stack.mlflow.url, mlflow_run_ids(stack, instances, paths)),
    }
    found = ssh_leaks(planted, traffic, paths) | planted_found(planted, places)
    found |= {f"env file left on {where}": 1 for where in env_files_left(stack, instances, paths)}
    return found
