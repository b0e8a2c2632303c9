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
