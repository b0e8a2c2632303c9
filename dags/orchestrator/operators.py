"""The DAG's steps that wait: launch (for a slot under the instance cap), wait_ready and train.

None of them sleeps in a worker for long: the launch looks for a slot once per poke and is rescheduled in between
(freeing its worker and its launch-pool slot), wait_ready and train defer to the triggerer (orchestrator.triggers)
unless training.deferrable is false. The training operator owns the remote job's lifetime: start or re-attach,
follow, kill on cancel.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator, BaseOperatorLink, BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

    from orchestrator.remote_job import RemoteJob

# How often a launch waiting at the instance cap looks again; each look is a short task run holding the launch pool.
LAUNCH_POKE_S = 15.0
LAUNCH_POKE_MAX_S = 120.0
# The sensor's own bound, never reached: aws.instance_wait_minutes (at most 7 days) fails the launch first.
LAUNCH_SENSOR_TIMEOUT_S = (7 * 24 + 1) * 3600.0
MLFLOW_RUN_URL_KEY = "mlflow_run_url"
# wait_ready's view of the running instance (address, when the wait began, its deadline), kept for its resumption.
RUNNING_KEY = "running"
MLFLOW_RUN_ID_KEY = "mlflow_run_id"


class MlflowRunLink(BaseOperatorLink):
    """The 'MLflow run' button on the task: the run this training produced."""

    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return str(XCom.get_value(key=MLFLOW_RUN_URL_KEY, ti_key=ti_key) or "")


class InstanceLaunchSensor(BaseSensorOperator):
    """Launch the run's instance (or adopt an earlier try's) once the deployment is under aws.max_instances.

    Each poke counts the live instances and, if a slot is free, launches, all while holding the one-slot launch pool
    (count and launch are atomic across runs). At the cap it is rescheduled: between looks it holds neither a worker
    nor the pool slot. The wait is bounded by aws.instance_wait_minutes from the first look of the first try.
    """

    template_fields: Sequence[str] = ("config", "plan")
    ui_color = "#e8f5e9"

    def __init__(self, *, config: Any, plan: Any, **kwargs: Any) -> None:
        kwargs.setdefault("poke_interval", LAUNCH_POKE_S)
        kwargs.setdefault("exponential_backoff", True)
        kwargs.setdefault("max_wait", LAUNCH_POKE_MAX_S)
        kwargs.setdefault("timeout", LAUNCH_SENSOR_TIMEOUT_S)
        super().__init__(mode="reschedule", **kwargs)
        self.config = config
        self.plan = plan

    def poke(self, context: Context) -> PokeReturnValue:
        from orchestrator.pipeline import launch

        first_look = context["ti"].get_first_reschedule_date(context)
        waited_s = time.time() - first_look.timestamp() if first_look is not None else 0.0
        launched = launch(self.config, self.plan, waited_s=waited_s)
        return PokeReturnValue(is_done=launched is not None, xcom_value=launched)


class InstanceReadyOperator(BaseOperator):
    """Wait, bounded, until the instance runs, answers SSH with its pinned host key and its bootstrap succeeded.

    The EC2 check runs here; the SSH and bootstrap wait (up to instance.ready_timeout_minutes, the bootstrap log
    streamed into the task log as `bootstrap | ...`) runs in the triggerer, or here when training.deferrable is false.
    """

    template_fields: Sequence[str] = ("config", "launched")
    ui_color = "#e3f2fd"

    def __init__(self, *, config: Any, launched: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.launched = launched

    def execute(self, context: Context) -> dict[str, Any]:
        from orchestrator.pipeline import settings_of, wait_ready_in_worker, wait_running
        from orchestrator.triggers import BootstrapTrigger

        s = settings_of(self.config)
        running = wait_running(self.config, self.launched)
        if not s.training.deferrable:
            try:
                return wait_ready_in_worker(self.config, self.launched, running)
            except AirflowFailException as exc:
                raise AirflowFailException(str(exc) + self._postmortem(running, str(exc))) from None
        # For execute_complete, on whichever worker resumes the task.
        context["ti"].xcom_push(key=RUNNING_KEY, value=running)
        self.defer(
            trigger=BootstrapTrigger(
                ssh_conn_id=s.instance.ssh_conn_id,
                host=running["address"],
                port=s.instance.ssh_port,
                user=s.instance.ssh_user,
                host_public_key=self.launched["host_public_key"],
                state_dir=s.instance.state_dir,
                poll_s=s.instance.poll_seconds,
                started_at=running["started_at"],
                deadline=running["deadline"],
            ),
            method_name="execute_complete",
        )

    def _postmortem(self, running: dict[str, Any] | None, message: str) -> str:
        """Before the teardown terminates it: the instance's logs into this task log (no MLflow run exists yet).
        Not when it answered with another host key: nothing is sent to that host."""
        from orchestrator.postmortem import for_run, log_to_task_log

        if not running or "does not match the pinned key" in message:
            return ""
        bundle = for_run(self.config, running["address"], self.launched["host_public_key"])
        log_to_task_log(bundle, self.log)
        return " The instance's logs are above, prefixed 'postmortem |'." if bundle else ""

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from orchestrator.pipeline import ready_result

        running = context["ti"].xcom_pull(task_ids=self.task_id, key=RUNNING_KEY)
        if event.get("status") != "ready":
            message = str(event.get("message") or f"unexpected event: {event!r}")
            # A failed bootstrap, another host key or a deadline counted from the launch: no retry can fix these.
            raise AirflowFailException(message + self._postmortem(running, message))
        return ready_result(
            self.config,
            self.launched,
            running,
            float(event["seconds_to_ssh"]),
            float(event["seconds_to_ready"]),
            event.get("bootstrap_phases_s") or {},
        )


class RemoteTrainingOperator(BaseOperator):
    """Run `mlflow run <repo> --version <sha>` on the instance over SSH, as a detached job.

    The job is keyed by the DAG run, so a retried task re-attaches to the job already running (or finished) on the
    instance instead of starting another; its log is streamed into the task log from the start; its exit code decides
    the task state; killing the task kills the remote job. MLflow credentials reach the job through a 0600 file that
    the job reads and deletes: never the command line, never this log, never the trigger's kwargs.

    With training.deferrable (the default) the worker only starts or re-attaches, then defers to RemoteJobTrigger
    (which streams the log and, if the deferred task is marked failed or cleared, kills the job);
    `execute_complete` finishes on any worker. Otherwise the worker follows the job itself until it exits.
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
        from orchestrator.pipeline import settings_of, training_data
        from orchestrator.remote_job import RemoteJobError
        from orchestrator.tracking import credentials_in_env, log_dataset_manifest, start_training_run
        from orchestrator.training_command import tracked_run, training_command

        s = settings_of(self.config)
        # Read again as the job starts: the run records the data as it is when it is downloaded.
        dataset = training_data(s)
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
            dataset_tags=dataset.tags() if dataset else None,
            parent_run_id=self.config.get("mlflow_parent_run_id", ""),
            # The image the instance runs, as plan_launch resolved it (the DAG's setup).
            image=context["ti"].xcom_pull(task_ids="plan_launch"),
        )
        with credentials_in_env(creds.username, creds.password):
            created_run_id = start_training_run(s.mlflow.tracking_uri, s.mlflow.experiment, tracked)
            if dataset:
                log_dataset_manifest(s.mlflow.tracking_uri, created_run_id, dataset.manifest())
            # Published before training: the task's link opens the run while it trains, and the finishing step
            # (maybe on another worker, after a deferral) finds the run here.
            self._publish_run(context, created_run_id)
        command = training_command(s, self.git_sha, created_run_id)
        env = {"MLFLOW_TRACKING_URI": s.mlflow.tracking_uri, **creds.as_env()}
        job = self._job = self._remote_job(context)
        try:
            started = job.start_or_attach(command.argv(), env=env, env_sh=f"{s.instance.state_dir}/env.sh")
        except BaseException:
            job.close()
            raise
        self.log.info(
            "%s training job in %s on %s: %s",
            "Started" if started else "Re-attached to the",
            job.paths.job_dir,
            self.ready["instance_id"],
            " ".join(command.argv()),
        )
        timeout_s = s.training.timeout_minutes * 60
        if s.training.deferrable:
            job.close()
            self._job = None
            self._defer_following(context, timeout_s=timeout_s, deadline=time.time() + timeout_s)
        try:
            exit_code = job.stream(lambda line: self.log.info("train | %s", line), timeout_s=timeout_s)
        except RemoteJobError as exc:
            job.close()
            self._fail_for(exc)
        return self._finish(context, job, exit_code)

    def _defer_following(
        self, context: Context, *, timeout_s: float, deadline: float, offset: int = 0, failures: int = 0
    ) -> NoReturn:
        """Hand the wait to the triggerer: no worker slot is held while the job trains."""
        from orchestrator.pipeline import settings_of
        from orchestrator.remote_job import job_dir_for, job_key, reconnect_delay_s
        from orchestrator.triggers import RemoteJobTrigger

        s = settings_of(self.config)
        paths = job_dir_for(s.instance.state_dir, job_key(self.dag_id, context["run_id"]))
        # A dropped connection is retried with backoff, as RemoteJob does in a worker.
        delay = reconnect_delay_s(failures) if failures else 0.0
        self.log.info("Following the job from the triggerer (log byte %d, %.0f s left)", offset, deadline - time.time())
        self.defer(
            trigger=RemoteJobTrigger(
                ssh_conn_id=s.instance.ssh_conn_id,
                host=self.ready["address"],
                port=s.instance.ssh_port,
                user=s.instance.ssh_user,
                host_public_key=self.ready["host_public_key"],
                job_dir=paths.job_dir,
                poll_s=min(s.instance.poll_seconds, 2.0),
                deadline=deadline,
                timeout_s=timeout_s,
                from_offset=offset,
                failures=failures,
                not_before=time.time() + delay,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> str:
        """The trigger's event, on whichever worker picks it up: finish as the streaming path does."""
        from orchestrator.remote_job import (
            MAX_RECONNECTS,
            RemoteJobError,
            RemoteJobLostError,
            RemoteJobTimeoutError,
            reconnect_delay_s,
        )

        status = event.get("status")
        message = str(event.get("message", ""))
        if status == "disconnected":
            failures = int(event["failures"])
            # As in a worker: a lost connection may mean a lost instance; ask EC2 at once, then follow again.
            self._fail_if_instance_gone()
            if failures > MAX_RECONNECTS:
                self._fail_for(
                    RemoteJobError(
                        f"Lost SSH to the instance of the training job and could not reconnect after {MAX_RECONNECTS} "
                        f"attempts (last error: {message}). The job may still be running: a retry re-attaches."
                    )
                )
            self.log.warning(
                "SSH to the training job failed (%s); reconnecting in %.1fs (attempt %d of %d)",
                message,
                reconnect_delay_s(failures),
                failures,
                MAX_RECONNECTS,
            )
            self._defer_following(
                context,
                timeout_s=float(event["timeout_s"]),
                deadline=float(event["deadline"]),
                offset=int(event.get("offset", 0)),
                failures=failures,
            )
        if status == "lost":
            self._fail_for(RemoteJobLostError(message))
        if status == "timeout":
            self._fail_for(RemoteJobTimeoutError(message))
        if status != "exited":
            self._fail_for(RemoteJobError(message or f"unexpected event from the job's trigger: {event!r}"))
        job = self._job = self._remote_job(context)
        return self._finish(context, job, int(event["exit_code"]))

    def _fail_for(self, exc: Exception) -> NoReturn:
        """A job that could not be followed to its end: say whether the instance itself went away, and whether a
        retry can help."""
        from orchestrator.remote_job import RemoteJobLostError

        # A job that vanished without an exit code often means the instance itself went away: say which.
        self._fail_if_instance_gone()
        if isinstance(exc, RemoteJobLostError):
            # The job key is the DAG run's: a retry would only re-attach to the same dead job and wait again.
            raise AirflowFailException(f"{exc} A task retry cannot restart it: trigger a new DAG run.") from None
        raise exc

    def _publish_run(self, context: Context, run_id: str) -> None:
        """The MLflow run's id and UI address as XComs (the latter is the task's 'MLflow run' link)."""
        from orchestrator.pipeline import settings_of
        from orchestrator.tracking import experiment_id_of
        from orchestrator.training_command import mlflow_run_url

        s = settings_of(self.config)
        url = mlflow_run_url(s.mlflow.ui_base_url, experiment_id_of(s.mlflow.tracking_uri, run_id), run_id)
        context["ti"].xcom_push(key=MLFLOW_RUN_ID_KEY, value=run_id)
        context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value=url)
        self.log.info("MLflow run %s: %s", run_id, url)

    def _finish(self, context: Context, job: RemoteJob, exit_code: int) -> str:
        """The job ended with `exit_code`: check it trained into this run's MLflow run, then succeed or fail."""
        from orchestrator.connections import mlflow_credentials
        from orchestrator.pipeline import settings_of
        from orchestrator.remote_job import RemoteJobError
        from orchestrator.tracking import credentials_in_env, fail_run_if_running
        from orchestrator.training_command import parse_mlflow_run_id

        s = settings_of(self.config)
        created_run_id = context["ti"].xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY)
        try:
            run_id = parse_mlflow_run_id(job.read_log())
        except RemoteJobError as exc:
            self._fail_for(exc)
        finally:
            job.close()
        if exit_code != 0:
            # `mlflow run` ends the run it trained into; if it failed before reaching it (a failed checkout), say so.
            if created_run_id:
                creds = mlflow_credentials(s.mlflow.conn_id)
                with credentials_in_env(creds.username, creds.password):
                    fail_run_if_running(s.mlflow.tracking_uri, created_run_id)
            # The job ran to its end: a retry would only re-attach to the same finished job.
            raise AirflowFailException(
                f"training exited with code {exit_code} on {self.ready['instance_id']}"
                + (f" (MLflow run {run_id})" if run_id else " before MLflow created a run")
                + ": the lines above, prefixed 'train |', show why"
                + self._postmortem(run_id or created_run_id, job.paths.log)
            )
        if not run_id:
            raise AirflowException("training succeeded but its log names no MLflow run: was it run by `mlflow run`?")
        if run_id != created_run_id:
            # The job's own log is the truth (a retry that did not find the first try's run created another).
            self.log.warning("The job trained into MLflow run %s, not %s: linking to that run", run_id, created_run_id)
            creds = mlflow_credentials(s.mlflow.conn_id)
            with credentials_in_env(creds.username, creds.password):
                self._publish_run(context, run_id)
        return run_id

    def _postmortem(self, mlflow_run_id: str | None, job_log: str) -> str:
        """Before the teardown terminates it: the instance's logs as the MLflow run's `postmortem/` artifacts (or
        into this task log without a run); what the failure message adds to say where they are."""
        from orchestrator.connections import mlflow_credentials
        from orchestrator.pipeline import settings_of
        from orchestrator.postmortem import ARTIFACT_DIR, attach_to_run, for_run, log_to_task_log
        from orchestrator.tracking import credentials_in_env

        bundle = for_run(self.config, self.ready["address"], self.ready["host_public_key"], job_log)
        if not bundle:
            return ""
        if mlflow_run_id:
            s = settings_of(self.config)
            try:
                creds = mlflow_credentials(s.mlflow.conn_id)
                with credentials_in_env(creds.username, creds.password):
                    attach_to_run(s.mlflow.tracking_uri, mlflow_run_id, bundle)
                return f"; the instance's logs are the run's '{ARTIFACT_DIR}/' artifacts"
            except Exception as exc:
                self.log.warning("Could not attach the post-mortem bundle to MLflow run %s: %s", mlflow_run_id, exc)
        log_to_task_log(bundle, self.log)
        return "; the instance's logs are in this task log, prefixed 'postmortem |'"

    def on_kill(self) -> None:
        """The task was killed (marked failed, timed out, cancelled): the remote job must not run on unattended."""
        if self._job is not None:
            self.log.warning("Task killed: stopping the remote training job in %s", self._job.paths.job_dir)
            with contextlib.suppress(Exception):
                self._job.kill()
