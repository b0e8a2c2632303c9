"""What the DAGs that start training runs read of them through a task instance."""

from __future__ import annotations

from typing import Any

from airflow.sdk.api.datamodels._generated import DagRunState

from orchestrator.datasets.retrain import base_run_id, training_run_id
from orchestrator.sweeps.operators import NOT_CREATED, child_state
from orchestrator.tracking.training_runs import training_run_state


class _TaskInstance:
    """The two reads of a RuntimeTaskInstance, answered from a table of ec2_training's runs as the SDK answers them."""

    def __init__(self, runs: dict[str, Any], steps: dict[str, dict[str, str]] | None = None) -> None:
        self.runs = runs
        self.steps = steps or {}

    def get_task_breadcrumbs(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        assert dag_id == "ec2_training"
        return [{"task_id": t, "state": state, "duration": 1.0} for t, state in self.steps.get(run_id, {}).items()]

    def get_dr_count(self, dag_id: str, run_ids: list[str]) -> int:
        assert dag_id == "ec2_training"
        return sum(1 for run_id in run_ids if run_id in self.runs)

    def get_dagrun_state(self, dag_id: str, run_id: str) -> Any:
        assert dag_id == "ec2_training"
        return self.runs[run_id]


def test_a_runs_state_is_its_name_or_none() -> None:
    ti = _TaskInstance(
        {"a": DagRunState.SUCCESS, "b": DagRunState.FAILED, "c": "running"},
        {"a": {"train": "success", "terminate": "success"}},
    )
    assert [training_run_state(ti, run_id) for run_id in "abcd"] == ["success", "failed", "running", None]
    assert child_state(ti, "d") == NOT_CREATED


STEPS = ("resolve_config", "ci_gate", "plan_launch", "launch", "wait_ready", "train", "evaluate")


def test_a_set_counts_as_trained_only_when_its_steps_succeeded() -> None:
    done = {step: "success" for step in STEPS} | {"terminate": "success", "report": "success", "verdict": "success"}
    # b: marked success by hand before evaluate ran; c: a failed teardown never decides.
    ti = _TaskInstance(
        {"a": DagRunState.SUCCESS, "b": DagRunState.SUCCESS, "c": DagRunState.SUCCESS, "d": DagRunState.FAILED},
        {"a": done, "b": done | {"evaluate": "skipped"}, "c": done | {"terminate": "failed"}},
    )
    assert child_state(ti, "a") == "success"
    assert child_state(ti, "b") == "failed (the run was stopped by hand: evaluate never ran)"
    assert child_state(ti, "c") == "success"
    assert child_state(ti, "d") == "failed"


def test_a_failed_retraining_read_from_the_sdk_moves_to_the_next_run_id() -> None:
    sha, digest = "a" * 40, "b" * 64
    ti = _TaskInstance({base_run_id(sha, digest): DagRunState.FAILED})
    assert (
        training_run_id(sha, digest, lambda run_id: training_run_state(ti, run_id)) == base_run_id(sha, digest) + "__2"
    )
