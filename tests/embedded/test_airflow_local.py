"""The local Airflow harness's waits: a run cannot end once a component it needs has exited, so the wait says so."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from embedded.airflow_local import AirflowError, LocalAirflow


def test_a_run_wait_fails_at_once_naming_the_component_that_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    airflow = LocalAirflow(tmp_path, {})
    exited = subprocess.Popen(["sh", "-c", "exit 3"])
    exited.wait()
    airflow._procs["triggerer"] = exited
    looks: list[str] = []

    def still_running(dag_id: str, run_id: str) -> dict[str, Any]:
        looks.append(run_id)
        return {"state": "running"}

    monkeypatch.setattr(airflow, "dag_run", still_running)
    with pytest.raises(AirflowError, match=r"triggerer exited with code 3; see .*components/triggerer\.log"):
        airflow.wait_for_runs("ec2_training", ["r1"], timeout_s=600)
    assert looks == ["r1"], "failed on the first look, not at the timeout"
