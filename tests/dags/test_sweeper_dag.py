"""The sweeper DAG terminates the deployment's instances past their expires_at and spares every other instance."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.cloud import LocalCloud
from embedded.process import free_port
from orchestrator.launch import expires_at_iso

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    workdir = tmp_path_factory.mktemp("sweeper-cloud")
    with LocalCloud(workdir, ssh_port=free_port(), disk_root=workdir / "disk") as running:
        yield running


def launch(cloud: LocalCloud, tags: dict[str, str]) -> str:
    ec2 = cloud.client("ec2")
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    response = ec2.run_instances(
        ImageId=image_id,
        InstanceType="g6.xlarge",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return str(response["Instances"][0]["InstanceId"])


def test_sweeper_terminates_only_expired_project_instances(
    cloud: LocalCloud, airflow_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": cloud.endpoint_url, "region_name": cloud.region},
            }
        ),
    )
    now = int(time.time())
    expired = launch(cloud, {"ec2-trainer:project": "ec2-trainer", "ec2-trainer:expires_at": expires_at_iso(now - 60)})
    alive = launch(cloud, {"ec2-trainer:project": "ec2-trainer", "ec2-trainer:expires_at": expires_at_iso(now + 3600)})
    other_project = launch(cloud, {"ec2-trainer:project": "someone-else", "ec2-trainer:expires_at": expires_at_iso(0)})
    untagged = launch(cloud, {"Name": "hand-launched"})

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["ec2_sweeper"]
    dag_run = dag.test()

    assert dag_run.state == "success"
    (ti,) = dag_run.get_task_instances()
    assert ti.xcom_pull(task_ids=ti.task_id) == [expired]
    states = {
        i["InstanceId"]: i["State"]["Name"]
        for r in cloud.client("ec2").describe_instances()["Reservations"]
        for i in r["Instances"]
    }
    assert states[expired] == "terminated"
    assert {states[alive], states[other_project], states[untagged]} == {"running"}
