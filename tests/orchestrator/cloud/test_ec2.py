from __future__ import annotations

import base64
import time
import types
from typing import Any
from unittest.mock import Mock

import pytest

from embedded.cloud import AMAZON_LINUX_DLAMI, UBUNTU_DLAMI
from orchestrator.cloud.ec2 import (
    CapacityError,
    InstanceCapError,
    InstanceNotReadyError,
    LaunchError,
    adopt_run_instance,
    instance_slot_free,
    launch_instance,
    terminate_expired,
    terminate_run,
    wait_until_running,
)
from orchestrator.cloud.ec2_describe import describe_instance, find_run_instances, live_project_instances
from orchestrator.cloud.launch_spec import LaunchSpec, RunIdentity, run_scope_tags
from orchestrator.config.connections import AWS_RETRIES
from orchestrator.contracts_steps import LaunchedInstance
from tests.support.aws_cloud import REGION, StrictAws, http_errors, strict_aws, take_back_the_first

PROJECT = "ec2-trainer"
DEPLOYMENT = "prod"
USER_DATA = "#cloud-config\nruncmd:\n- [echo, hi]\n"


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Any:
    with strict_aws(monkeypatch) as aws:
        yield aws


def make_spec(cloud: StrictAws, **overrides) -> LaunchSpec:
    fields: dict[str, Any] = {
        "ami_id": cloud.images[UBUNTU_DLAMI.parameter],
        "instance_types": ("g5.xlarge", "g6.xlarge"),
        "spot": True,
        "spot_fallback_to_on_demand": True,
        "subnet_ids": (cloud.network.subnet_id,),
        "security_group_ids": (cloud.network.security_group_id,),
        "public_ip": True,
        "instance_profile": "trainer",
        "root_volume_gb": 100,
        "root_device_name": UBUNTU_DLAMI.root_device_name,
        "project_tag": PROJECT,
    }
    fields.update(overrides)
    return LaunchSpec(**fields)


def launch(ec2: Any, spec: LaunchSpec, run: RunIdentity | None = None, host_public_key: str = "") -> LaunchedInstance:
    return launch_instance(
        ec2, spec, run or identity(), USER_DATA, host_public_key=host_public_key, running_timeout_s=30, poll_s=0.05
    )


def identity(run_id: str = "manual__1", expires_in_s: int = 3600, deployment: str = DEPLOYMENT) -> RunIdentity:
    return RunIdentity("train_hurricane", run_id, "b" * 40, int(time.time()) + expires_in_s, deployment)


def fail_run_instances(ec2, code: str, when=lambda body, n: True) -> list[dict]:
    """Makes RunInstances calls for which when(body, call_number) holds fail with `code`; returns all call bodies."""
    calls: list[dict] = []

    def handler(params, **_):
        calls.append(params["body"])
        if when(params["body"], len(calls)):
            return Mock(status_code=400), {"Error": {"Code": code, "Message": f"injected {code}"}}
        return None

    ec2.meta.events.register("before-call.ec2.RunInstances", handler)
    return calls


def live(ec2) -> list[str]:
    pages = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i["InstanceId"] for r in pages["Reservations"] for i in r["Instances"]]


def test_launch_creates_one_tagged_hardened_instance(cloud):
    ec2 = cloud.ec2
    launched = launch(ec2, make_spec(cloud))
    assert (launched.instance_type, launched.market, launched.reused) == ("g5.xlarge", "spot", False)
    instance = ec2.describe_instances(InstanceIds=[launched.instance_id])["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["ec2-trainer:run_id"] == "manual__1"
    assert tags["ec2-trainer:project"] == PROJECT
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    behaviour = ec2.describe_instance_attribute(
        InstanceId=launched.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = ec2.describe_instance_attribute(InstanceId=launched.instance_id, Attribute="userData")
    assert base64.b64decode(user_data["UserData"]["Value"]).decode() == USER_DATA


def test_capacity_error_moves_to_the_next_type(cloud):
    ec2 = cloud.ec2
    calls = fail_run_instances(ec2, "InsufficientInstanceCapacity", lambda body, n: body["InstanceType"] == "g5.xlarge")
    launched = launch(ec2, make_spec(cloud))
    assert (launched.instance_type, launched.market) == ("g6.xlarge", "spot")
    assert [c["InstanceType"] for c in calls] == ["g5.xlarge", "g6.xlarge"]
    assert live(ec2) == [launched.instance_id]


# Written out, not read from the module: dropping one from CAPACITY_ERROR_CODES must fail this test.
@pytest.mark.parametrize(
    "code",
    [
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "Unsupported",
        "UnfulfillableCapacity",
    ],
)
def test_every_capacity_code_moves_to_the_next_type(cloud, code):
    ec2 = cloud.ec2
    calls = fail_run_instances(ec2, code, lambda body, n: body["InstanceType"] == "g5.xlarge")
    launched = launch(ec2, make_spec(cloud, spot=False))
    assert launched.instance_type == "g6.xlarge"
    assert [c["InstanceType"] for c in calls] == ["g5.xlarge", "g6.xlarge"]
    assert live(ec2) == [launched.instance_id]


def test_spot_exhausted_falls_back_to_on_demand(cloud):
    ec2 = cloud.ec2
    fail_run_instances(ec2, "MaxSpotInstanceCountExceeded", lambda body, n: "InstanceMarketOptions.MarketType" in body)
    launched = launch(ec2, make_spec(cloud))
    assert (launched.instance_type, launched.market) == ("g5.xlarge", "on-demand")


def test_no_capacity_anywhere_raises_capacity_error_and_leaves_nothing(cloud):
    ec2 = cloud.ec2
    calls = fail_run_instances(ec2, "InsufficientInstanceCapacity")
    with pytest.raises(
        CapacityError, match=r"g5\.xlarge \(spot\).*g6\.xlarge \(on-demand\).*other instance types"
    ) as err:
        launch(ec2, make_spec(cloud))
    assert len(err.value.tried) == len(calls) == 4
    assert live(ec2) == []


def test_no_capacity_in_one_zone_launches_in_the_next_before_the_next_type(cloud):
    ec2 = cloud.ec2
    zone_a, zone_b = cloud.network.subnet_ids
    calls = fail_run_instances(
        ec2, "InsufficientInstanceCapacity", lambda body, n: body["NetworkInterface.1.SubnetId"] == zone_a
    )
    launched = launch(ec2, make_spec(cloud, subnet_ids=(zone_a, zone_b)))
    assert (launched.instance_type, launched.market) == ("g5.xlarge", "spot")
    assert [(c["InstanceType"], c["NetworkInterface.1.SubnetId"]) for c in calls] == [
        ("g5.xlarge", zone_a),
        ("g5.xlarge", zone_b),
    ]
    (instance,) = ec2.describe_instances(InstanceIds=[launched.instance_id])["Reservations"][0]["Instances"]
    assert (instance["SubnetId"], instance["Placement"]["AvailabilityZone"]) == (zone_b, f"{REGION}b")
    assert live(ec2) == [launched.instance_id]


def test_other_errors_raise_at_once(cloud):
    ec2 = cloud.ec2
    calls = fail_run_instances(ec2, "UnauthorizedOperation")
    with pytest.raises(LaunchError, match=r"UnauthorizedOperation.*docs/iam\.md"):
        launch(ec2, make_spec(cloud))
    assert len(calls) == 1


@pytest.fixture
def retrying_ec2(cloud, monkeypatch):
    """The orchestrator's EC2 client config (connections.AWS_RETRIES); botocore's backoff sleeps are recorded."""
    import boto3
    import botocore.endpoint
    from botocore.config import Config

    sleeps: list[float] = []
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=sleeps.append))
    return boto3.client("ec2", region_name="us-east-1", config=Config(retries=dict(AWS_RETRIES))), sleeps


def test_throttling_is_retried_inside_botocore_then_succeeds(cloud, retrying_ec2, monkeypatch):
    ec2, sleeps = retrying_ec2
    attempts = http_errors(monkeypatch, "RunInstances", "RequestLimitExceeded", 503, failures=2)
    launched = launch(ec2, make_spec(cloud))
    assert (launched.instance_type, len(attempts), len(sleeps)) == ("g5.xlarge", 3, 2)


def test_throttling_retries_are_bounded_and_jittered(cloud, retrying_ec2, monkeypatch):
    ec2, sleeps = retrying_ec2
    attempts = http_errors(monkeypatch, "RunInstances", "RequestLimitExceeded", 503)
    with pytest.raises(
        LaunchError, match=r"g5\.xlarge \(spot\) in subnet-\w+ failed: RequestLimitExceeded: injected Request"
    ):
        launch(ec2, make_spec(cloud))
    # One call's attempts, all inside botocore: nothing retries around it (it was 3 x 6 = 18 attempts).
    assert len(attempts) == AWS_RETRIES["total_max_attempts"] == 5
    assert len(sleeps) == 4 and all(0 <= s <= 20 for s in sleeps)
    assert len(set(sleeps)) > 1, "exponential backoff with jitter, not fixed delays"
    assert live(cloud.ec2) == []


def test_a_server_error_on_terminate_is_retried_inside_botocore(cloud, retrying_ec2, monkeypatch):
    ec2, _ = retrying_ec2
    launched = launch(cloud.ec2, make_spec(cloud))
    attempts = http_errors(monkeypatch, "TerminateInstances", "InternalError", 500, failures=1)
    assert terminate_run(ec2, PROJECT, DEPLOYMENT, "train_hurricane", "manual__1") == [launched.instance_id]
    assert len(attempts) == 2
    assert live(cloud.ec2) == []


def test_capacity_taken_back_while_pending_relaunches_on_the_next_option(cloud, monkeypatch):
    ec2 = cloud.ec2
    launched_types = take_back_the_first("g5.xlarge", monkeypatch)
    launched = launch(ec2, make_spec(cloud))
    assert (launched.instance_type, launched.market) == ("g6.xlarge", "spot")
    assert launched_types == ["g5.xlarge", "g6.xlarge"]
    assert describe_instance(ec2, launched.instance_id).state == "running"
    assert live(ec2) == [launched.instance_id]


@pytest.mark.parametrize(
    "reason",
    [
        "Server.InsufficientInstanceCapacity",
        "Server.SpotInstanceTermination",
        "Server.SpotInstanceShutdown",
        "Server.InternalError",
    ],
)
def test_every_capacity_loss_reason_relaunches_on_the_next_option(cloud, monkeypatch, reason):
    ec2 = cloud.ec2
    launched_types = take_back_the_first("g5.xlarge", monkeypatch, code=reason)
    launched = launch(ec2, make_spec(cloud, spot=False))
    assert launched_types == ["g5.xlarge", "g6.xlarge"]
    assert live(ec2) == [launched.instance_id]


def test_capacity_taken_back_on_every_option_is_a_capacity_error(cloud, monkeypatch):
    ec2 = cloud.ec2
    for instance_type in ("g5.xlarge", "g6.xlarge"):
        take_back_the_first(instance_type, monkeypatch)
    with pytest.raises(
        CapacityError, match=r"g6\.xlarge \(on-demand\) in subnet-\w+: Server\.InsufficientInstanceCapacity"
    ):
        launch(ec2, make_spec(cloud, spot=False))
    assert live(ec2) == []


def test_an_instance_terminated_by_someone_while_pending_is_not_replaced(cloud, monkeypatch):
    ec2 = cloud.ec2
    launched_types = take_back_the_first("g5.xlarge", monkeypatch, code="Client.UserInitiatedShutdown")
    with pytest.raises(InstanceNotReadyError, match=r"went terminated before running: Client\.UserInitiatedShutdown"):
        launch(ec2, make_spec(cloud))
    assert launched_types == ["g5.xlarge"]


def test_the_request_asks_for_a_public_ip_in_a_subnet_that_maps_none(cloud):
    ec2 = cloud.ec2
    (subnet,) = ec2.describe_subnets(SubnetIds=[cloud.network.subnet_id])["Subnets"]
    assert subnet["MapPublicIpOnLaunch"] is False
    public = launch(ec2, make_spec(cloud))
    private = launch(ec2, make_spec(cloud, public_ip=False), identity("manual__private"))
    assert wait_until_running(ec2, public.instance_id, timeout_s=10, poll_s=0.05).public_ip
    info = wait_until_running(ec2, private.instance_id, timeout_s=10, poll_s=0.05)
    assert (info.public_ip, bool(info.private_ip)) == (None, True)


def test_the_root_volume_is_the_images_own_device_encrypted_at_the_configured_size(cloud):
    ec2 = cloud.ec2
    image = AMAZON_LINUX_DLAMI
    spec = make_spec(cloud, ami_id=cloud.images[image.parameter], root_device_name=image.root_device_name)
    launched = launch(ec2, spec)
    (instance,) = ec2.describe_instances(InstanceIds=[launched.instance_id])["Reservations"][0]["Instances"]
    (mapping,) = instance["BlockDeviceMappings"]
    (volume,) = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert (mapping["DeviceName"], volume["Size"], volume["Encrypted"]) == ("/dev/xvda", 100, True)


def test_relaunch_of_the_same_run_reuses_its_instance(cloud):
    ec2 = cloud.ec2
    run = identity()
    first = launch(ec2, make_spec(cloud), run)
    # A retried task finds its run's instance by the run's tags, whatever its new expires_at and ClientToken.
    again = adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha)
    assert again is not None
    assert (again.instance_id, again.reused, again.market) == (first.instance_id, True, "spot")
    assert adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, "manual__2", run.git_sha) is None
    other = launch(ec2, make_spec(cloud), identity("manual__2"))
    assert other.instance_id != first.instance_id
    assert sorted(live(ec2)) == sorted([first.instance_id, other.instance_id])


def test_a_failure_after_the_instance_exists_terminates_it(cloud):
    ec2 = cloud.ec2

    def replay_of_a_terminated_instance(parsed, **_):
        parsed["Instances"][0]["State"]["Name"] = "terminated"

    ec2.meta.events.register("after-call.ec2.RunInstances", replay_of_a_terminated_instance)
    with pytest.raises(LaunchError, match=r"already terminated .*fresh token"):
        launch(ec2, make_spec(cloud))
    assert live(ec2) == []


def test_wait_until_running(cloud):
    ec2 = cloud.ec2
    launched = launch(ec2, make_spec(cloud, spot=False), identity())
    info = wait_until_running(ec2, launched.instance_id, timeout_s=10, poll_s=0.05)
    assert (info.instance_id, info.state, info.instance_type) == (launched.instance_id, "running", "g5.xlarge")
    assert info.private_ip
    assert info.launch_time is not None


def test_wait_fails_fast_when_the_instance_is_gone(cloud):
    ec2 = cloud.ec2
    launched = launch(ec2, make_spec(cloud))
    ec2.terminate_instances(InstanceIds=[launched.instance_id])
    with pytest.raises(InstanceNotReadyError, match=f"instance {launched.instance_id} went (shutting-down|terminated)"):
        wait_until_running(ec2, launched.instance_id, timeout_s=10, poll_s=0.05)


def test_wait_is_bounded_for_an_unknown_instance(cloud):
    ec2 = cloud.ec2
    assert describe_instance(ec2, "i-0123456789abcdef0") is None
    with pytest.raises(InstanceNotReadyError, match=r"not running after 0s .*not visible yet"):
        wait_until_running(ec2, "i-0123456789abcdef0", timeout_s=0.2, poll_s=0.05)


def test_terminate_by_id_and_by_tag_and_repeat(cloud):
    ec2 = cloud.ec2
    run = identity()
    tagged = launch(ec2, make_spec(cloud), run).instance_id
    # An instance of the run the launch task never reported (e.g. it crashed after RunInstances).
    stray = ec2.run_instances(ImageId=make_spec(cloud).ami_id, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    bystander = launch(ec2, make_spec(cloud), identity("manual__other")).instance_id

    asked = terminate_run(
        ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, instance_ids=[stray, "i-0123456789abcdef0", "bad-id"]
    )
    assert sorted(asked) == sorted([tagged, stray])
    assert live(ec2) == [bystander]
    assert find_run_instances(ec2, run_scope_tags(PROJECT, DEPLOYMENT, run.dag_id, run.run_id)) == []
    # Harmless to repeat, with or without the ids.
    assert terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id) == []
    again = terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, instance_ids=[tagged])
    assert again == [tagged]
    assert live(ec2) == [bystander]


def test_terminate_propagates_unexpected_errors(cloud):
    from botocore.exceptions import ClientError

    ec2 = cloud.ec2

    def deny(**_):
        return Mock(status_code=403), {"Error": {"Code": "UnauthorizedOperation", "Message": "denied"}}

    ec2.meta.events.register("before-call.ec2.TerminateInstances", deny)
    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        terminate_run(ec2, PROJECT, DEPLOYMENT, "d", "r", instance_ids=["i-0123456789abcdef0"])


def test_reaper_terminates_expired_and_spares_the_rest(cloud):
    ec2 = cloud.ec2
    now = int(time.time())
    grace = 3600
    expired = launch(ec2, make_spec(cloud), identity("old", expires_in_s=-10))
    fresh = launch(ec2, make_spec(cloud), identity("new", expires_in_s=100 * grace))
    garbled = launch(ec2, make_spec(cloud), identity("garbled"))
    ec2.create_tags(Resources=[garbled.instance_id], Tags=[{"Key": "ec2-trainer:expires_at", "Value": "soon"}])
    other_project = launch(ec2, make_spec(cloud, project_tag="someone-else"), identity("x", expires_in_s=-10))

    assert terminate_expired(ec2, PROJECT, DEPLOYMENT, now, untagged_grace_s=grace) == [expired.instance_id]
    assert sorted(live(ec2)) == sorted([fresh.instance_id, garbled.instance_id, other_project.instance_id])
    # Much later: the unreadable expiry is swept once past the grace period, the fresh one still is not.
    assert terminate_expired(ec2, PROJECT, DEPLOYMENT, now + 2 * grace, untagged_grace_s=grace) == [garbled.instance_id]
    assert sorted(live(ec2)) == sorted([fresh.instance_id, other_project.instance_id])
    assert terminate_expired(ec2, PROJECT, DEPLOYMENT, now + 2 * grace, untagged_grace_s=grace) == []


def test_instance_slot_counts_the_projects_live_instances_in_ec2(cloud):
    ec2 = cloud.ec2
    first = launch(ec2, make_spec(cloud), identity("a")).instance_id
    launch(ec2, make_spec(cloud, project_tag="someone-else"), identity("b"))
    # Whatever run launched it (a crashed one included), a live instance of the project counts against the cap.
    leftover = launch(ec2, make_spec(cloud), identity("c")).instance_id
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT) == sorted([first, leftover])
    # One look is one DescribeInstances: a free slot is granted at once, even with no wait allowed.
    describes = []
    ec2.meta.events.register("before-call.ec2.DescribeInstances", lambda **_: describes.append(1))
    assert instance_slot_free(ec2, PROJECT, DEPLOYMENT, 3, waited_s=0, timeout_s=0) is True
    assert len(describes) == 1

    # At the cap: "look again later" while the wait is within its bound, an error naming the instances after it.
    assert instance_slot_free(ec2, PROJECT, DEPLOYMENT, 2, waited_s=10, timeout_s=60) is False
    with pytest.raises(InstanceCapError) as caught:
        instance_slot_free(ec2, PROJECT, DEPLOYMENT, 2, waited_s=60, timeout_s=60)
    message = str(caught.value)
    assert "aws.max_instances = 2" in message and first in message and leftover in message


def test_instance_slot_opens_when_an_instance_ends(cloud):
    ec2 = cloud.ec2
    busy = launch(ec2, make_spec(cloud), identity("a")).instance_id
    assert instance_slot_free(ec2, PROJECT, DEPLOYMENT, 1, waited_s=0, timeout_s=30) is False
    ec2.terminate_instances(InstanceIds=[busy])
    assert instance_slot_free(ec2, PROJECT, DEPLOYMENT, 1, waited_s=5, timeout_s=30) is True
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT) == []


# ---- two deployments of ec2-trainer in one AWS account: same project tag, same DAG, even the same run ids


OTHER = "staging"


def test_the_instance_cap_counts_only_the_deployments_own_instances(cloud):
    ec2 = cloud.ec2
    ours = launch(ec2, make_spec(cloud), identity("a")).instance_id
    theirs = [launch(ec2, make_spec(cloud), identity(run, deployment=OTHER)).instance_id for run in ("a", "b")]
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT) == [ours]
    assert live_project_instances(ec2, PROJECT, OTHER) == sorted(theirs)
    # The other deployment's two instances take none of this one's two slots...
    assert instance_slot_free(ec2, PROJECT, DEPLOYMENT, 2, waited_s=0, timeout_s=0)  # would raise at the cap
    # ...and this one's instance none of the other's.
    with pytest.raises(InstanceCapError, match=r"2 instances of deployment staging are live") as caught:
        instance_slot_free(ec2, PROJECT, OTHER, 2, waited_s=0, timeout_s=0)
    assert ours not in str(caught.value)


def test_the_reaper_never_touches_another_deployments_expired_instances(cloud):
    ec2 = cloud.ec2
    now = int(time.time())
    ours = launch(ec2, make_spec(cloud), identity("r", expires_in_s=-10)).instance_id
    theirs = launch(ec2, make_spec(cloud), identity("r", expires_in_s=-10, deployment=OTHER)).instance_id
    # Project-tagged but with no deployment tag (launched by hand, or before the tag existed): no deployment's.
    unowned = ec2.run_instances(
        ImageId=cloud.images[UBUNTU_DLAMI.parameter],
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "ec2-trainer:project", "Value": PROJECT},
                    {"Key": "ec2-trainer:expires_at", "Value": "2020-01-01T00:00:00Z"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]

    assert terminate_expired(ec2, PROJECT, DEPLOYMENT, now, untagged_grace_s=0) == [ours]
    assert sorted(live(ec2)) == sorted([theirs, unowned])
    assert terminate_expired(ec2, PROJECT, OTHER, now, untagged_grace_s=0) == [theirs]
    assert live(ec2) == [unowned]


def test_teardown_by_tag_does_not_cross_deployments(cloud):
    ec2 = cloud.ec2
    run = identity("manual__2026-11-26T10:00:00+00:00")
    ours = launch(ec2, make_spec(cloud), run).instance_id
    same_run_elsewhere = identity(run.run_id, deployment=OTHER)
    theirs = launch(ec2, make_spec(cloud), same_run_elsewhere).instance_id

    assert terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id) == [ours]
    assert live(ec2) == [theirs]


def test_adoption_needs_every_run_tag_and_never_crosses_deployments(cloud):
    ec2 = cloud.ec2
    run = identity("manual__2026-11-26T10:00:00+00:00")
    # The other deployment's instance for a run with the same DAG, run id and commit: its host key is not ours.
    theirs = identity(run.run_id, deployment=OTHER)
    launch(ec2, make_spec(cloud), theirs, host_public_key="ssh-ed25519 THEIRS")
    assert adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha) is None

    ours = launch(ec2, make_spec(cloud), run, host_public_key="ssh-ed25519 OURS")
    adopted = adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha)
    assert adopted is not None
    assert (adopted.instance_id, adopted.host_public_key) == (ours.instance_id, "ssh-ed25519 OURS")
    # Each of the run's own tags must match, not just the run id.
    for other_dag, other_sha, other_project in (
        ("another_dag", run.git_sha, PROJECT),
        (run.dag_id, "c" * 40, PROJECT),
        (run.dag_id, run.git_sha, "someone-else"),
    ):
        assert adopt_run_instance(ec2, other_project, DEPLOYMENT, other_dag, run.run_id, other_sha) is None
