"""A sweep's set as one ec2_training DAG run: triggered, waited for in the triggerer, re-attached on a retry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.trigger_dagrun import XCOM_RUN_ID, TriggerDagRunOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from orchestrator.tracking.training_runs import (
    TRAINING_DAG_ID,
    TRAINING_TEARDOWNS,
    training_run_state,
    training_step_states,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

# A set whose run was never created (its trigger failed first) has no DAG run state of its own.
NOT_CREATED = "not created"


class SweepSetOperator(TriggerDagRunOperator):
    """Trigger one ec2_training run with a fixed run id and wait for it, deferred, until it ends.

    The provider's operator fails (or skips) a retry that finds its run already created; this one follows that
    run instead, so a worker lost after the trigger never starts a set twice. A set whose run failed fails at once:
    no retry can change a finished run.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_dag_id", TRAINING_DAG_ID)
        kwargs.setdefault("wait_for_completion", True)
        kwargs.setdefault("deferrable", True)
        # A paused ec2_training would leave every set queued for ever: fail instead, saying so.
        kwargs.setdefault("fail_when_dag_is_paused", True)
        # ec2_training refuses a conf key it does not know: OpenLineage's parent info would fail every set.
        kwargs.setdefault("openlineage_inject_parent_info", False)
        super().__init__(**kwargs)

    def execute(self, context: Context) -> None:
        from airflow.providers.standard.triggers.external_task import DagStateTrigger

        run_id = str(self.trigger_run_id)
        if not context["ti"].get_dr_count(dag_id=self.trigger_dag_id, run_ids=[run_id]):
            super().execute(context)
            return
        self.log.info("%s run %s exists (an earlier try triggered it): following it", self.trigger_dag_id, run_id)
        context["ti"].xcom_push(key=XCOM_RUN_ID, value=run_id)
        self.defer(
            trigger=DagStateTrigger(
                dag_id=self.trigger_dag_id,
                states=[*self.allowed_states, *self.failed_states],
                execution_dates=None,
                run_ids=[run_id],
                poll_interval=self.poke_interval,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: tuple[str, dict[str, Any]]) -> None:
        try:
            super().execute_complete(context, event)
        except AirflowException as exc:
            raise AirflowFailException(f"{exc}: its failed task says why; the other sets run on") from None


def child_state(ti: Any, run_id: str) -> str:
    """The state of a set's ec2_training run, as the task instance `ti` can read it; NOT_CREATED if none exists.

    A run that says success counts only if its steps say so too (observe.verdict): a run marked success by hand, or
    one decided without its verdict teardown, is not a trained set."""
    from orchestrator.observe.verdict import SUCCESS, decide

    state = training_run_state(ti, run_id)
    if state != SUCCESS:
        return state or NOT_CREATED
    verdict = decide(training_step_states(ti, run_id), TRAINING_TEARDOWNS)
    return SUCCESS if verdict.ok else f"failed ({verdict.reason})"
