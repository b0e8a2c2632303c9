"""The reaper DAG terminates the deployment's instances past their expires_at and spares every other instance.

Every other instance includes another deployment's in the same account, expired or not: that deployment's own
reaper owns them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from embedded.cloud import LocalCloud
from embedded.deploy.stack import DEPLOYMENT, EmbeddedStack
from orchestrator.cloud.launch_spec import expires_at_iso

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud(stack: EmbeddedStack) -> LocalCloud:
    """The session's cloud: moto keeps one EC2 state per process."""
    return stack.cloud


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


def owned(deployment: str, expires_at: int, project: str = "ec2-trainer") -> dict[str, str]:
    return {
        "ec2-trainer:project": project,
        "ec2-trainer:deployment": deployment,
        "ec2-trainer:expires_at": expires_at_iso(expires_at),
    }


def test_reaper_terminates_only_this_deployments_expired_instances(
    env: EmbeddedStack, cloud: LocalCloud, airflow_db: Any
) -> None:
    from airflow.dag_processing.dagbag import DagBag

    now = int(time.time())
    expired = launch(cloud, owned(DEPLOYMENT, now - 60))
    alive = launch(cloud, owned(DEPLOYMENT, now + 3600))
    other_deployment = launch(cloud, owned("another-deployment", now - 60))
    other_project = launch(cloud, owned(DEPLOYMENT, 0, project="someone-else"))
    untagged = launch(cloud, {"Name": "hand-launched"})

    try:
        dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["ec2_reaper"]
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
        assert {states[alive], states[other_deployment], states[other_project], states[untagged]} == {"running"}
    finally:
        # The session's cloud outlives this test: leave nothing of it running.
        ids = [expired, alive, other_deployment, other_project, untagged]
        cloud.client("ec2").terminate_instances(InstanceIds=ids)
