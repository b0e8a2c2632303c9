"""What a finished sweep's sets came to: which set is the best to gate, and the sweep's one-line verdict. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.sweeps.sets import describe

SUCCESS = "success"


@dataclass(frozen=True)
class SetOutcome:
    """One set's ec2_training run as the sweep sees it once every set has finished."""

    number: int  # 1-based, in the order of the sweep's sets
    params: Mapping[str, Any]
    dag_run_id: str
    state: str  # the ec2_training run's state; "not created" when its trigger never created it
    mlflow_run_id: str | None = None
    mlflow_status: str | None = None
    value: float | None = None  # the gating metric (mlflow.metric) of its MLflow run

    @property
    def label(self) -> str:
        return f"set {self.number} ({describe(self.params)})"


def best_set(outcomes: Sequence[SetOutcome], *, greater_is_better: bool) -> SetOutcome | None:
    """The set whose run succeeded with the best metric; ties go to the earlier set. None when no set qualifies.

    Only a run whose DAG run succeeded counts: its own evaluate read the metric, and its instance was terminated.
    """
    scored = [
        (o.value, o) for o in outcomes if o.state == SUCCESS and o.mlflow_status == "FINISHED" and o.value is not None
    ]
    if not scored:
        return None
    sign = 1.0 if greater_is_better else -1.0
    # max() keeps the first of equal keys: the earlier set.
    return max(scored, key=lambda pair: sign * pair[0])[1]


def verdict(outcomes: Sequence[SetOutcome]) -> tuple[bool, str]:
    """(every set succeeded, the sentence saying how many failed and which), for the summary task and the UI. A set
    succeeded when its run did and its MLflow run (when read) is FINISHED."""
    failed = [o for o in outcomes if o.state != SUCCESS or o.mlflow_status not in (None, "FINISHED")]
    total = len(outcomes)
    if not failed:
        return True, f"all {total} sets succeeded"
    which = "; ".join(
        f"{o.label}: ec2_training run {o.dag_run_id} {o.state}"
        + (f", MLflow run {o.mlflow_run_id} {o.mlflow_status}" if o.mlflow_status not in (None, "FINISHED") else "")
        for o in failed
    )
    return False, f"{len(failed)} of {total} sets failed: {which}"
