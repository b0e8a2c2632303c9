"""What a finished sweep's sets came to: which set is the best to gate, the sweep's one-line verdict, and the
summary a person reads in the `summary` task (best set, its metric, the gate's verdict, the parent run). Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.contracts_steps import Evaluation
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


def summary(
    outcomes: Sequence[SetOutcome],
    gated: Mapping[str, Any] | None,
    *,
    metric: str,
    greater_is_better: bool,
    parent_url: str,
) -> tuple[bool, str]:
    """(the sweep succeeded, what it came to): the verdict, then the best set and its `metric`, the champion gate's
    decision (gate_best_set's result; None when that task did not finish) and the parent MLflow run's page."""
    ok, sentence = verdict(outcomes)
    parts = [sentence]
    best = best_set(outcomes, greater_is_better=greater_is_better)
    parts.append(
        f"best: {best.label}, {metric} = {best.value:.4f}" if best and best.value is not None else "best: none"
    )
    if gated is None:
        ok = False
        parts.append("the champion gate did not finish: its log says why")
    elif gated.get("evaluation"):
        evaluation = Evaluation.from_xcom(gated["evaluation"])
        decision = f"promoted as version {evaluation.model_version}" if evaluation.promoted else "not promoted"
        parts.append(f"champion gate: {decision} ({evaluation.reason})")
    else:
        parts.append("champion gate: no set to gate, the champion stays")
    parts.append(f"parent MLflow run: {parent_url}")
    return ok, "; ".join(parts)
