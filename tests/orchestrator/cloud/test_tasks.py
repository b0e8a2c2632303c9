"""The cloud steps (orchestrator.cloud.tasks) as a task calls them: typed settings, the AWS connection, a strict AWS."""

from __future__ import annotations

import json
import logging
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
    cloud: StrictAws, settings: Settings, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The Amazon provider logs where it found the credentials once per hook: plan_launch built one per service
    (EC2, SSM, IAM), and its log said "credentials retrieved from login and password" three times."""
    from orchestrator.cloud.tasks import plan_launch

    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="orchestrator.cloud.tasks"):
        plan = plan_launch(settings, "a" * 40, DAG_ID, "manual__preflight")
    assert plan.ami_id == cloud.images[settings.aws.ami_ssm_parameter]
    # Airflow's own loggers (structlog) write to stdout outside a task.
    out = capsys.readouterr().out
    assert out.count("credentials retrieved from login and password") == 1, out
    # The project's loggers are the standard library's: where they print depends on what ran before in the process.
    quotas = f"Checked the vCPU quotas in {REGION}: L-DB2E81BA (Running On-Demand G and VT instances) = 64 vCPUs"
    assert quotas in caplog.text


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


@pytest.fixture
def spot_settings(cloud: StrictAws, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Spot in two zones, a login key in the SSH connection (the relaunch renders user-data with it)."""
    from orchestrator.cloud.hostkeys import generate_host_key

    key = generate_host_key().private_openssh
    monkeypatch.setenv("AIRFLOW_CONN_EC2_TRAINER_SSH", json.dumps({"conn_type": "ssh", "extra": {"private_key": key}}))
    return load_settings(
        env={
            "TRAINER__AWS__DEPLOYMENT": "steps-test",
            "TRAINER__AWS__REGION": REGION,
            "TRAINER__AWS__SUBNET_IDS": ",".join(cloud.network.subnet_ids),
            "TRAINER__AWS__SECURITY_GROUP_IDS": cloud.network.security_group_id,
            "TRAINER__AWS__INSTANCE_PROFILE": PROFILE,
            "TRAINER__AWS__INSTANCE_TYPES": "g6.xlarge",
            "TRAINER__AWS__SPOT": "true",
            "TRAINER__AWS__MAX_INSTANCES": "1",
            "TRAINER__AWS__INSTANCE_WAIT_MINUTES": "0",
            "TRAINER__INSTANCE__SSH_PORT": str(SSH_PORT),
            "TRAINER__TRAINING__DATA_URI": "synthetic://",
        }
    )


def take_back(cloud: StrictAws, instance_id: str) -> None:
    """What EC2 does to a spot instance it needs back: terminated, with its StateReason."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    backend.terminate_instances([instance_id])
    reason = "Server.SpotInstanceTermination"
    backend.get_instance(instance_id).state_reason = StateReason(f"{reason}: Spot instance termination", reason)


def test_a_relaunch_after_a_spot_interruption_takes_the_next_zone_under_the_cap(
    cloud: StrictAws, spot_settings: Settings
) -> None:
    """The lost instance's next option (the same type in zone b), tagged as the run's so teardown finds it; a
    relaunch after a recovery cleared half-way adopts the instance that one left; while the deployment's cap is taken
    by another run's instance the relaunch fails rather than exceed it."""
    from airflow.sdk.exceptions import AirflowFailException

    from orchestrator.cloud.tasks import instance_state, launch, plan_launch, relaunch, terminate
    from orchestrator.instance.recovery import preempted

    run_id = "manual__spot"
    plan = plan_launch(spot_settings, "a" * 40, DAG_ID, run_id)
    first = launch(spot_settings, plan, 0.0)
    assert first is not None and first.market == "spot"
    take_back(cloud, first.instance_id)
    lost = instance_state(spot_settings, first.instance_id)
    assert lost is not None and preempted(lost) and lost.subnet_id == cloud.network.subnet_ids[0]

    again = relaunch(spot_settings, plan, lost)

    found = instance_state(spot_settings, again.instance_id)
    assert found is not None
    assert (found.market, found.subnet_id, found.availability_zone) == (
        "spot",
        cloud.network.subnet_ids[1],
        REGION + "b",
    )
    assert again.host_public_key and again.host_public_key != first.host_public_key, "a new host key per instance"
    # A recovery whose task was cleared half-way left `again` running: the next try adopts it, never a second one.
    adopted = relaunch(spot_settings, plan, lost)
    assert (adopted.instance_id, adopted.reused, adopted.host_public_key) == (
        again.instance_id,
        True,
        again.host_public_key,
    )
    assert set(terminate(spot_settings, DAG_ID, run_id, [])) == {again.instance_id}
    # The cap holds: another run's instance takes the only slot.
    other_run = "manual__other"
    other = launch(spot_settings, plan_launch(spot_settings, "a" * 40, DAG_ID, other_run), 0.0)
    assert other is not None
    with pytest.raises(AirflowFailException, match=r"at the cap aws.max_instances = 1"):
        relaunch(spot_settings, plan, lost)
    assert set(terminate(spot_settings, DAG_ID, other_run, [])) == {other.instance_id}
    assert set(terminate(spot_settings, DAG_ID, run_id, [])) <= {again.instance_id}, "nothing launched past the cap"
