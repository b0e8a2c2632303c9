"""New data starts exactly one training, on a live local Airflow (scheduler, triggerer, dag-processor, api-server:
embedded.deploy.deployment) over the session's embedded stack: S3 event notifications reach the SQS queue, the asset
watcher in the triggerer updates the dataset asset, ec2_retrain resolves the latest complete version and starts
ec2_training, which trains that version's exact S3 folder on an emulated instance and terminates it.

A burst: two versions, each uploaded object by object (every object notifies the queue, as a bucket without a
suffix filter does), their markers written last, back to back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.deploy.deployment import LocalDeployment, Ports
from embedded.deploy.stack import DATASETS_URI, TINY_DATA_URI, EmbeddedStack
from embedded.services.datasets import MARKER, upload_version

pytestmark = pytest.mark.slow

# From the markers to a started ec2_training run: the watcher's long poll, the scheduler, ec2_retrain's two tasks.
START_BOUND_S = 240.0
TRAINING_BOUND_S = 480.0
NEWER_DATA_URI = TINY_DATA_URI.replace("seed=0", "seed=1")


@pytest.fixture(scope="module")
def deployment(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    with LocalDeployment(tmp_path_factory.mktemp("retrain-deployment"), ports=Ports.free(), stack=stack) as running:
        running.airflow.wait_for_dag("ec2_retrain")  # parsed with the stack's dataset settings, then unpaused
        yield running


def wait_for(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(2)
    raise AssertionError(f"{what} not seen within {timeout_s:.0f} s")


def failure_report(airflow: Any, run_id: str) -> str:
    """Each task's state, and the end of each failed task's log."""
    tasks = airflow.task_instances("ec2_training", run_id)
    failed = [task for task, ti in tasks.items() if ti["state"] == "failed"]
    logs = "".join(f"\n--- {task}\n{airflow.task_log('ec2_training', run_id, task)[-3000:]}" for task in failed)
    return f"{ {task: ti['state'] for task, ti in tasks.items()} }{logs}"


@pytest.mark.timeout(1500)
def test_a_burst_of_new_data_starts_one_training_of_the_latest_version(
    deployment: LocalDeployment, stack: EmbeddedStack
) -> None:
    from mlflow import MlflowClient

    airflow = deployment.airflow
    s3 = stack.cloud.client("s3")
    bucket = DATASETS_URI.split("/")[2]
    prefix = DATASETS_URI.split("/", 3)[3]
    objects = upload_version(s3, DATASETS_URI, "v1", data_uri=TINY_DATA_URI, complete=False)
    objects += upload_version(s3, DATASETS_URI, "v2", data_uri=NEWER_DATA_URI, complete=False)
    for version in ("v1", "v2"):
        s3.put_object(Bucket=bucket, Key=f"{prefix}{version}/{MARKER}", Body=b"")

    started = wait_for(lambda: airflow.dag_runs("ec2_training"), START_BOUND_S, "an ec2_training run")
    run = started[0]
    states = airflow.wait_for_runs("ec2_training", [run["dag_run_id"]], TRAINING_BOUND_S)
    # Every retrain run the burst caused has finished by now: they either triggered this run or found it.
    retrains = airflow.dag_runs("ec2_retrain")
    retrain_states = airflow.wait_for_runs("ec2_retrain", [r["dag_run_id"] for r in retrains], 120)
    trainings = airflow.dag_runs("ec2_training")

    assert len(trainings) == 1, [t["dag_run_id"] for t in trainings]
    assert states[run["dag_run_id"]] == "success", failure_report(airflow, run["dag_run_id"])
    assert run["dag_run_id"].startswith("retrain__") and run["conf"]["data_uri"] == f"{DATASETS_URI}v2/"
    assert set(retrain_states.values()) == {"success"} and retrains[0]["run_type"] == "asset_triggered"
    ec2 = stack.cloud.client("ec2")
    instances = [
        i
        for r in ec2.describe_instances(Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [run["dag_run_id"]]}])[
            "Reservations"
        ]
        for i in r["Instances"]
    ]
    assert [i["State"]["Name"] for i in instances] == ["terminated"]
    # The MLflow run says which data it trained: the version, its digest, its objects.
    client = MlflowClient(stack.mlflow.url)
    experiment = client.get_experiment_by_name("hurricane-damage-embedded")
    assert experiment is not None
    (trained,) = client.search_runs(
        [experiment.experiment_id], f"tags.`airflow.run_id` = '{run['dag_run_id']}'", max_results=2
    )
    tags = trained.data.tags
    assert (tags["dataset.version"], tags["dataset.uri"]) == ("v2", f"{DATASETS_URI}v2/")
    assert tags["dataset.digest"][:12] in run["dag_run_id"]
    assert int(tags["dataset.objects"]) == len([key for key in objects if "/v2/" in key])
    assert trained.info.status == "FINISHED"
    manifest = client.download_artifacts(trained.info.run_id, "dataset/manifest.json")
    assert json.loads(Path(manifest).read_text())["version"] == "v2"
