"""Faults that need Airflow's real scheduler: many runs at once under the instance cap, and a killed task process.

`dag.test()` runs one DAG run in one process. Here the api-server, the scheduler with the LocalExecutor, the
dag-processor and the triggerer run as in production (embedded.airflow_local), each task in its own supervised
process, against the session's embedded services. Its connections carry the planted secrets.
"""

from __future__ import annotations

import base64
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.load_benchmark import load_settings
from embedded.airflow_local import LocalAirflow
from embedded.load import DAG_ID, run_batch
from embedded.stack import EmbeddedStack
from tests.fault_table import FaultTable
from tests.faults.support import OnTraining
from tests.pipeline_fixtures import ProcessListSampler, planted_connections, planted_found

# Never alongside tests/deploy/test_celery_deployment.py (the same group): two Airflow deployments at once would
# overload a 2-core machine. `make test` runs pytest with --dist loadgroup.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("airflow-deployment")]

RUNS = 8
CAP = 3


@pytest.fixture(scope="module")
def airflow(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAirflow]:
    if not stack.cloud.private_disks:
        pytest.skip("concurrent instances need their own disks: mount namespaces, i.e. root (CI runs as root)")
    env = {**stack.environment(), **planted_connections(stack)[1], **load_settings(CAP)}
    with LocalAirflow(tmp_path_factory.mktemp("airflow"), env) as running:
        running.wait_for_dag(DAG_ID)
        yield running


@pytest.fixture
def planted_in_airflow(stack: EmbeddedStack) -> dict[str, str]:
    return planted_connections(stack)[0]


def scan(
    planted: dict[str, str], stack: EmbeddedStack, airflow: LocalAirflow, runs: dict[str, str], processes: Any
) -> dict[str, int]:
    """Planted secrets in the runs' task logs, XComs, rendered fields, instances' user-data, and the process list.

    `runs` maps each DAG run id to its instance id."""
    ec2 = stack.cloud.client("ec2")
    places = {"process list": processes.text()}
    for run_id, instance_id in runs.items():
        places[f"{run_id} task logs"] = airflow.task_log(DAG_ID, run_id)
        places[f"{run_id} XComs and rendered fields"] = airflow.stored_outputs(DAG_ID, run_id)
        attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        places[f"{run_id} user-data"] = base64.b64decode(attr["UserData"]["Value"]).decode()
    return planted_found(planted, places)


def test_many_runs_at_once_stay_under_the_cap_apart_and_clean(
    airflow: LocalAirflow,
    stack: EmbeddedStack,
    sha: str,
    planted_in_airflow: dict[str, str],
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> None:
    report = run_batch(
        stack,
        airflow,
        runs=RUNS,
        cap=CAP,
        project_tag=load_settings(CAP)["TRAINER__AWS__PROJECT_TAG"],
        conf={"git_ref": sha},
        timeout_s=900,
    )
    print(report.render())

    assert report.problems() == []
    assert report.max_live_instances == CAP, "the cap was never reached: the batch did not test it"
    assert processes.saw(f"mlflow run {stack.git.url}"), "the sampler never saw a training job"
    leaks = scan(planted_in_airflow, stack, airflow, {r.run_id: r.instance_id for r in report.runs}, processes)
    assert leaks == {}
    fault_table.record(
        f"{RUNS} DAG runs at once, aws.max_instances={CAP}, real scheduler",
        f"all succeed; at most {CAP} instances live; each run its own instance, key, job; none left",
        f"{dict(report.states)}; max {report.max_live_instances} live; no sharing; wall {report.wall_s:.0f} s, "
        f"peak {report.peak_pss_mb:.0f} MB PSS",
        len(report.instances_left),
        sum(leaks.values()),
    )


def kill_task_process(airflow: LocalAirflow, run_id: str, task_id: str) -> int:
    """SIGKILL the process running the task's current try (titled `airflow worker -- <ti id>`): no on_kill runs."""
    import psutil

    ti_id = airflow.task_instances(DAG_ID, run_id)[task_id]["id"]
    for proc in psutil.process_iter(["cmdline"]):
        if f"airflow worker -- {ti_id}" in " ".join(proc.info["cmdline"] or ()):
            os.kill(proc.pid, signal.SIGKILL)
            return int(proc.pid)
    raise AssertionError(f"no process runs task {task_id} of {run_id} (ti {ti_id})")


def test_task_process_killed_mid_training_the_retry_reattaches(
    airflow: LocalAirflow,
    stack: EmbeddedStack,
    sha: str,
    planted_in_airflow: dict[str, str],
    processes: ProcessListSampler,
    fault_table: FaultTable,
) -> None:
    run_id = "killed_task__01"
    with OnTraining(stack, lambda job_dir: kill_task_process(airflow, run_id, "train")) as killer:
        airflow.trigger(DAG_ID, run_id, {"git_ref": sha, "epochs": 8})
        state = airflow.wait_for_runs(DAG_ID, [run_id], timeout_s=600)[run_id]
    tis = airflow.task_instances(DAG_ID, run_id)
    train_log = airflow.task_log(DAG_ID, run_id, "train")
    launched = airflow.xcom(DAG_ID, run_id, "launch")
    job_dir: Path = killer.job_dir  # type: ignore[assignment]

    assert state == "success", {task: ti["state"] for task, ti in tis.items()}
    assert tis["train"]["try_number"] == 2, "the kill must cost exactly one retry"
    assert "Re-attached to the training job" in train_log
    assert train_log.count("Started training job") == 1
    # One job, started once, on the run's one instance.
    assert [p.name for p in job_dir.parent.iterdir()] == [job_dir.name]
    assert (job_dir / "output.log").read_text().count("=== Running command") == 1
    assert stack.cloud.instances[launched["instance_id"]].powered_off_at is not None
    run_instances = stack.cloud.client("ec2").describe_instances(
        Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [run_id]}]
    )["Reservations"]
    states = [i["State"]["Name"] for r in run_instances for i in r["Instances"]]
    assert states == ["terminated"]
    leaks = scan(planted_in_airflow, stack, airflow, {run_id: launched["instance_id"]}, processes)
    assert leaks == {}
    fault_table.record(
        "Airflow task process SIGKILLed mid-training (real scheduler)",
        "the retry re-attaches to the running job: one job, one instance, run succeeds",
        f"try 2 re-attached (pid {killer.result} killed); 1 job, 1 instance; run {state}",
        sum(1 for s in states if s != "terminated"),
        sum(leaks.values()),
    )
