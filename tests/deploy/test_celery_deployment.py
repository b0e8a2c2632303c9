"""The production topology on this machine: Airflow on PostgreSQL, the CeleryExecutor on Redis with two workers,
scheduler, dag-processor, triggerer and api-server, MLflow on PostgreSQL with its artifacts in S3 (the moto server).

It is docker-compose.yaml's deployment (tests/deploy/test_compose.py checks that they match), run on the machine's
own PostgreSQL and Redis: the test makes and drops its own databases and claims its own Redis database number. Its
connections carry the planted secrets. It runs the suite's load batch, 8 DAG runs at once under aws.max_instances = 3
(a row of the fault table), then kills a whole worker (its process tree) while `train` runs on it.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load_benchmark import load_settings
from embedded.deploy.airflow_local import LocalAirflow
from embedded.deploy.load import DAG_ID, run_batch
from embedded.deploy.production import (
    POSTGRES_PORT,
    REDIS_PORT,
    PostgresDatabase,
    RedisDatabase,
    celery_environment,
    deployment_settings,
)
from embedded.deploy.stack import EmbeddedStack
from tests.conftest import REPO
from tests.support.fault_table import FaultTable
from tests.support.faults import OnTraining, hold_job, release_after_reattach, scan
from tests.support.pipeline import ProcessListSampler, planted_connections, training_job_command
from tests.support.tools import missing_tool

# Never alongside tests/faults/test_scheduler_faults.py (the same group): two Airflow deployments at once would
# overload a 2-core machine. `make test` runs pytest with --dist loadgroup.
# The runs' own waits (up to 900 s) fail first, with the runs' states: pytest's default 600 s must not cut them short.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("airflow-deployment"), pytest.mark.timeout(1800)]

RUNS = 8
CAP = 3
# docker-compose.yaml runs as many (tests/deploy/test_compose.py).
WORKERS = 2
MLFLOW_BUCKET = "mlflow"
# The deployment's own settings (config/deployment.env) with a dead worker noticed sooner, so the test is short.
# Live tasks heartbeat every 5 s: 30 s is still 6 heartbeats missed in a row on a loaded machine.
FAST_DETECTION = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
}


@dataclass
class Deployment:
    stack: EmbeddedStack
    airflow: LocalAirflow
    mlflow_db: PostgresDatabase
    broker: RedisDatabase


def require_servers() -> None:
    """PostgreSQL and Redis on loopback, as the CI machines run them; elsewhere the test skips, saying why."""
    for name, port in (("PostgreSQL", POSTGRES_PORT), ("Redis", REDIS_PORT)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError as exc:
            missing_tool(f"needs {name} on 127.0.0.1:{port} (CI machines run it): {exc}")


@pytest.fixture(scope="module")
def deployment(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The session's embedded stack (one per process: moto's state is) for AWS, GitHub and the instances, with a
    production-like MLflow of the deployment's own: on PostgreSQL, its artifacts in the stack's S3."""
    require_servers()
    if not stack.cloud.private_disks:
        missing_tool("concurrent instances need their own disks: mount namespaces, i.e. root (CI runs as root)")
    with (
        PostgresDatabase("ec2_trainer_airflow") as airflow_db,
        PostgresDatabase("ec2_trainer_mlflow") as mlflow_db,
        RedisDatabase() as broker,
        stack.s3_mlflow(tmp_path_factory.mktemp("deploy-mlflow"), mlflow_db.url(), MLFLOW_BUCKET) as mlflow,
    ):
        env = {
            **stack.environment(),
            **planted_connections(stack)[1],
            "TRAINER__MLFLOW__TRACKING_URI": mlflow.url,
            **load_settings(CAP),
            **celery_environment(airflow_db.url(), broker.url),
            **FAST_DETECTION,
        }
        with (
            stack.cloud.policies_with({"PROJECT": env["TRAINER__AWS__PROJECT_TAG"]}),
            LocalAirflow(
                tmp_path_factory.mktemp("deploy-airflow"), env, workers=WORKERS, worker_concurrency=4
            ) as airflow,
        ):
            airflow.wait_for_dag(DAG_ID)
            yield Deployment(stack, airflow, mlflow_db, broker)


def test_settings_come_from_the_one_list() -> None:
    env = celery_environment("postgresql+psycopg2://u@h/db", "redis://h:6379/1")
    assert deployment_settings().items() <= env.items()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+postgresql+psycopg2://u@h/db"
    # Above the longest task's default bound: the training's, the launch's wait for a slot, the ready wait's.
    defaults = tomllib.loads((REPO / "config" / "defaults.toml").read_text())
    longest_minutes = max(
        defaults["training"]["timeout_minutes"],
        defaults["aws"]["instance_wait_minutes"],
        defaults["instance"]["ready_timeout_minutes"],
    )
    assert int(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"]) > longest_minutes * 60
    with pytest.raises(ValueError, match="postgresql"):
        celery_environment("postgresql://u@h/db", "redis://h:6379/1")


def test_many_runs_at_once_on_two_workers_stay_under_the_cap_apart_and_clean(
    deployment: Deployment,
    sha: str,
    planted_in_airflow: dict[str, str],
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> None:
    stack, airflow = deployment.stack, deployment.airflow
    report = run_batch(
        stack,
        airflow,
        runs=RUNS,
        cap=CAP,
        project_tag=load_settings(CAP)["TRAINER__AWS__PROJECT_TAG"],
        conf={"git_ref": sha},
        timeout_s=900,
        prefix="celery",
    )
    print(report.render())
    worker_s, train_s = report.train_slot_seconds()

    assert report.problems() == []
    # Deferred, train holds a worker only to start the job and to finish: measured, and less than its duration.
    assert 0 < worker_s < train_s, (worker_s, train_s)
    assert report.max_live_instances == CAP, "the cap was never reached: the batch did not test it"
    assert processes.saw(training_job_command(stack)), "the sampler never saw a training job"
    leaks = scan(planted_in_airflow, stack, airflow, {r.run_id: r.instance_id for r in report.runs}, processes)
    assert leaks == {}
    tis = [ti for run in report.runs for ti in airflow.task_instances(DAG_ID, run.run_id).values()]
    hosts = {ti["hostname"] for ti in tis if ti["hostname"]}
    assert hosts == set(airflow.workers), f"tasks ran on {hosts}, not on both workers"
    # MLflow on PostgreSQL, its artifacts in S3: every run's row in the database and its files in the bucket.
    mlflow_runs = {run.mlflow_run_id for run in report.runs}
    assert mlflow_runs <= set(_mlflow_run_ids(deployment.mlflow_db))
    keys = [
        obj["Key"]
        for page in stack.cloud.client("s3").get_paginator("list_objects_v2").paginate(Bucket=MLFLOW_BUCKET)
        for obj in page.get("Contents", [])
    ]
    assert all(any(f"/{run_id}/artifacts/" in key for key in keys) for run_id in mlflow_runs), keys[:20]
    fault_table.record(
        f"{RUNS} DAG runs at once, aws.max_instances={CAP}, Celery deployment, {WORKERS} workers",
        f"all succeed; at most {CAP} instances live; each run its own instance, key, job; none left; tasks on every "
        "worker; MLflow runs in PostgreSQL, artifacts in S3",
        f"{dict(report.states)}; max {report.max_live_instances} live; no sharing; tasks on {len(hosts)} workers; "
        f"{len(mlflow_runs)} MLflow runs; wall {report.wall_s:.0f} s, peak {report.peak_pss_mb:.0f} MB PSS; "
        f"train held worker slots {worker_s:.0f} s of {train_s:.0f} s",
        len(report.instances_left),
        sum(leaks.values()),
    )


def test_worker_killed_mid_training_the_retry_reattaches_on_the_other(deployment: Deployment, sha: str) -> None:
    stack, airflow = deployment.stack, deployment.airflow
    run_id = "killed_worker__01"
    killed: dict[str, Any] = {}

    def kill_train_worker(job_dir: Path) -> None:
        hold_job(job_dir)
        ti = airflow.task_instances(DAG_ID, run_id)["train"]
        killed.update(worker=ti["hostname"], ti_id=ti["id"], pids=airflow.kill_worker(ti["hostname"]))
        killed["at"] = time.monotonic()

    # A deferred `train` waits in the triggerer, holding no worker to kill: this phase makes it stream in a worker
    # (training.deferrable = false, read by resolve_config on the workers), where a worker's death can hit it.
    airflow.restart_workers({"TRAINER__TRAINING__DEFERRABLE": "false"})
    started = time.monotonic()
    with OnTraining(stack, kill_train_worker) as killer:
        airflow.trigger(DAG_ID, run_id, {"git_ref": sha, "epochs": 8})
        detection_s = _seconds_until_retried(airflow, run_id, killed)
        release_after_reattach(lambda: airflow.task_log(DAG_ID, run_id, "train"), killer)
        state = airflow.wait_for_runs(DAG_ID, [run_id], timeout_s=600)[run_id]
    wall_s = time.monotonic() - started
    tis = airflow.task_instances(DAG_ID, run_id)
    train_log = airflow.task_log(DAG_ID, run_id, "train")
    launched = airflow.xcom(DAG_ID, run_id, "launch")
    job_dir: Path = killer.job_dir  # type: ignore[assignment]
    survivor = next(name for name in airflow.workers if name != killed["worker"])
    print(
        f"worker {killed['worker']} killed ({len(killed['pids'])} processes) while training; its task failed over "
        f"{detection_s:.1f} s later; run {state} in {wall_s:.0f} s"
    )

    assert state == "success", {task: ti["state"] for task, ti in tis.items()}
    assert tis["train"]["try_number"] == 2, "the kill must cost exactly one retry"
    assert tis["train"]["hostname"] == survivor
    assert "Re-attached to the training job" in train_log
    assert train_log.count("Started training job") == 1
    # One job, started once, on the run's one instance, which is terminated.
    assert [p.name for p in job_dir.parent.iterdir()] == [job_dir.name]
    assert (job_dir / "output.log").read_text().count("=== Running command") == 1
    assert stack.cloud.instances[launched["instance_id"]].powered_off_at is not None
    reservations = stack.cloud.client("ec2").describe_instances(
        Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [run_id]}]
    )["Reservations"]
    assert [i["State"]["Name"] for r in reservations for i in r["Instances"]] == ["terminated"]
    # Detection takes the heartbeat timeout (30 s here) plus up to a detection interval and a scheduler loop: far
    # below the default timeout alone (300 s), with room for a loaded machine.
    assert detection_s < 120

    # The dead worker's Celery message (train's first try) stays unacknowledged in Redis until the visibility
    # timeout: it was never handed to the surviving worker.
    stale = _unacked_messages(deployment.broker)
    stale_train = [m for m in stale if killed["ti_id"] in m["body"]]
    assert len(stale_train) == 1, stale
    assert stale_train[0]["task_id"] not in airflow.worker_log(survivor)

    # Past the visibility timeout Redis hands it out again: a worker receives it, and the Execution API refuses a
    # try that is no longer current. Nothing runs twice.
    airflow.restart_workers({"AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "1"})
    refused = f"execute_workload[{stale_train[0]['task_id']}] raised"
    _wait_until(lambda: any(refused in airflow.worker_log(w) for w in airflow.workers), timeout_s=120)
    # The try's id is history: the Execution API answers 404 to the stale workload's start.
    assert any("Task Instance not found" in airflow.worker_log(w) for w in airflow.workers)
    _wait_until(lambda: not _unacked_messages(deployment.broker), timeout_s=120)
    after = airflow.task_instances(DAG_ID, run_id)
    assert {task: ti["try_number"] for task, ti in after.items()} == {t: ti["try_number"] for t, ti in tis.items()}
    assert airflow.dag_run(DAG_ID, run_id)["state"] == "success"
    assert [p.name for p in job_dir.parent.iterdir()] == [job_dir.name]
    assert (job_dir / "output.log").read_text().count("=== Running command") == 1


def _seconds_until_retried(airflow: LocalAirflow, run_id: str, killed: dict[str, Any]) -> float:
    """Seconds from the worker's kill until the scheduler took train's first try off it (no longer running)."""
    deadline = time.monotonic() + 600
    while "at" not in killed or _train_try(airflow, run_id) == (1, "running"):
        if time.monotonic() > deadline:
            raise AssertionError(f"train's first try still running 10 minutes on: {killed}")
        time.sleep(0.5)
    return time.monotonic() - float(killed["at"])


def _train_try(airflow: LocalAirflow, run_id: str) -> tuple[int, str]:
    ti = airflow.task_instances(DAG_ID, run_id)["train"]
    return int(ti["try_number"]), str(ti["state"])


def _unacked_messages(broker: RedisDatabase) -> list[dict[str, str]]:
    """The messages a worker took from Redis and never acknowledged: Celery's task id and the decoded body."""
    import redis

    client = redis.Redis.from_url(broker.url)
    try:
        found = []
        for raw in client.hvals("unacked"):
            message = json.loads(raw)[0]
            found.append(
                {
                    "task_id": message["headers"]["id"],
                    "body": base64.b64decode(message["body"]).decode(errors="replace"),
                }
            )
        return found
    finally:
        client.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:.0f} s")
        time.sleep(0.5)


def _mlflow_run_ids(database: PostgresDatabase) -> list[str]:
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid FROM runs")
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
