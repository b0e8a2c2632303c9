from __future__ import annotations

import base64
import json
import time
from typing import Any
from unittest.mock import Mock

import pytest
from moto import mock_aws

from orchestrator.ec2 import (
    CapacityError,
    InstanceCapError,
    InstanceNotReadyError,
    LaunchError,
    RetryPolicy,
    adopt_run_instance,
    describe_instance,
    find_run_instances,
    launch_instance,
    live_project_instances,
    sweep_expired,
    terminate_run,
    wait_for_instance_slot,
    wait_until_running,
)
from orchestrator.launch import LaunchSpec, RunIdentity, run_scope_tags

PROJECT = "ec2-trainer"
DEPLOYMENT = "prod"
FAST = RetryPolicy(max_attempts=3, base_delay_s=0.0)
USER_DATA = "#cloud-config\nruncmd:\n- [echo, hi]\n"


@pytest.fixture
def aws(monkeypatch):
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    with mock_aws():
        iam = boto3.client("iam", region_name="us-east-1")
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ],
        }
        iam.create_role(RoleName="trainer", AssumeRolePolicyDocument=json.dumps(trust))
        iam.create_instance_profile(InstanceProfileName="trainer")
        iam.add_role_to_instance_profile(InstanceProfileName="trainer", RoleName="trainer")
        # moto does not validate AMI ids (resolve_ami is tested in test_launch.py).
        yield boto3.client("ec2", region_name="us-east-1"), "ami-0123456789abcdef0"


def make_spec(ami: str, **overrides) -> LaunchSpec:
    fields: dict[str, Any] = {
        "ami_id": ami,
        "instance_types": ("g5.xlarge", "g6.xlarge"),
        "spot": True,
        "spot_fallback_to_on_demand": True,
        "subnet_id": None,
        "security_group_ids": (),
        "instance_profile": "trainer",
        "root_volume_gb": 100,
        "project_tag": PROJECT,
    }
    fields.update(overrides)
    return LaunchSpec(**fields)


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


def test_launch_creates_one_tagged_hardened_instance(aws):
    ec2, ami = aws
    launched = launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
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


def test_capacity_error_moves_to_the_next_type(aws):
    ec2, ami = aws
    calls = fail_run_instances(ec2, "InsufficientInstanceCapacity", lambda body, n: body["InstanceType"] == "g5.xlarge")
    launched = launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert (launched.instance_type, launched.market) == ("g6.xlarge", "spot")
    assert [c["InstanceType"] for c in calls] == ["g5.xlarge", "g6.xlarge"]
    assert live(ec2) == [launched.instance_id]


def test_spot_exhausted_falls_back_to_on_demand(aws):
    ec2, ami = aws
    fail_run_instances(ec2, "MaxSpotInstanceCountExceeded", lambda body, n: "InstanceMarketOptions.MarketType" in body)
    launched = launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert (launched.instance_type, launched.market) == ("g5.xlarge", "on-demand")


def test_no_capacity_anywhere_raises_capacity_error_and_leaves_nothing(aws):
    ec2, ami = aws
    calls = fail_run_instances(ec2, "InsufficientInstanceCapacity")
    with pytest.raises(
        CapacityError, match=r"g5\.xlarge \(spot\).*g6\.xlarge \(on-demand\).*other instance types"
    ) as err:
        launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert len(err.value.tried) == len(calls) == 4
    assert live(ec2) == []


def test_other_errors_raise_at_once(aws):
    ec2, ami = aws
    calls = fail_run_instances(ec2, "UnauthorizedOperation")
    with pytest.raises(LaunchError, match=r"UnauthorizedOperation.*docs/iam\.md"):
        launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert len(calls) == 1


def test_throttling_is_retried_then_succeeds(aws):
    ec2, ami = aws
    calls = fail_run_instances(ec2, "RequestLimitExceeded", lambda body, n: n == 1)
    launched = launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert (launched.instance_type, len(calls)) == ("g5.xlarge", 2)


def test_throttling_retries_are_bounded(aws):
    ec2, ami = aws
    calls = fail_run_instances(ec2, "RequestLimitExceeded")
    with pytest.raises(LaunchError, match="RequestLimitExceeded"):
        launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert len(calls) == FAST.max_attempts


def test_relaunch_of_the_same_run_reuses_its_instance(aws):
    ec2, ami = aws
    run = identity()
    first = launch_instance(ec2, make_spec(ami), run, USER_DATA, retry=FAST)
    # A retried task finds its run's instance by the run's tags, whatever its new expires_at and ClientToken.
    again = adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha, retry=FAST)
    assert again is not None
    assert (again.instance_id, again.reused, again.market) == (first.instance_id, True, "spot")
    assert adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, "manual__2", run.git_sha, retry=FAST) is None
    other = launch_instance(ec2, make_spec(ami), identity("manual__2"), USER_DATA, retry=FAST)
    assert other.instance_id != first.instance_id
    assert sorted(live(ec2)) == sorted([first.instance_id, other.instance_id])


def test_a_failure_after_the_instance_exists_terminates_it(aws):
    ec2, ami = aws

    def replay_of_a_terminated_instance(parsed, **_):
        parsed["Instances"][0]["State"]["Name"] = "terminated"

    ec2.meta.events.register("after-call.ec2.RunInstances", replay_of_a_terminated_instance)
    with pytest.raises(LaunchError, match=r"already terminated .*fresh token"):
        launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    assert live(ec2) == []


def test_wait_until_running(aws):
    ec2, ami = aws
    launched = launch_instance(ec2, make_spec(ami, spot=False), identity(), USER_DATA, retry=FAST)
    info = wait_until_running(ec2, launched.instance_id, timeout_s=10, poll_s=0.05, retry=FAST)
    assert (info.instance_id, info.state, info.instance_type) == (launched.instance_id, "running", "g5.xlarge")
    assert info.private_ip
    assert info.launch_time is not None


def test_wait_fails_fast_when_the_instance_is_gone(aws):
    ec2, ami = aws
    launched = launch_instance(ec2, make_spec(ami), identity(), USER_DATA, retry=FAST)
    ec2.terminate_instances(InstanceIds=[launched.instance_id])
    with pytest.raises(InstanceNotReadyError, match=f"instance {launched.instance_id} went (shutting-down|terminated)"):
        wait_until_running(ec2, launched.instance_id, timeout_s=10, poll_s=0.05, retry=FAST)


def test_wait_is_bounded_for_an_unknown_instance(aws):
    ec2, _ = aws
    assert describe_instance(ec2, "i-0123456789abcdef0", retry=FAST) is None
    with pytest.raises(InstanceNotReadyError, match=r"not running after 0s .*not visible yet"):
        wait_until_running(ec2, "i-0123456789abcdef0", timeout_s=0.2, poll_s=0.05, retry=FAST)


def test_terminate_by_id_and_by_tag_and_repeat(aws):
    ec2, ami = aws
    run = identity()
    tagged = launch_instance(ec2, make_spec(ami), run, USER_DATA, retry=FAST).instance_id
    # An instance of the run the launch task never reported (e.g. it crashed after RunInstances).
    stray = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    bystander = launch_instance(ec2, make_spec(ami), identity("manual__other"), USER_DATA, retry=FAST).instance_id

    asked = terminate_run(
        ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, instance_ids=[stray, "i-0123456789abcdef0", "bad-id"]
    )
    assert sorted(asked) == sorted([tagged, stray])
    assert live(ec2) == [bystander]
    assert find_run_instances(ec2, run_scope_tags(PROJECT, DEPLOYMENT, run.dag_id, run.run_id), retry=FAST) == []
    # Harmless to repeat, with or without the ids.
    assert terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, retry=FAST) == []
    again = terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, instance_ids=[tagged], retry=FAST)
    assert again == [tagged]
    assert live(ec2) == [bystander]


def test_terminate_propagates_unexpected_errors(aws):
    from botocore.exceptions import ClientError

    ec2, _ = aws

    def deny(**_):
        return Mock(status_code=403), {"Error": {"Code": "UnauthorizedOperation", "Message": "denied"}}

    ec2.meta.events.register("before-call.ec2.TerminateInstances", deny)
    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        terminate_run(ec2, PROJECT, DEPLOYMENT, "d", "r", instance_ids=["i-0123456789abcdef0"], retry=FAST)


def test_sweeper_terminates_expired_and_spares_the_rest(aws):
    ec2, ami = aws
    now = int(time.time())
    grace = 3600
    expired = launch_instance(ec2, make_spec(ami), identity("old", expires_in_s=-10), USER_DATA, retry=FAST)
    fresh = launch_instance(ec2, make_spec(ami), identity("new", expires_in_s=100 * grace), USER_DATA, retry=FAST)
    garbled = launch_instance(ec2, make_spec(ami), identity("garbled"), USER_DATA, retry=FAST)
    ec2.create_tags(Resources=[garbled.instance_id], Tags=[{"Key": "ec2-trainer:expires_at", "Value": "soon"}])
    other_project = launch_instance(
        ec2, make_spec(ami, project_tag="someone-else"), identity("x", expires_in_s=-10), USER_DATA, retry=FAST
    )

    assert sweep_expired(ec2, PROJECT, DEPLOYMENT, now, untagged_grace_s=grace, retry=FAST) == [expired.instance_id]
    assert sorted(live(ec2)) == sorted([fresh.instance_id, garbled.instance_id, other_project.instance_id])
    # Much later: the unreadable expiry is swept once past the grace period, the fresh one still is not.
    assert sweep_expired(ec2, PROJECT, DEPLOYMENT, now + 2 * grace, untagged_grace_s=grace, retry=FAST) == [
        garbled.instance_id
    ]
    assert sorted(live(ec2)) == sorted([fresh.instance_id, other_project.instance_id])
    assert sweep_expired(ec2, PROJECT, DEPLOYMENT, now + 2 * grace, untagged_grace_s=grace, retry=FAST) == []


def test_instance_slot_counts_the_projects_live_instances_in_ec2(aws, monkeypatch):
    ec2, ami = aws
    first = launch_instance(ec2, make_spec(ami), identity("a"), USER_DATA, retry=FAST).instance_id
    launch_instance(ec2, make_spec(ami, project_tag="someone-else"), identity("b"), USER_DATA, retry=FAST)
    # Whatever run launched it (a crashed one included), a live instance of the project counts against the cap.
    leftover = launch_instance(ec2, make_spec(ami), identity("c"), USER_DATA, retry=FAST).instance_id
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT, retry=FAST) == sorted([first, leftover])
    # A free slot is granted on the first look: one DescribeInstances, no sleep.
    describes, sleeps = [], []
    ec2.meta.events.register("before-call.ec2.DescribeInstances", lambda **_: describes.append(1))
    with monkeypatch.context() as patched:
        patched.setattr(time, "sleep", sleeps.append)
        wait_for_instance_slot(ec2, PROJECT, DEPLOYMENT, 3, timeout_s=0, poll_s=0.05, retry=FAST)
    assert (len(describes), sleeps) == (1, [])

    with pytest.raises(InstanceCapError) as caught:
        wait_for_instance_slot(ec2, PROJECT, DEPLOYMENT, 2, timeout_s=0.3, poll_s=0.05, retry=FAST)
    message = str(caught.value)
    assert "aws.max_instances = 2" in message and first in message and leftover in message


def test_instance_slot_opens_when_an_instance_ends(aws):
    import threading

    ec2, ami = aws
    busy = launch_instance(ec2, make_spec(ami), identity("a"), USER_DATA, retry=FAST).instance_id
    timer = threading.Timer(0.5, lambda: ec2.terminate_instances(InstanceIds=[busy]))
    timer.start()
    try:
        waited = wait_for_instance_slot(ec2, PROJECT, DEPLOYMENT, 1, timeout_s=30, poll_s=0.05, retry=FAST)
    finally:
        timer.join()
    assert 0.4 < waited < 30
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT, retry=FAST) == []


# ---- two deployments of ec2-trainer in one AWS account: same project tag, same DAG, even the same run ids


OTHER = "staging"


def test_the_instance_cap_counts_only_the_deployments_own_instances(aws):
    ec2, ami = aws
    ours = launch_instance(ec2, make_spec(ami), identity("a"), USER_DATA, retry=FAST).instance_id
    theirs = [
        launch_instance(ec2, make_spec(ami), identity(run, deployment=OTHER), USER_DATA, retry=FAST).instance_id
        for run in ("a", "b")
    ]
    assert live_project_instances(ec2, PROJECT, DEPLOYMENT, retry=FAST) == [ours]
    assert live_project_instances(ec2, PROJECT, OTHER, retry=FAST) == sorted(theirs)
    # The other deployment's two instances take none of this one's two slots...
    assert wait_for_instance_slot(ec2, PROJECT, DEPLOYMENT, 2, timeout_s=0, poll_s=0.05, retry=FAST) < 0.5
    # ...and this one's instance none of the other's.
    with pytest.raises(InstanceCapError, match=r"2 instances of deployment staging are live") as caught:
        wait_for_instance_slot(ec2, PROJECT, OTHER, 2, timeout_s=0, poll_s=0.05, retry=FAST)
    assert ours not in str(caught.value)


def test_the_sweeper_never_touches_another_deployments_expired_instances(aws):
    ec2, ami = aws
    now = int(time.time())
    ours = launch_instance(ec2, make_spec(ami), identity("r", expires_in_s=-10), USER_DATA, retry=FAST).instance_id
    theirs = launch_instance(
        ec2, make_spec(ami), identity("r", expires_in_s=-10, deployment=OTHER), USER_DATA, retry=FAST
    ).instance_id
    # Project-tagged but with no deployment tag (launched by hand, or before the tag existed): no deployment's.
    unowned = ec2.run_instances(
        ImageId=ami,
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

    assert sweep_expired(ec2, PROJECT, DEPLOYMENT, now, untagged_grace_s=0, retry=FAST) == [ours]
    assert sorted(live(ec2)) == sorted([theirs, unowned])
    assert sweep_expired(ec2, PROJECT, OTHER, now, untagged_grace_s=0, retry=FAST) == [theirs]
    assert live(ec2) == [unowned]


def test_teardown_by_tag_does_not_cross_deployments(aws):
    ec2, ami = aws
    run = identity("manual__2026-11-26T10:00:00+00:00")
    ours = launch_instance(ec2, make_spec(ami), run, USER_DATA, retry=FAST).instance_id
    same_run_elsewhere = identity(run.run_id, deployment=OTHER)
    theirs = launch_instance(ec2, make_spec(ami), same_run_elsewhere, USER_DATA, retry=FAST).instance_id

    assert terminate_run(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, retry=FAST) == [ours]
    assert live(ec2) == [theirs]


def test_adoption_needs_every_run_tag_and_never_crosses_deployments(aws):
    ec2, ami = aws
    run = identity("manual__2026-11-26T10:00:00+00:00")
    # The other deployment's instance for a run with the same DAG, run id and commit: its host key is not ours.
    theirs = identity(run.run_id, deployment=OTHER)
    launch_instance(ec2, make_spec(ami), theirs, USER_DATA, host_public_key="ssh-ed25519 THEIRS", retry=FAST)
    assert adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha, retry=FAST) is None

    ours = launch_instance(ec2, make_spec(ami), run, USER_DATA, host_public_key="ssh-ed25519 OURS", retry=FAST)
    adopted = adopt_run_instance(ec2, PROJECT, DEPLOYMENT, run.dag_id, run.run_id, run.git_sha, retry=FAST)
    assert adopted is not None
    assert (adopted.instance_id, adopted.host_public_key) == (ours.instance_id, "ssh-ed25519 OURS")
    # Each of the run's own tags must match, not just the run id.
    for other_dag, other_sha, other_project in (
        ("another_dag", run.git_sha, PROJECT),
        (run.dag_id, "c" * 40, PROJECT),
        (run.dag_id, run.git_sha, "someone-else"),
    ):
        assert adopt_run_instance(ec2, other_project, DEPLOYMENT, other_dag, run.run_id, other_sha, retry=FAST) is None
