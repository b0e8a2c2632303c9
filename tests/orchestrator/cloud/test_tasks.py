"""The cloud steps (orchestrator.cloud.tasks) as a task calls them: typed settings, the AWS connection, a strict AWS."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from orchestrator.config.settings import Settings, load_settings
from tests.support.aws_cloud import PROFILE, REGION, SSH_PORT, StrictAws, strict_aws

DAG_ID = "ec2_training"


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Any:
    with strict_aws(monkeypatch) as aws:
        conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": REGION}}
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
        yield aws


@pytest.fixture
def settings(cloud: StrictAws) -> Settings:
    return load_settings(
        env={
            "TRAINER__AWS__DEPLOYMENT": "steps-test",
            "TRAINER__AWS__REGION": REGION,
            "TRAINER__AWS__SUBNET_ID": cloud.network.subnet_id,
            "TRAINER__AWS__SECURITY_GROUP_IDS": cloud.network.security_group_id,
            "TRAINER__AWS__INSTANCE_PROFILE": PROFILE,
            "TRAINER__INSTANCE__SSH_PORT": str(SSH_PORT),
            "TRAINER__TRAINING__DATA_URI": "synthetic://",
        }
    )


def test_plan_launch_reads_its_connection_once_for_every_service(
    cloud: StrictAws, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Amazon provider logs where it found the credentials once per hook: plan_launch built one per service
    (EC2, SSM, IAM), and its log said "credentials retrieved from login and password" three times."""
    from orchestrator.cloud.tasks import plan_launch

    capsys.readouterr()
    plan = plan_launch(settings, "a" * 40, DAG_ID, "manual__preflight")
    assert plan.ami_id == cloud.images[settings.aws.ami_ssm_parameter]
    # Airflow's own loggers (structlog) write to stdout outside a task.
    out = capsys.readouterr().out
    assert out.count("credentials retrieved from login and password") == 1, out
    assert f"Checked the vCPU quotas in {REGION}: L-DB2E81BA (Running On-Demand G and VT instances) = 64 vCPUs" in out


def test_terminate_ends_the_instances_the_launch_reported_even_when_no_tag_names_them(
    cloud: StrictAws, settings: Settings
) -> None:
    """The tag search finds what the pipeline tagged at launch; the ids cover an instance whose tags never landed
    (RunInstances succeeded, the task died before its tags could be read back, or someone stripped them)."""
    from orchestrator.cloud.launch_spec import run_scope_tags
    from orchestrator.cloud.tasks import plan_launch, terminate

    run_id = "manual__terminate"
    ami_id = plan_launch(settings, "a" * 40, DAG_ID, run_id).ami_id

    def started(tags: dict[str, str]) -> str:
        specs = (
            [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] if tags else []
        )
        found = cloud.ec2.run_instances(ImageId=ami_id, MinCount=1, MaxCount=1, TagSpecifications=specs)
        return str(found["Instances"][0]["InstanceId"])

    tagged = started(run_scope_tags(settings.aws.project_tag, settings.aws.deployment, DAG_ID, run_id))
    untagged, bystander = started({}), started({})

    states = terminate(settings, DAG_ID, run_id, [untagged])

    assert states == {tagged: "terminated", untagged: "terminated"}
    found = cloud.ec2.describe_instances(InstanceIds=[bystander])["Reservations"][0]["Instances"][0]
    assert found["State"]["Name"] == "running"


def test_plan_launch_fails_at_once_when_no_option_fits_the_vcpu_quota(cloud: StrictAws, settings: Settings) -> None:
    """Done-when of the quota preflight: the quota too small for every type fails plan_launch without a retry (a
    ConfigError becomes AirflowFailException), in seconds, naming the quota, and nothing is launched."""
    from airflow.sdk.exceptions import AirflowFailException

    from embedded.cloud.service_quotas import quota_values
    from orchestrator.cloud.tasks import plan_launch

    started = time.monotonic()
    with quota_values({"L-DB2E81BA": 2.0}), pytest.raises(AirflowFailException) as raised:
        plan_launch(settings, "a" * 40, DAG_ID, "manual__quota")
    assert time.monotonic() - started < 30
    assert "L-DB2E81BA (Running On-Demand G and VT instances) = 2 vCPUs, 0 in use: g6.xlarge (on-demand) needs 4 " in (
        str(raised.value)
    )
    assert cloud.ec2.describe_instances()["Reservations"] == []
