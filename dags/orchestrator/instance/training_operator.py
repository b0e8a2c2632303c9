"""The DAG's train step: RemoteTrainingOperator runs the training command on the instance as a remote job.

It defers to the triggerer (instance.triggers.RemoteJobTrigger) unless training.deferrable is false, and owns the
remote job's lifetime: start or re-attach, follow, kill on cancel.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from orchestrator.contracts import MLFLOW_RUN_ID_KEY, MLFLOW_RUN_URL_KEY, RECOVERED_READY_KEY
from orchestrator.contracts_steps import LaunchPlan, ReadyInstance
from orchestrator.errors import OrchestratorError, fail_without_retry
from orchestrator.instance.operators import MlflowRunLink
from orchestrator.instance.postmortem import attach_or_log, for_run
from orchestrator.instance.recovery import current_ready, recovering

if TYPE_CHECKING:
    from airflow.sdk import Context

    from orchestrator.cloud.ec2_describe import InstanceInfo
    from orchestrator.config.settings import Settings
    from orchestrator.instance.remote_job import RemoteJob
    from orchestrator.observe.cost_cap import CostCap


class RemoteTrainingOperator(BaseOperator):
    """Run `mlflow run <repo> --version <sha>` on the instance over SSH, as a detached job.

    The job is keyed by the DAG run, so a retried task re-attaches to the job already running (or finished) on the
    instance instead of starting another; its log is streamed into the task log from the start; its exit code decides
    the task state; killing the task kills the remote job. MLflow credentials reach the job through a 0600 file that
    the job reads and deletes: never the command line, never this log, never the trigger's kwargs.

    With training.deferrable (the default) the worker only starts or re-attaches, then defers to RemoteJobTrigger
    (which streams the log and, if the deferred task is marked failed or cleared, kills the job);
    `execute_complete` finishes on any worker. Otherwise the worker follows the job itself until it exits.

    When EC2 takes the spot instance back while it trains, a new instance is launched and made ready here and the
    job starts again on it, in the same MLflow run, resuming from its last checkpoint (instance.recovery).
    """

    template_fields: Sequence[str] = ("config", "ready", "git_sha")
    operator_extra_links = (MlflowRunLink(),)
    ui_color = "#fff3e0"
    # wait_ready's result, read from the rendered `ready` as execute and execute_complete begin.
    _ready: ReadyInstance

    def __init__(self, *, config: Any, ready: Any, git_sha: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.ready = ready
        self.git_sha = git_sha
        self._job: RemoteJob | None = None

    @functools.cached_property
    def _settings(self) -> Settings:
        """This task's settings, built once from its rendered config (the run's resolved configuration)."""
        from orchestrator.config.resolve import settings_of

        return settings_of(self.config)

    def _remote_job(self, context: Context) -> RemoteJob:
        from orchestrator.instance.job_script import job_dir_for, job_key
        from orchestrator.instance.ready import ssh_target
        from orchestrator.instance.remote_job import RemoteJob
        from orchestrator.instance.ssh import connect

        s = self._settings
        target = ssh_target(s, self._ready.address, self._ready.host_public_key)
        key = job_key(self.dag_id, context["run_id"])
        return RemoteJob(
            lambda: connect(target, timeout_s=30),
            job_dir_for(s.instance.state_dir, key),
            poll_s=min(s.instance.poll_seconds, 2.0),
            on_disconnect=lambda exc: self._fail_if_instance_gone(),
        )

    def _fail_if_instance_gone(self) -> None:
        """A lost connection may mean a lost instance (spot interruption, its watchdog, someone in the console): ask
        EC2 at once. Taken back for its spot capacity, within aws.max_preemptions: Preempted (the run relaunches).
        Else fail naming why it went, with the MLflow run ended FAILED (no bundle: nothing to read)."""
        from airflow.sdk import get_current_context

        from orchestrator.cloud.ec2_describe import instance_gone_message
        from orchestrator.cloud.tasks import instance_state
        from orchestrator.instance.recovery import raise_if_recoverable

        info = instance_state(self._settings, self._ready.instance_id)
        gone = instance_gone_message(self._ready.instance_id, info)
        if gone:
            raise_if_recoverable(self._settings, get_current_context()["ti"], info, self._end_mlflow_run)
            self._end_mlflow_run()
            raise AirflowFailException(
                f"{gone}. It ended while training, so the run cannot finish; trigger it again (on-demand capacity "
                "avoids spot interruptions)."
            )

    def _recover(self, context: Context, lost: InstanceInfo) -> str:
        """Count the interruption, make a new instance ready (instance.recovery), start the job there again."""
        from orchestrator.instance.recovery import recover

        ti = context["ti"]
        run_id = str(ti.xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY) or "")
        if self._job is not None:
            self._job.close()
            self._job = None
        self._ready = recover(self._settings, ti, lost, run_id, self._end_mlflow_run)
        ti.xcom_push(key=RECOVERED_READY_KEY, value=self._ready.to_xcom())
        return self._start_job(context, run_id)

    def _end_mlflow_run(self) -> str | None:
        """The MLflow run this task created, marked FAILED if its job left it RUNNING; None before one exists."""
        from airflow.sdk import get_current_context

        from orchestrator.tracking.runs import end_mlflow_run

        run_id = get_current_context()["ti"].xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY)
        if run_id:
            end_mlflow_run(self._settings, run_id, "FAILED")
        return str(run_id) if run_id else None

    @fail_without_retry()
    def execute(self, context: Context) -> str:
        self._ready = current_ready(context["ti"], self.task_id, self.ready)
        return recovering(lambda: self._start(context), functools.partial(self._recover, context))

    def _start(self, context: Context) -> str:
        """Create (or find) the DAG run's MLflow run, then start the job or re-attach to it."""
        from orchestrator.config.connections import mlflow_credentials
        from orchestrator.config.resolve import run_config
        from orchestrator.datasets.training_data import training_data
        from orchestrator.instance.command import tracked_run
        from orchestrator.instance.recovery import preemptions
        from orchestrator.tracking.runs import credentials_in_env, log_dataset_manifest, start_training_run

        if finished := self._finished_by_an_earlier_try(context):
            self.log.info("MLflow run %s of this DAG run finished in an earlier try: reading its result", finished)
            return finished
        s = self._settings
        # Read again as the job starts: the run records the data as it is when it is downloaded.
        dataset = training_data(s)
        # Until MLflow names its run, the task's link is empty rather than missing (a missing one logs an error).
        context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value="")
        creds = mlflow_credentials(s.mlflow.conn_id)
        # The MLflow run is created here, named and tagged after this DAG run; the job trains into it (--run-id).
        tracked = tracked_run(
            s,
            self._ready,
            self.git_sha,
            lead=self._run_lead(context),
            dag_id=self.dag_id,
            run_id=context["run_id"],
            try_number=context["ti"].try_number,
            dataset_tags=dataset.tags() if dataset else None,
            parent_run_id=run_config(self.config).get("mlflow_parent_run_id", ""),
            # The image the instance runs, as plan_launch resolved it (the DAG's setup).
            image=LaunchPlan.from_xcom(context["ti"].xcom_pull(task_ids=LaunchPlan.STEP)),
            preemptions=len(preemptions(context["ti"])),
        )
        with credentials_in_env(creds.username, creds.password):
            created_run_id = start_training_run(
                s.mlflow.tracking_uri, s.mlflow.experiment, tracked, gate_metric=s.mlflow.metric
            )
            if dataset:
                log_dataset_manifest(s.mlflow.tracking_uri, created_run_id, dataset.manifest())
            # Published before training: the task's link opens the run while it trains, and the finishing step
            # (maybe on another worker, after a deferral) finds the run here.
            self._publish_run(context, created_run_id)
        return self._start_job(context, created_run_id)

    def _start_job(self, context: Context, created_run_id: str) -> str:
        """Start the job training into `created_run_id` on the instance (or re-attach to it), then follow it from
        the triggerer, or here until it exits."""
        from orchestrator.cloud.user_data import GUARD_COST_HELD
        from orchestrator.config.connections import mlflow_credentials
        from orchestrator.instance.command import training_command
        from orchestrator.instance.remote_job import RemoteJobError
        from orchestrator.instance.source_tree import commit_tree
        from orchestrator.instance.ssh import transient_ssh_errors

        s = self._settings
        creds = mlflow_credentials(s.mlflow.conn_id)
        env = {"MLFLOW_TRACKING_URI": s.mlflow.tracking_uri, **creds.as_env()}
        cap = self._cost_cap(context)
        if cap is not None and cap.passed(time.time()):
            self._fail_guarded(created_run_id, cap.reason, "train neither starts nor follows the job")
        job = self._job = self._remote_job(context)
        command = training_command(s, self.git_sha, job.paths.source_dir, created_run_id)
        try:
            started = job.start_or_attach(
                command.argv(),
                env=env,
                env_sh=f"{s.instance.state_dir}/env.sh",
                source=lambda: commit_tree(s, self.git_sha),
                # The instance's guard stops the job at the deadline, whether or not anyone follows it.
                cost_deadline=None if cap is None else (cap.file_text(), self._state_path(GUARD_COST_HELD)),
            )
        except BaseException as exc:
            job.close()
            if isinstance(exc, transient_ssh_errors()):
                # An instance ended while nobody watched refuses SSH: report it as ended, not as the SSH error.
                self._fail_if_instance_gone()
            raise
        self.log.info(
            "%s training job in %s on %s: %s",
            "Started" if started else "Re-attached to the",
            job.paths.job_dir,
            self._ready.instance_id,
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

    def _finished_by_an_earlier_try(self, context: Context) -> str | None:
        """On a retry, the MLflow run an earlier try's job trained to its end for this DAG run (FINISHED: `mlflow run`
        ends it so only when the training succeeded), published as this try's result.

        An outage of the control plane can kill every try that follows the job, however it ended; the result is in
        MLflow whatever became of the instance since (its watchdog may have ended it), so a retry reads it there
        rather than failing or training again."""
        from orchestrator.config.connections import mlflow_credentials
        from orchestrator.contracts import JOB_KEY_TAG
        from orchestrator.instance.job_script import job_key
        from orchestrator.tracking.runs import credentials_in_env, find_finished_run

        if context["ti"].try_number < 2:
            return None
        s = self._settings
        creds = mlflow_credentials(s.mlflow.conn_id)
        with credentials_in_env(creds.username, creds.password):
            key = job_key(self.dag_id, context["run_id"])
            run_id = find_finished_run(s.mlflow.tracking_uri, s.mlflow.experiment, {JOB_KEY_TAG: key})
            if run_id:
                self._publish_run(context, run_id)
        return run_id

    def _defer_following(
        self, context: Context, *, timeout_s: float, deadline: float, offset: int = 0, failures: int = 0
    ) -> NoReturn:
        """Hand the wait to the triggerer: no worker slot is held while the job trains."""
        from orchestrator.instance.job_script import job_dir_for, job_key
        from orchestrator.instance.remote_job import reconnect_delay_s
        from orchestrator.instance.triggers import RemoteJobTrigger

        s = self._settings
        paths = job_dir_for(s.instance.state_dir, job_key(self.dag_id, context["run_id"]))
        # A dropped connection is retried with backoff, as RemoteJob does in a worker.
        delay = reconnect_delay_s(failures) if failures else 0.0
        self.log.info("Following the job from the triggerer (log byte %d, %.0f s left)", offset, deadline - time.time())
        self.defer(
            trigger=RemoteJobTrigger(
                ssh_conn_id=s.instance.ssh_conn_id,
                host=self._ready.address,
                port=s.instance.ssh_port,
                user=s.instance.ssh_user,
                host_public_key=self._ready.host_public_key,
                job_dir=paths.job_dir,
                poll_s=min(s.instance.poll_seconds, 2.0),
                deadline=deadline,
                timeout_s=timeout_s,
                from_offset=offset,
                failures=failures,
                not_before=time.time() + delay,
                # What its on_kill needs to end the MLflow run KILLED when the task is stopped while deferred.
                mlflow_run_id=context["ti"].xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY) or "",
                tracking_uri=s.mlflow.tracking_uri,
                mlflow_conn_id=s.mlflow.conn_id,
            ),
            method_name="execute_complete",
        )

    @fail_without_retry()
    def execute_complete(self, context: Context, event: dict[str, Any]) -> str:
        """The trigger's event, on whichever worker picks it up: finish as the streaming path does."""
        self._ready = current_ready(context["ti"], self.task_id, self.ready)
        return recovering(lambda: self._complete(context, event), functools.partial(self._recover, context))

    def _complete(self, context: Context, event: dict[str, Any]) -> str:
        from orchestrator.instance.remote_job import (
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
        retry can help. A job lost or timed out on a live instance gets the post-mortem bundle first."""
        from airflow.sdk import get_current_context

        from orchestrator.instance.job_script import job_dir_for, job_key
        from orchestrator.instance.remote_job import RemoteJobLostError, RemoteJobTimeoutError

        # A job that vanished without an exit code often means the instance itself went away: say which.
        self._fail_if_instance_gone()
        if not isinstance(exc, (RemoteJobLostError, RemoteJobTimeoutError)):
            raise exc
        paths = job_dir_for(self._settings.instance.state_dir, job_key(self.dag_id, get_current_context()["run_id"]))
        if isinstance(exc, RemoteJobLostError):
            job = self._remote_job(get_current_context())
            try:
                guarded = self._guard_reason(job)
            finally:
                job.close()
            if guarded:
                # SIGKILLed by the guard: the wrapper could not record an exit code.
                run_id = self._end_mlflow_run()
                self._fail_guarded(run_id, guarded, "its guard stopped the job", self._postmortem(run_id, paths.log))
            # The job key is the DAG run's: a retry would only re-attach to the same dead job and wait again.
            where = self._postmortem(self._end_mlflow_run(), paths.log)
            raise AirflowFailException(
                f"{exc}{where}. A task retry cannot restart it: trigger a new DAG run."
            ) from None
        # Timed out: the job still runs (a retry re-attaches to it), so its MLflow run stays open.
        run_id = get_current_context()["ti"].xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY)
        raise RemoteJobTimeoutError(f"{exc}{self._postmortem(run_id, paths.log)}") from None

    def _cost_cap(self, context: Context) -> CostCap | None:
        """training.max_cost_usd as this instance's deadline, after the run's earlier instances (EC2 took them back)."""
        from orchestrator.instance.recovery import preemptions
        from orchestrator.observe.cost_cap import run_cost_cap

        plan = LaunchPlan.from_xcom(context["ti"].xcom_pull(task_ids=LaunchPlan.STEP))
        earlier = [str(p["instance_id"]) for p in preemptions(context["ti"])]
        return run_cost_cap(self._settings, earlier, self._ready.instance_id, plan.root_volume_gb)

    def _state_path(self, name: str) -> str:
        """A file of the instance's state folder (root's, written by the units of orchestrator.cloud.user_data)."""
        return f"{self._settings.instance.state_dir.rstrip('/')}/{name}"

    def _guard_reason(self, job: RemoteJob) -> str:
        """Why the instance's guard stopped the job (a stall, idle GPUs, the cost cap); "" when it did not, or when
        the instance cannot say (the run then fails on the job's own end)."""
        from orchestrator.cloud.user_data import GUARD_REASON
        from orchestrator.instance.ssh import transient_ssh_errors

        unreadable: tuple[type[BaseException], ...] = (OrchestratorError, *transient_ssh_errors())
        try:
            text = job.read_file(self._state_path(GUARD_REASON))
        except unreadable as exc:
            self.log.warning("Could not read the guard's reason on %s: %s", self._ready.instance_id, exc)
            return ""
        return (text or "").strip()

    def _fail_guarded(self, mlflow_run_id: str | None, reason: str, what: str, where: str = "") -> NoReturn:
        """The run ends here, on the guard's reason (or the cost cap reached before the job started): the MLflow run
        FAILED and tagged with it; no retry (the instance is powering off, or the budget is spent). `where`: where
        the post-mortem bundle went."""
        from orchestrator.contracts import GUARD_TAG
        from orchestrator.tracking.runs import end_mlflow_run, tag_mlflow_run

        if mlflow_run_id:
            tag_mlflow_run(self._settings, mlflow_run_id, {GUARD_TAG: reason})
            end_mlflow_run(self._settings, mlflow_run_id, "FAILED")
        raise AirflowFailException(
            f"{reason}: {what} on {self._ready.instance_id}"
            + (f" (MLflow run {mlflow_run_id})" if mlflow_run_id else "")
            + f"; the teardown terminates the instance{where}"
        )

    @staticmethod
    def _run_lead(context: Context) -> str:
        """How the MLflow run's name begins: a sweep's set and the values it sets (its Params left empty are the
        configured ones), or when and how this DAG run was triggered."""
        from orchestrator.config.run_params import JOB_PARAMS
        from orchestrator.tracking.runs import training_run_lead

        dag_run, params = context["dag_run"], context["params"]
        swept = {name: params[name] for name in JOB_PARAMS if params.get(name) not in (None, "")}
        run_type = str(getattr(dag_run.run_type, "value", dag_run.run_type))
        return training_run_lead(context["run_id"], run_type, dag_run.run_after, swept)

    def _publish_run(self, context: Context, run_id: str) -> None:
        """The MLflow run's id and UI address as XComs (the latter is the task's 'MLflow run' link)."""
        from orchestrator.tracking.runs import experiment_id_of
        from orchestrator.tracking.views import run_url

        s = self._settings
        url = run_url(s.mlflow.ui_base_url, experiment_id_of(s.mlflow.tracking_uri, run_id), run_id)
        context["ti"].xcom_push(key=MLFLOW_RUN_ID_KEY, value=run_id)
        context["ti"].xcom_push(key=MLFLOW_RUN_URL_KEY, value=url)
        self.log.info("MLflow run %s: %s", run_id, url)

    def _finish(self, context: Context, job: RemoteJob, exit_code: int) -> str:
        """The job ended with `exit_code`: check it trained into this run's MLflow run, then succeed or fail."""
        from orchestrator.config.connections import mlflow_credentials
        from orchestrator.instance.command import exit_description, parse_mlflow_run_id
        from orchestrator.instance.job_script import EXIT_SIGKILL, EXIT_SIGTERM
        from orchestrator.instance.remote_job import RemoteJobError
        from orchestrator.tracking.runs import credentials_in_env, end_mlflow_run

        s = self._settings
        created_run_id = context["ti"].xcom_pull(task_ids=self.task_id, key=MLFLOW_RUN_ID_KEY)
        try:
            if exit_code in (EXIT_SIGTERM, EXIT_SIGKILL):
                # An OS shutdown (EC2 terminate, spot reclaim) stops the job before the instance goes: name that.
                self._fail_if_instance_gone()
            log_text = job.read_log()
            guarded = self._guard_reason(job) if exit_code != 0 else ""
        except RemoteJobError as exc:
            self._fail_for(exc)
        finally:
            job.close()
        run_id = parse_mlflow_run_id(log_text)
        if guarded:
            guarded_run = run_id or created_run_id
            where = attach_or_log(self._settings, guarded_run, self._bundle(job.paths.log), self.log)
            self._fail_guarded(guarded_run, guarded, "its guard stopped the job", where)
        if exit_code != 0:
            # `mlflow run` ends the run it trained into; if it failed before reaching it (a failed checkout), say so.
            if created_run_id:
                end_mlflow_run(s, created_run_id, "FAILED")
            bundle = self._bundle(job.paths.log)
            # The job ran to its end: a retry would only re-attach to the same finished job.
            raise AirflowFailException(
                f"training {exit_description(exit_code, log_text, bundle.get('kernel.log', ''))} on "
                f"{self._ready.instance_id}"
                + (f" (MLflow run {run_id})" if run_id else " before MLflow created a run")
                + ": the lines above, prefixed 'train |', show why"
                + attach_or_log(self._settings, run_id or created_run_id, bundle, self.log)
            )
        if not run_id:
            raise AirflowException("training succeeded but its log names no MLflow run: was it run by `mlflow run`?")
        if run_id != created_run_id:
            # The job's own log is the truth (a retry that did not find the first try's run created another).
            self.log.warning("The job trained into MLflow run %s, not %s: linking to that run", run_id, created_run_id)
            creds = mlflow_credentials(s.mlflow.conn_id)
            with credentials_in_env(creds.username, creds.password):
                self._publish_run(context, run_id)
        self.log.info(
            "Post-mortem bundle of the success (small)%s", self._postmortem(run_id, job.paths.log, small=True)
        )
        return run_id

    def _postmortem(self, mlflow_run_id: str | None, job_log: str, *, small: bool = False) -> str:
        """Before the teardown terminates it: the instance's logs as the MLflow run's `postmortem/` artifacts (or
        into this task log without a run); what the failure message adds to say where they are. `small`: a
        success's few parts."""
        return attach_or_log(self._settings, mlflow_run_id, self._bundle(job_log, small=small), self.log)

    def _bundle(self, job_log: str, *, small: bool = False) -> dict[str, str]:
        return for_run(self._settings, self._ready.address, self._ready.host_public_key, job_log, small=small)

    def on_kill(self) -> None:
        """The task was killed (marked failed, timed out, cancelled): the remote job must not run on unattended."""
        if self._job is not None:
            self.log.warning("Task killed: stopping the remote training job in %s", self._job.paths.job_dir)
            with contextlib.suppress(Exception):
                self._job.kill()
