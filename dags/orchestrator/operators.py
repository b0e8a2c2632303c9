"""The training step as an operator: it owns the remote job's lifetime (start or re-attach, stream, kill on cancel)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

    from orchestrator.remote_job import RemoteJob

MLFLOW_RUN_URL_KEY = "mlflow_run_url"
MLFLOW_RUN_ID_KEY = "mlflow_run_id"


class MlflowRunLink(BaseOperatorLink):
    """The 'MLflow run' button on the task: the run this training produced."""

    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return str(XCom.get_value(key=MLFLOW_RUN_URL_KEY, ti_key=ti_key) or "")


class RemoteTrainingOperator(BaseOperator):
    """Run `mlflow run <repo> --version <sha>` on the instance over SSH, as a detached job.

    The job is keyed by the DAG run, so a retried task re-attaches to the job already running (or finished) on the
    instance instead of starting another; its log is streamed into the task log from the start; its exit code decides
    the task state; killing the task kills the remote job. MLflow credentials reach the job through a 0600 file that
    the job reads and deletes: never the command line, never this log.
    """

    template_fields: Sequence[str] = ("config", "ready", "git_sha")
    operator_extra_links = (MlflowRunLink(),)
    ui_color = "#fff3e0"

    def __init__(self, *, config: Any, ready: Any, git_sha: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.ready = ready
        self.git_sha = git_sha
        self._job: RemoteJob | None = None

    def _remote_job(self, context: Context) -> RemoteJob:
        from orchestrator.pipeline import settings_of, ssh_target
        from orchestrator.remote_job import RemoteJob, job_dir_for, job_key
        from orchestrator.ssh import connect

        s = settings_of(self.config)
        target = ssh_target(self.config, self.ready["address"], self.ready["host_public_key"])
        key = job_key(self.dag_id, context["run_id"])
        return RemoteJob(
            lambda: connect(target, timeout_s=30),
            job_dir_for(s.instance.state_dir, key),
            poll_s=min(s.instance.poll_seconds, 2.0),
            on_disconnect=lambda exc: self._fail_if_instance_gone(),
        )

    def _fail_if_instance_gone(self) -> None:
        """A lost connection may mean a lost instance (spot interruption, someone in the console): ask EC2 at once."""
        from orchestrator.connections import aws_client
        from orchestrator.ec2 import describe_instance
        from orchestrator.pipeline import settings_of

        s = settings_of(self.config)
        instance_id = self.ready["instance_id"]
        info = describe_instance(aws_client("ec2", s.aws.conn_id, s.aws.region), instance_id)
        if info is None or info.state not in ("pending", "running"):
            state = info.state if info else "gone"
            reason = (info.state_reason if info else None) or "no reason given"
            raise AirflowFailException(
                f"instance {instance_id} is {state} ({reason}) while training: it was stopped or terminated from "
                "outside Airflow (a spot interruption, the console, a script or its max-lifetime watchdog). "
                "The run cannot finish; trigger it again (on-demand capacity avoids spot interruptions)."
            )

    def execute(self, context: Context) -> str:
        from orchestrator.connections import mlflow_credentials
        from orchestrator.pipeline import settings_of
        from orchestrator.remote_job import RemoteJobError, RemoteJobLostError
        from orchestrator.tracking import (
            credentials_in_env,
            experiment_id_of,
            fail_run_if_running,
            start_training_run,
        )
        from orchestrator.training_command import mlflow_run_url, parse_mlflow_run_id, tracked_run, training_command

        s = settings_of(self.config)
        # Until MLflow names its run, the task's link is empty rather than missing (a missing one logs an error).
        context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value="")
        creds = mlflow_credentials(s.mlflow.conn_id)
        # The MLflow run is created here, named and tagged after this DAG run; the job trains into it (--run-id).
        tracked = tracked_run(
            s,
            self.ready,
            self.git_sha,
            dag_id=self.dag_id,
            run_id=context["run_id"],
            try_number=context["ti"].try_number,
        )
        with credentials_in_env(creds.username, creds.password):
            created_run_id = start_training_run(s.mlflow.tracking_uri, s.mlflow.experiment, tracked)
        command = training_command(s, self.git_sha, created_run_id)
        env = {"MLFLOW_TRACKING_URI": s.mlflow.tracking_uri, **creds.as_env()}
        job = self._job = self._remote_job(context)
        started = job.start_or_attach(command.argv(), env=env, env_sh=f"{s.instance.state_dir}/env.sh")
        self.log.info(
            "%s training job in %s on %s: %s",
            "Started" if started else "Re-attached to the",
            job.paths.job_dir,
            self.ready["instance_id"],
            " ".join(command.argv()),
        )
        try:
            exit_code = job.stream(
                lambda line: self.log.info("train | %s", line), timeout_s=s.training.timeout_minutes * 60
            )
            run_id = parse_mlflow_run_id(job.read_log())
        except RemoteJobError as exc:
            # A job that vanished without an exit code often means the instance itself went away: say which.
            self._fail_if_instance_gone()
            if isinstance(exc, RemoteJobLostError):
                # The job key is the DAG run's: a retry would only re-attach to the same dead job and wait again.
                raise AirflowFailException(f"{exc} A task retry cannot restart it: trigger a new DAG run.") from None
            raise
        finally:
            job.close()
        if run_id:
            with credentials_in_env(creds.username, creds.password):
                url = mlflow_run_url(s.mlflow.ui_base_url, experiment_id_of(s.mlflow.tracking_uri, run_id), run_id)
            context["ti"].xcom_push(key=MLFLOW_RUN_ID_KEY, value=run_id)
            context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value=url)
            self.log.info("MLflow run %s: %s", run_id, url)
        if exit_code != 0:
            # `mlflow run` ends the run it trained into; if it failed before reaching it (a failed checkout), say so.
            with credentials_in_env(creds.username, creds.password):
                fail_run_if_running(s.mlflow.tracking_uri, created_run_id)
            # The job ran to its end: a retry would only re-attach to the same finished job.
            raise AirflowFailException(
                f"training exited with code {exit_code} on {self.ready['instance_id']}"
                + (f" (MLflow run {run_id})" if run_id else " before MLflow created a run")
                + ": the lines above, prefixed 'train |', show why"
            )
        if not run_id:
            raise AirflowException("training succeeded but its log names no MLflow run: was it run by `mlflow run`?")
        return run_id

    def on_kill(self) -> None:
        """The task was killed (marked failed, timed out, cancelled): the remote job must not run on unattended."""
        if self._job is not None:
            self.log.warning("Task killed: stopping the remote training job in %s", self._job.paths.job_dir)
            with contextlib.suppress(Exception):
                self._job.kill()
