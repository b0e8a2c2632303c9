"""orchestrator.observe.gather: the phases of a run from its steps' durations and what wait_ready measured (pure);
the report against real runs is checked end to end in tests/dags/test_training_dag.py."""

from __future__ import annotations

from orchestrator.contracts_steps import ReadyInstance
from orchestrator.observe.gather import airflow_run_url, phases_of
from tests.support.step_results import READY as READY_XCOM

READY = ReadyInstance.from_xcom(READY_XCOM)


def test_every_phase_of_a_finished_run() -> None:
    durations = {"ci_gate": 120.0, "launch": 14.04, "train": 700.0, "evaluate": 3.0, "terminate": 41.0}
    assert phases_of(durations, READY, 650.0) == {
        "ci_wait": 120.0,
        "launch": 16.0,  # the launch step and the rest of the wait for state running
        "boot": 30.5,  # running to SSH
        "bootstrap.user": 0.0,
        "bootstrap.gpu": 1.0,
        "bootstrap.packages": 20.0,
        "bootstrap.python": 40.0,
        "training": 650.0,  # the job's own time, not the train task's
        "evaluation": 3.0,
        "teardown": 41.0,
    }


def test_phases_the_run_never_reached_are_absent() -> None:
    assert phases_of({"ci_gate": 5.0, "launch": 9.0, "terminate": 1.0}, None, None) == {
        "ci_wait": 5.0,
        "launch": 9.0,
        "teardown": 1.0,
    }


def test_airflow_run_url_quotes_the_run_id() -> None:
    url = airflow_run_url("ec2_training", "manual__2026-11-26T20:00:00+00:00")
    assert url.endswith("/dags/ec2_training/runs/manual__2026-11-26T20%3A00%3A00%2B00%3A00")
