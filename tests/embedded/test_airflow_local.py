"""The local Airflow harness as a supervisor: a component that dies is started again after a back-off; one that keeps
dying at once is given up, and a run's wait then fails naming it; one held down stays down. Its settings: the
production deployment's execution-API retries, and on SQLite a raised busy timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.deploy import airflow_local
from embedded.deploy.airflow_local import AirflowError, LocalAirflow
from embedded.deploy.production import deployment_settings

WAIT_S = 30


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def supervised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalAirflow, list[str]]]:
    """A harness supervising one stand-in "triggerer" whose command the test sets (no Airflow started)."""
    monkeypatch.setattr(airflow_local, "RESTART_BACKOFF_S", 0.05)
    monkeypatch.setattr(airflow_local, "SUPERVISE_INTERVAL_S", 0.02)
    airflow = LocalAirflow(tmp_path, {})
    command = ["sleep", "600"]
    monkeypatch.setattr(airflow, "_command", lambda name: command)
    yield airflow, command
    airflow.stop()


def start(airflow: LocalAirflow) -> None:
    airflow._start_component("triggerer")
    airflow._supervisor.start()


def test_a_component_that_dies_after_running_is_started_again(
    supervised: tuple[LocalAirflow, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    airflow, command = supervised
    monkeypatch.setattr(airflow_local, "FAST_DEATH_S", 0.1)
    command[:] = ["sh", "-c", "sleep 0.3; echo ran; exit 1"]
    start(airflow)
    wait_until(lambda: airflow.log_file("triggerer").read_text().count("ran") > airflow_local.MAX_FAST_DEATHS + 1)
    assert airflow.given_up == {}, "deaths after a while in service are never given up"


def test_a_component_that_keeps_dying_at_once_is_given_up_and_a_run_wait_says_so(
    supervised: tuple[LocalAirflow, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    airflow, command = supervised
    command[:] = ["sh", "-c", "echo started; exit 3"]
    start(airflow)
    wait_until(lambda: "triggerer" in airflow.given_up)
    starts = airflow.log_file("triggerer").read_text().count("started")
    assert starts == airflow_local.MAX_FAST_DEATHS
    time.sleep(0.5)
    assert airflow.log_file("triggerer").read_text().count("started") == starts, "not started again once given up"
    looks: list[str] = []

    def still_running(dag_id: str, run_id: str) -> dict[str, Any]:
        looks.append(run_id)
        return {"state": "running"}

    monkeypatch.setattr(airflow, "dag_run", still_running)
    with pytest.raises(
        AirflowError, match=r"triggerer exited 5 times in a row .* \(last exit code 3\): given up; see .*triggerer\.log"
    ):
        airflow.wait_for_runs("ec2_training", ["r1"], timeout_s=600)
    assert looks == ["r1"], "failed on the first look, not at the timeout"


def test_a_component_held_down_stays_down_until_released(supervised: tuple[LocalAirflow, list[str]]) -> None:
    airflow, _ = supervised
    start(airflow)
    first = airflow.component_pids()["triggerer"]
    with airflow.component_down("triggerer") as stopped:
        time.sleep(0.5)
        assert "triggerer" not in airflow.component_pids(), "the supervisor left it down"
    assert stopped == first
    assert airflow.component_pids()["triggerer"] != first
    assert airflow.given_up == {}


def test_the_deployments_execution_api_retries_and_sqlite_busy_timeout(tmp_path: Path) -> None:
    env = LocalAirflow(tmp_path, {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/a.db"}).env
    retries = deployment_settings()[airflow_local.EXECUTION_API_RETRIES]
    assert int(retries) >= 10 and env[airflow_local.EXECUTION_API_RETRIES] == retries
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] == "embedded.deploy.airflow_local.SQLITE_CONNECT_ARGS"
    assert (
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC"] == "embedded.deploy.airflow_local.SQLITE_CONNECT_ARGS"
    )
    assert airflow_local.SQLITE_CONNECT_ARGS["timeout"] >= 60
    postgres = LocalAirflow(tmp_path, {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://db/x"}).env
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in postgres, "psycopg2 takes no `timeout`"


def test_links_to_the_ui_use_the_host_it_is_served_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Notifications and run reports link to Airflow under [api] base_url: 127.0.0.1, where the UI is served and
    logged in to, never Airflow's fallback localhost (another origin, so the browser's login does not carry over)."""
    from orchestrator.observe.gather import airflow_run_url

    env = LocalAirflow(tmp_path, {}, port=8080).env
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:8080"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", env["AIRFLOW__API__BASE_URL"])
    assert airflow_run_url("ec2_training", "demo__1") == "http://127.0.0.1:8080/dags/ec2_training/runs/demo__1"
