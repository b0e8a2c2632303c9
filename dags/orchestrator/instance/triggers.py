"""The triggers of the training DAG's long waits over SSH: the instance's bootstrap, and the training job.

They run in the triggerer, so no worker slot sleeps while an instance boots or a model trains. They await the waits a
worker runs (instance.ssh's `ssh_answers` and `bootstrap_marker`, `RemoteJob.follow`: each poll a short paramiko call
in a thread, the connection kept from one poll to the next) and turn the outcome into an event. The serialized
kwargs (stored in the metadata database) hold the SSH connection's id, the address and the pinned *public* host key:
the private key is read from the Airflow connection here, in the triggerer, and never leaves it.

A trigger logs through `self.log`, which the triggerer writes next to the task's own log file (the UI shows both),
so `train | ...` and `bootstrap | ...` lines keep appearing in the task log while it is deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from orchestrator.contracts import classpath
from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from orchestrator.instance.remote_job import RemoteJob
    from orchestrator.instance.ssh import SshTarget

# Bounds of one SSH login from the triggerer: a dead address must not stall a poll for minutes.
CONNECT_TIMEOUT_S = 30.0
# How long on_kill gives the job to stop after SIGTERM before SIGKILL; the triggerer allows on_kill 30 s in all.
KILL_GRACE_S = 10.0


class _SshTrigger(BaseTrigger):
    """What both triggers share: where to log in, with which connection's key, and the pinned host key."""

    def __init__(self, *, ssh_conn_id: str, host: str, port: int, user: str, host_public_key: str) -> None:
        super().__init__()
        self.ssh_conn_id = ssh_conn_id
        self.host = host
        self.port = port
        self.user = user
        self.host_public_key = host_public_key

    def _ssh_kwargs(self) -> dict[str, Any]:
        return {
            "ssh_conn_id": self.ssh_conn_id,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "host_public_key": self.host_public_key,
        }

    async def _target(self) -> SshTarget:
        from orchestrator.config.connections import assh_private_key
        from orchestrator.instance.ssh import SshTarget

        return SshTarget(
            self.host, self.port, self.user, self.host_public_key, await assh_private_key(self.ssh_conn_id)
        )


class BootstrapTrigger(_SshTrigger):
    """Wait until the instance answers SSH with the pinned host key and its bootstrap wrote `ok`; stream its log.

    Fires one event: `ready` (with the seconds to SSH and to ready, counted from `started_at`), `failed` (the
    bootstrap's error marker or a host key mismatch: a retry cannot help), `timeout` at `deadline` (epoch seconds) or
    `unreachable` (SSH answered, then failed for a while: the operator asks EC2, then waits again from `log_offset`).
    """

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        host: str,
        port: int,
        user: str,
        host_public_key: str,
        state_dir: str,
        poll_s: float,
        started_at: float,
        deadline: float,
        log_offset: int = 0,
    ) -> None:
        super().__init__(ssh_conn_id=ssh_conn_id, host=host, port=port, user=user, host_public_key=host_public_key)
        self.state_dir = state_dir
        self.poll_s = poll_s
        self.started_at = started_at
        self.deadline = deadline
        self.log_offset = log_offset

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            classpath(self),
            {
                **self._ssh_kwargs(),
                "state_dir": self.state_dir,
                "poll_s": self.poll_s,
                "started_at": self.started_at,
                "deadline": self.deadline,
                "log_offset": self.log_offset,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from orchestrator.instance.ssh import (
            BootstrapFailedError,
            BootstrapTimeoutError,
            HostKeyMismatchError,
            InstanceUnreachableError,
            SshTimeoutError,
            bootstrap_marker,
            ssh_answers,
        )

        try:
            target = await self._target()
        except OrchestratorError as exc:
            yield TriggerEvent({"status": "failed", "message": str(exc)})
            return
        try:
            # The same two waits as a worker's wait_ready, one login kept from the first to the second.
            window = {"started_at": self.started_at, "deadline": self.deadline, "poll_s": self.poll_s}
            client = await ssh_answers(target, **window, connect_timeout_s=CONNECT_TIMEOUT_S, log=self.log)
            answered_at = time.time()
            result = await bootstrap_marker(
                target,
                self.state_dir,
                **window,
                on_log=lambda line: self.log.info("bootstrap | %s", line),
                connect_timeout_s=CONNECT_TIMEOUT_S,
                client=client,
                log=self.log,
                log_offset=self.log_offset,
            )
        except InstanceUnreachableError as exc:
            # The triggerer holds no AWS connection: the operator asks EC2 whether the instance is still there.
            yield TriggerEvent({"status": "unreachable", "message": str(exc), "log_offset": exc.log_offset})
            return
        except (SshTimeoutError, BootstrapTimeoutError) as exc:
            yield TriggerEvent({"status": "timeout", "message": str(exc)})
            return
        except (HostKeyMismatchError, BootstrapFailedError) as exc:
            # The bootstrap's error marker or another host key: a retry cannot help.
            yield TriggerEvent({"status": "failed", "message": str(exc)})
            return
        yield TriggerEvent(
            {
                "status": "ready",
                "status_line": result.status_line,
                "seconds_to_ssh": round(answered_at - self.started_at, 1),
                "seconds_to_ready": round(result.elapsed_s, 1),
                "bootstrap_phases_s": result.phases_s,
            }
        )


class RemoteJobTrigger(_SshTrigger):
    """Follow a started remote job: log its new lines as `train | ...`, fire once it has an exit code.

    Events (each with `offset`, where a follower resumes without repeating a line): `exited` (with `exit_code`),
    `lost` (no process and no exit code), `timeout` at `deadline` (the job keeps running), `disconnected` (the
    connection dropped: the operator asks EC2 whether the instance is still there before following again, after
    `failures` drops in a row), `error` (anything else, e.g. an unreadable connection).

    The task being marked failed, cleared or marked success while deferred kills the job and ends its MLflow run
    KILLED (`on_kill`, called by the triggerer only on such a user action); a triggerer restart does not: the
    trigger resumes in a triggerer. The MLflow credentials are read from `mlflow_conn_id` here, never serialized.
    """

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        host: str,
        port: int,
        user: str,
        host_public_key: str,
        job_dir: str,
        poll_s: float,
        deadline: float,
        timeout_s: float,
        from_offset: int = 0,
        failures: int = 0,
        not_before: float = 0.0,
        mlflow_run_id: str = "",
        tracking_uri: str = "",
        mlflow_conn_id: str = "",
    ) -> None:
        super().__init__(ssh_conn_id=ssh_conn_id, host=host, port=port, user=user, host_public_key=host_public_key)
        self.mlflow_run_id = mlflow_run_id
        self.tracking_uri = tracking_uri
        self.mlflow_conn_id = mlflow_conn_id
        self.job_dir = job_dir
        self.poll_s = poll_s
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.from_offset = from_offset
        self.failures = failures
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            classpath(self),
            {
                **self._ssh_kwargs(),
                "job_dir": self.job_dir,
                "poll_s": self.poll_s,
                "deadline": self.deadline,
                "timeout_s": self.timeout_s,
                "from_offset": self.from_offset,
                "failures": self.failures,
                "not_before": self.not_before,
                "mlflow_run_id": self.mlflow_run_id,
                "tracking_uri": self.tracking_uri,
                "mlflow_conn_id": self.mlflow_conn_id,
            },
        )

    async def _job(self) -> RemoteJob:
        from orchestrator.instance.job_script import JobPaths
        from orchestrator.instance.remote_job import RemoteJob
        from orchestrator.instance.ssh import connect

        target = await self._target()
        return RemoteJob(
            lambda: connect(target, timeout_s=CONNECT_TIMEOUT_S), JobPaths(self.job_dir), poll_s=self.poll_s
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from orchestrator.instance.remote_job import RemoteJobError, RemoteJobLostError, RemoteJobTimeoutError
        from orchestrator.instance.ssh import transient_ssh_errors

        try:
            job = await self._job()
        except OrchestratorError as exc:
            yield TriggerEvent({"status": "error", "message": str(exc), "offset": self.from_offset})
            return
        cursor = job.cursor(self.from_offset)
        event: dict[str, Any]
        try:
            # After a dropped connection the operator asks for a pause before the next login (backoff).
            await asyncio.sleep(max(0.0, self.not_before - time.time()))
            # The worker's wait (RemoteJob.stream) without its reconnects: a drop goes back to the operator.
            exit_code = await job.follow(
                cursor,
                lambda line: self.log.info("train | %s", line),
                deadline=self.deadline,
                timeout_s=self.timeout_s,
                reconnect=False,
            )
            event = {"status": "exited", "exit_code": exit_code}
        except RemoteJobTimeoutError as exc:
            event = {"status": "timeout", "message": str(exc)}
        except RemoteJobLostError as exc:
            event = {"status": "lost", "message": str(exc)}
        except RemoteJobError as exc:
            event = {"status": "error", "message": str(exc)}
        except transient_ssh_errors() as exc:
            event = {"status": "disconnected", "message": f"{type(exc).__name__}: {exc}", "failures": self.failures + 1}
        finally:
            await asyncio.to_thread(job.close)
        # The deadline travels on: following again after a drop must not restart the training's bound.
        yield TriggerEvent(
            {**event, "offset": cursor.resume_offset, "deadline": self.deadline, "timeout_s": self.timeout_s}
        )

    async def on_kill(self) -> None:
        """The task was marked failed, cleared or marked success while deferred: stop the job, as the operator's
        on_kill does while it runs in a worker, then end its MLflow run KILLED (the job, killed, cannot). A
        connection of its own: a poll may still hold the other."""
        self.log.warning("Task killed while deferred: stopping the remote training job in %s", self.job_dir)
        try:
            job = await self._job()
            try:
                await asyncio.to_thread(job.kill, KILL_GRACE_S)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(job.close)
        finally:
            if self.mlflow_run_id:
                await self._end_mlflow_run("KILLED")

    async def _end_mlflow_run(self, status: str) -> None:
        from orchestrator.config.connections import amlflow_credentials
        from orchestrator.tracking.runs import credentials_in_env, end_run_if_running

        creds = await amlflow_credentials(self.mlflow_conn_id)

        def end() -> None:
            with credentials_in_env(creds.username, creds.password):
                end_run_if_running(self.tracking_uri, self.mlflow_run_id, status)

        await asyncio.to_thread(end)
