"""The training DAG's runs as the DAGs that start them (ec2_retrain, ec2_sweep) see them: its id and their states."""

from __future__ import annotations

from typing import Any

TRAINING_DAG_ID = "ec2_training"


def training_run_state(ti: Any, run_id: str) -> str | None:
    """The state of ec2_training's run `run_id` ("success", "failed", ...) as the task instance `ti` reads it through
    the Execution API; None when there is no such run."""
    if not ti.get_dr_count(dag_id=TRAINING_DAG_ID, run_ids=[run_id]):
        return None
    state = ti.get_dagrun_state(dag_id=TRAINING_DAG_ID, run_id=run_id)
    # The task SDK answers with an enum (str, Enum) whose str() is "DagRunState.FAILED": its value is the state.
    return str(getattr(state, "value", state))


# ec2_training's teardowns (tests/dags check this against the DAG): the steps of a run are its other tasks.
TRAINING_TEARDOWNS = ("terminate", "report", "verdict")


def training_step_states(ti: Any, run_id: str) -> dict[str, str]:
    """{task_id: state} of ec2_training's run `run_id`'s finished tasks, as `ti` reads them through the Execution
    API: with observe.verdict.decide, what the run came to, whatever its own state says."""
    from orchestrator.tracking.training_runs import task_outcomes

    return {task_id: state for task_id, (state, _) in task_outcomes(ti, TRAINING_DAG_ID, run_id).items()}


def task_outcomes(ti: Any, dag_id: str, run_id: str) -> dict[str, tuple[str, float | None]]:
    """{task_id: (state, seconds)} of the run's finished tasks, from Airflow's execution API. A deferred task's
    duration spans its deferral (its start date is kept when it resumes)."""
    return {
        str(crumb["task_id"]): (str(getattr(crumb["state"], "value", crumb["state"])), crumb.get("duration"))
        for crumb in ti.get_task_breadcrumbs(dag_id, run_id)
    }
