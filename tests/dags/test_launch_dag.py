"""The launch side of the training DAG against the strict embedded cloud: the image's own root device, the preflight
that fails before anything is launched, and an instance EC2 takes back before it runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from embedded.cloud import AMAZON_LINUX_DLAMI
from embedded.cloud.service_quotas import quota_values
from embedded.deploy.stack import EmbeddedStack
from tests.support.aws_cloud import take_back_the_first
from tests.support.faults import output
from tests.support.pipeline import assert_all_terminated, run_dag, task_states

pytestmark = pytest.mark.slow


def root_volumes_at_launch(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, tuple[int, bool]]]:
    """Each launched instance's volumes as EC2 attached them: device -> (size GB, encrypted)."""
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances
    seen: list[dict[str, tuple[int, bool]]] = []

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original(self, *args, **kwargs)
        for instance in reservation.instances:
            volumes = {d: self.get_volume(m.volume_id) for d, m in instance.block_device_mapping.items()}
            seen.append({d: (v.size, bool(v.encrypted)) for d, v in volumes.items()})
        return reservation

    monkeypatch.setattr(EC2Backend, "run_instances", run_instances)
    return seen


def failed_in_plan_launch(env: EmbeddedStack, dag_run: Any, log: str, message: str) -> None:
    states = task_states(dag_run)
    assert dag_run.state == "failed"
    assert states["plan_launch"] == "failed"
    assert states["launch"] == "upstream_failed"
    assert message in log
    (plan,) = (ti for ti in dag_run.get_task_instances() if ti.task_id == "plan_launch")
    assert plan.try_number == 1, "a configuration error fails without retry"
    assert_all_terminated(env, dag_run, 0)


def test_a_root_volume_below_the_images_snapshot_fails_before_launch(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRAINER__AWS__ROOT_VOLUME_GB", "50")
    dag_run = run_dag(git_ref=sha)
    failed_in_plan_launch(env, dag_run, capfd.readouterr().out, "aws.root_volume_gb = 50 is smaller than")


def test_a_vcpu_quota_too_small_fails_before_launch(
    env: EmbeddedStack, sha: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with quota_values({"L-DB2E81BA": 2.0}):
        dag_run = run_dag(git_ref=sha)
    failed_in_plan_launch(
        env, dag_run, capfd.readouterr().out, "L-DB2E81BA (Running On-Demand G and VT instances) = 2 vCPUs"
    )


def test_a_security_group_without_ssh_fails_before_launch(
    env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    assert env.cloud.network is not None
    ec2 = env.cloud.client("ec2")
    closed = ec2.create_security_group(
        GroupName="no-ssh-from-airflow", Description="HTTPS only", VpcId=env.cloud.network.vpc_id
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=closed,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    monkeypatch.setenv("TRAINER__AWS__SECURITY_GROUP_IDS", closed)
    # Bounds the run should it launch anyway (SSH never answers there).
    monkeypatch.setenv("TRAINER__INSTANCE__READY_TIMEOUT_MINUTES", "1")
    dag_run = run_dag(git_ref=sha)
    failed_in_plan_launch(env, dag_run, capfd.readouterr().out, "has an inbound rule for TCP")


def no_capacity_for(instance_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RunInstances for `instance_type` fails with InsufficientInstanceCapacity, as EC2 answers it."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models import EC2Backend

    original = EC2Backend.run_instances

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("instance_type") == instance_type:
            raise EC2ClientError("InsufficientInstanceCapacity", f"not enough {instance_type} capacity")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EC2Backend, "run_instances", run_instances)


def test_a_run_launches_the_image_it_names_on_the_first_type_with_capacity(
    env: EmbeddedStack,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The launch decisions of one whole run, each checked step by step in tests/orchestrator/cloud: the image a run
    names (an earlier run's: the configured parameter holds the Ubuntu image) with that image's own root device (an
    Amazon Linux image's root is /dev/xvda: mapping /dev/sda1 would add a volume and leave the root as the image has
    it, unencrypted, the snapshot's size); no capacity for the first type at RunInstances in either zone; the second
    taken back while pending in the first zone (capacity is per zone), so it runs and trains in the second zone
    before any later type is tried."""
    image = env.cloud.images[AMAZON_LINUX_DLAMI.parameter]
    no_capacity_for("g6.xlarge", monkeypatch)
    volumes = root_volumes_at_launch(monkeypatch)  # read before the take-back below deletes the first's
    launched = take_back_the_first("g5.xlarge", monkeypatch)
    dag_run = run_dag(git_ref=sha, ami_id=image, instance_types=["g6.xlarge", "g5.xlarge", "g4dn.xlarge"])

    assert dag_run.state == "success", task_states(dag_run)
    assert launched == ["g5.xlarge", "g5.xlarge"]
    assert volumes == [{"/dev/xvda": (100, True)}] * 2
    instances = assert_all_terminated(env, dag_run, 2)
    assert env.cloud.network is not None
    zone_a, zone_b = env.cloud.network.subnet_ids
    assert sorted((i["InstanceType"], i["SubnetId"]) for i in instances.values()) == sorted(
        [("g5.xlarge", zone_a), ("g5.xlarge", zone_b)]
    )
    assert {i["ImageId"] for i in instances.values()} == {image}
    log = output(capfd, caplog)
    assert "went terminated before running: Server.InsufficientInstanceCapacity" in log
    assert f"no capacity for g6.xlarge (on-demand) in {zone_b}" in log
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["launch"].try_number == 1
    assert tis["launch"].xcom_pull(task_ids="launch")["instance_type"] == "g5.xlarge"


@contextmanager
def amazon_linux_image(env: EmbeddedStack, **changes: str) -> Iterator[str]:
    """The Amazon Linux image's id, its moto attributes changed (its state, its architecture) for the block."""
    from moto.ec2.models import ec2_backends

    from embedded.cloud import ACCOUNT_ID

    image_id = env.cloud.images[AMAZON_LINUX_DLAMI.parameter]
    image = ec2_backends[ACCOUNT_ID][env.cloud.region].amis[image_id]
    before = {name: getattr(image, name) for name in changes}
    for name, value in changes.items():
        setattr(image, name, value)
    try:
        yield image_id
    finally:
        for name, value in before.items():
            setattr(image, name, value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (None, "aws.ami_id: image ami-0123456789abcdef0 does not exist"),
        ({"state": "pending"}, "is pending, not available"),
        ({"architecture": "arm64"}, "is arm64, which instance types ['g6.xlarge', 'g5.xlarge', 'g4dn.xlarge'] do not"),
    ],
    ids=["unknown", "pending", "another-architecture"],
)
def test_an_unusable_ami_id_fails_before_launch(
    env: EmbeddedStack,
    sha: str,
    capfd: pytest.CaptureFixture[str],
    changes: dict[str, str] | None,
    message: str,
) -> None:
    if changes is None:
        dag_run = run_dag(git_ref=sha, ami_id="ami-0123456789abcdef0")
    else:
        with amazon_linux_image(env, **changes) as image:
            dag_run = run_dag(git_ref=sha, ami_id=image)
    failed_in_plan_launch(env, dag_run, capfd.readouterr().out, message)
