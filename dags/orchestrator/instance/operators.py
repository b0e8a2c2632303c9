"""The DAG's wait_ready step on the instance, and the MLflow run link of the train step (instance.training_operator).

The launch, which waits too, is cloud.operators. The ready wait does not sleep in a worker for long: it defers to
the triggerer (instance.triggers) unless training.deferrable is false.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException

from orchestrator.contracts import MLFLOW_RUN_URL_KEY, RUNNING_KEY
from orchestrator.contracts_steps import LaunchedInstance, RunningInstance
from orchestrator.errors import fail_without_retry

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

    from orchestrator.config.settings import Settings


class MlflowRunLink(BaseOperatorLink):
    """The 'MLflow run' button on the task: the run this training produced."""

    name = "MLflow run"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return str(XCom.get_value(key=MLFLOW_RUN_URL_KEY, ti_key=ti_key) or "")


class InstanceReadyOperator(BaseOperator):
    """Wait, bounded, until the instance runs, answers SSH with its pinned host key and its bootstrap succeeded.

    The EC2 check runs here; the SSH and bootstrap wait (up to instance.ready_timeout_minutes, the bootstrap log
    streamed into the task log as `bootstrap | ...`) runs in the triggerer, or here when training.deferrable is false.
    A spot instance EC2 takes back meanwhile is replaced here (instance.recovery), within aws.max_preemptions.
    """

    template_fields: Sequence[str] = ("config", "launched")
    ui_color = "#e3f2fd"

    def __init__(self, *, config: Any, launched: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.launched = launched

    @functools.cached_property
    def _settings(self) -> Settings:
        """This task's settings, built once from its rendered config (the run's resolved configuration)."""
        from orchestrator.config.resolve import settings_of

        return settings_of(self.config)

    @fail_without_retry()
    def execute(self, context: Context) -> dict[str, Any]:
        from orchestrator.cloud.tasks import wait_running
        from orchestrator.instance.ready import wait_ready_in_worker
        from orchestrator.instance.ssh import InstanceUnreachableError

        s = self._settings
        launched = LaunchedInstance.from_xcom(self.launched)
        running = wait_running(s, launched)
        if not s.training.deferrable:
            try:
                return wait_ready_in_worker(s, launched, running).to_xcom()
            except (AirflowFailException, InstanceUnreachableError) as exc:
                return self._not_ready(context, launched, running, str(exc))
        # For execute_complete, on whichever worker resumes the task.
        context["ti"].xcom_push(key=RUNNING_KEY, value=running.to_xcom())
        self._defer_bootstrap(launched, running, log_offset=0)

    def _defer_bootstrap(self, launched: LaunchedInstance, running: RunningInstance, log_offset: int) -> NoReturn:
        from orchestrator.instance.triggers import BootstrapTrigger

        s = self._settings
        self.defer(
            trigger=BootstrapTrigger(
                ssh_conn_id=s.instance.ssh_conn_id,
                host=running.address,
                port=s.instance.ssh_port,
                user=s.instance.ssh_user,
                host_public_key=launched.host_public_key,
                state_dir=s.instance.state_dir,
                poll_s=s.instance.poll_seconds,
                started_at=running.started_at,
                deadline=running.deadline,
                log_offset=log_offset,
            ),
            method_name="execute_complete",
        )

    def _not_ready(
        self,
        context: Context,
        launched: LaunchedInstance,
        running: RunningInstance | None,
        message: str,
        unreachable_at: int | None = None,
    ) -> dict[str, Any]:
        """The wait ended without a ready instance. EC2 took the spot instance back: a new one, made ready here
        (instance.recovery). Unreachable (`unreachable_at`, the log offset reached) while EC2 says it still runs:
        wait on. Else fail with `message` and what the instance left (_failure)."""
        from orchestrator.cloud.ec2_describe import instance_gone_message
        from orchestrator.cloud.tasks import instance_state
        from orchestrator.instance.recovery import preempted, recover

        info = instance_state(self._settings, launched.instance_id)
        if preempted(info):
            return recover(self._settings, context["ti"], info).to_xcom()
        if unreachable_at is not None and running and not instance_gone_message(launched.instance_id, info):
            self.log.warning("%s, but EC2 says %s still runs: waiting on", message, launched.instance_id)
            self._defer_bootstrap(launched, running, unreachable_at)
        raise AirflowFailException(self._failure(launched, running, message))

    def _failure(self, launched: LaunchedInstance, running: RunningInstance | None, message: str) -> str:
        """The failure's message: the instance's end and why when it is gone (its SSH errors say nothing true),
        else `message` and, before the teardown terminates it, the instance's logs into this task log (no MLflow
        run exists yet). No logs when it answered with another host key: nothing is sent to that host."""
        from orchestrator.cloud.tasks import instance_gone
        from orchestrator.instance.postmortem import for_run, log_to_task_log

        gone = instance_gone(self._settings, launched.instance_id)
        if gone:
            return f"{gone}. It ended before it was ready; trigger the run again."
        if not running or "does not match the pinned key" in message:
            return message
        bundle = for_run(self._settings, running.address, launched.host_public_key)
        log_to_task_log(bundle, self.log)
        return message + (" The instance's logs are above, prefixed 'postmortem |'." if bundle else "")

    @fail_without_retry()
    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from orchestrator.instance.ready import ready_result

        launched = LaunchedInstance.from_xcom(self.launched)
        pushed = context["ti"].xcom_pull(task_ids=self.task_id, key=RUNNING_KEY)
        running = RunningInstance.from_xcom(pushed) if pushed else None
        status = event.get("status")
        if status != "ready" or running is None:
            message = str(event.get("message") or f"unexpected event: {event!r}")
            # A failed bootstrap, another host key or a deadline counted from the launch: no retry can fix these.
            unreachable_at = int(event["log_offset"]) if status == "unreachable" else None
            return self._not_ready(context, launched, running, message, unreachable_at)
        return ready_result(
            self._settings,
            launched,
            running,
            float(event["seconds_to_ssh"]),
            float(event["seconds_to_ready"]),
            event.get("bootstrap_phases_s") or {},
        ).to_xcom()
