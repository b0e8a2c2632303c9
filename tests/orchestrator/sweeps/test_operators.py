"""What the sweep reads of a set's ec2_training run through a task instance."""

from __future__ import annotations

from typing import Any

from airflow.utils.state import DagRunState

from orchestrator.sweeps.operators import NOT_CREATED, child_state


class _TaskInstance:
    """The two reads child_state makes of a RuntimeTaskInstance, answered from a table of runs."""

    def __init__(self, runs: dict[str, Any]) -> None:
        self.runs = runs

    def get_dr_count(self, dag_id: str, run_ids: list[str]) -> int:
        assert dag_id == "ec2_training"
        return sum(1 for run_id in run_ids if run_id in self.runs)

    def get_dagrun_state(self, dag_id: str, run_id: str) -> Any:
        return self.runs[run_id]


def test_a_sets_state_is_the_runs_state_name_or_not_created() -> None:
    ti = _TaskInstance({"s__set1": DagRunState.SUCCESS, "s__set2": DagRunState.FAILED, "s__set3": "running"})
    assert [child_state(ti, f"s__set{n}") for n in (1, 2, 3, 4)] == ["success", "failed", "running", NOT_CREATED]
