from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import pytest

from orchestrator.cloud.launch_spec import (
    CLIENT_TOKEN_MAX,
    TAG_VALUE_MAX,
    AmiNotFoundError,
    LaunchAttempt,
    LaunchSpec,
    RunIdentity,
    adoption_tags,
    build_run_instances_request,
    deployment_tags,
    launch_attempts,
    parse_expires_at,
    resolve_ami,
    run_scope_tags,
    run_tags,
    tag_value,
)
from orchestrator.contracts import TAG_DEPLOYMENT, TAG_EXPIRES_AT, TAG_HOST_KEY
from orchestrator.errors import ConfigError
from tests.support.aws_cloud import in_process_aws
from tests.support.zone import machine_zone

AL2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
IDENTITY = RunIdentity(
    dag_id="train_hurricane",
    run_id="manual__2026-01-02T03:04:05+00:00",
    git_sha="a" * 40,
    expires_at_epoch=1_800_000_000,
    deployment="prod",
)


def make_spec(**overrides) -> LaunchSpec:
    fields: dict[str, Any] = {
        "ami_id": "ami-0123456789abcdef0",
        "instance_types": ("g5.xlarge", "g6.xlarge"),
        "spot": True,
        "spot_fallback_to_on_demand": True,
        "subnet_ids": ("subnet-0abc", "subnet-1def"),
        "security_group_ids": ("sg-1", "sg-2"),
        "public_ip": True,
        "instance_profile": "ec2-trainer-instance",
        "root_volume_gb": 150,
        "root_device_name": "/dev/sda1",
        "project_tag": "ec2-trainer",
        "extra_tags": {"team": "ml"},
    }
    fields.update(overrides)
    return LaunchSpec(**fields)


def test_request_has_every_field():
    req = build_run_instances_request(
        make_spec(), IDENTITY, "#cloud-config\n", LaunchAttempt("g5.xlarge", "spot", "subnet-0abc")
    )
    assert req["ImageId"] == "ami-0123456789abcdef0"
    assert req["InstanceType"] == "g5.xlarge"
    assert (req["MinCount"], req["MaxCount"]) == (1, 1)
    assert req["UserData"] == "#cloud-config\n"
    assert req["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2}
    assert req["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/sda1",
            "Ebs": {"VolumeSize": 150, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
        }
    ]
    assert req["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert req["IamInstanceProfile"] == {"Name": "ec2-trainer-instance"}
    # The interface asks for a public IP whatever the subnet's default; top-level SubnetId would not.
    assert req["NetworkInterfaces"] == [
        {
            "DeviceIndex": 0,
            "SubnetId": "subnet-0abc",
            "Groups": ["sg-1", "sg-2"],
            "AssociatePublicIpAddress": True,
            "DeleteOnTermination": True,
        }
    ]
    assert "SubnetId" not in req and "SecurityGroupIds" not in req
    assert req["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
    }
    assert [t["ResourceType"] for t in req["TagSpecifications"]] == ["instance", "volume"]
    tags = {t["Key"]: t["Value"] for t in req["TagSpecifications"][0]["Tags"]}
    assert tags == {**run_tags(IDENTITY, "ec2-trainer"), "team": "ml"}
    assert req["TagSpecifications"][1]["Tags"] == req["TagSpecifications"][0]["Tags"]
    assert 0 < len(req["ClientToken"]) <= CLIENT_TOKEN_MAX


def test_on_demand_request_with_arn_profile_kms_private_address_and_the_images_root_device():
    spec = make_spec(
        instance_profile="arn:aws:iam::123456789012:instance-profile/x",
        kms_key_id="alias/ebs",
        public_ip=False,
        root_device_name="/dev/xvda",
    )
    req = build_run_instances_request(spec, IDENTITY, "ud", LaunchAttempt("g6.xlarge", "on-demand", "subnet-0abc"))
    assert "InstanceMarketOptions" not in req
    assert req["IamInstanceProfile"] == {"Arn": "arn:aws:iam::123456789012:instance-profile/x"}
    assert req["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvda"
    assert req["BlockDeviceMappings"][0]["Ebs"]["KmsKeyId"] == "alias/ebs"
    assert req["NetworkInterfaces"][0]["AssociatePublicIpAddress"] is False
    assert "IamInstanceProfile" not in build_run_instances_request(
        make_spec(instance_profile=None), IDENTITY, "ud", LaunchAttempt("g6.xlarge", "on-demand", "subnet-0abc")
    )


def test_client_token_is_deterministic_and_distinct_per_attempt():
    def token(identity, instance_type, market, subnet="subnet-0abc"):
        attempt = LaunchAttempt(instance_type, market, subnet)
        return build_run_instances_request(make_spec(), identity, "ud", attempt)["ClientToken"]

    first = token(IDENTITY, "g5.xlarge", "spot")
    assert first == token(IDENTITY, "g5.xlarge", "spot")
    assert first != token(IDENTITY, "g5.xlarge", "on-demand")
    assert first != token(IDENTITY, "g6.xlarge", "spot")
    assert first != token(IDENTITY, "g5.xlarge", "spot", "subnet-1def")
    other_run = dataclasses.replace(IDENTITY, run_id=IDENTITY.run_id + "x")
    assert first != token(other_run, "g5.xlarge", "spot")
    # Tokens are per account: another deployment's run with the same id must not get this instance back.
    assert first != token(dataclasses.replace(IDENTITY, deployment="staging"), "g5.xlarge", "spot")


def test_run_tags():
    tags = run_tags(IDENTITY, "ec2-trainer")
    assert tags["ec2-trainer:project"] == "ec2-trainer"
    assert tags["ec2-trainer:deployment"] == "prod"
    assert tags["ec2-trainer:dag_id"] == "train_hurricane"
    assert tags["ec2-trainer:run_id"] == "manual__2026-01-02T03:04:05+00:00"
    assert tags["ec2-trainer:git_sha"] == "a" * 40
    assert tags["ec2-trainer:expires_at"] == "2027-01-15T08:00:00Z"
    assert parse_expires_at(tags["ec2-trainer:expires_at"]) == IDENTITY.expires_at_epoch
    assert tags["Name"] == "ec2-trainer/train_hurricane/aaaaaaaaaaaa"


def test_adoption_matches_every_run_tag_but_the_per_try_ones():
    tags = run_tags(IDENTITY, "ec2-trainer", host_public_key="ssh-ed25519 AAAA")
    i = IDENTITY
    adoption = adoption_tags("ec2-trainer", i.deployment, i.dag_id, i.run_id, i.git_sha)
    assert adoption == {k: v for k, v in tags.items() if k not in (TAG_EXPIRES_AT, TAG_HOST_KEY)}
    assert run_scope_tags("ec2-trainer", i.deployment, i.dag_id, i.run_id).items() <= adoption.items()
    assert deployment_tags("ec2-trainer", "prod") == {"ec2-trainer:project": "ec2-trainer", TAG_DEPLOYMENT: "prod"}


def test_tag_values_are_sanitised_truncated_and_stay_distinct():
    long_a, long_b = "r" * 300 + "a", "r" * 300 + "b"
    assert len(tag_value(long_a)) == TAG_VALUE_MAX
    assert tag_value(long_a) != tag_value(long_b)
    assert tag_value(long_a) == tag_value(long_a)
    # Changed values carry a hash of the original so two of them cannot collide.
    assert tag_value("run<1>;$x").startswith("run_1___x~")
    assert tag_value("plain-run_id:1+2@x/y=z") == "plain-run_id:1+2@x/y=z"
    assert parse_expires_at("soon") is None
    # At least 64 bits of digest: the reaper and teardown find a run's instances by this tag alone.
    assert re.fullmatch(r"r+~[0-9a-f]{16}", tag_value(long_a))


def test_attempt_order_every_zone_before_the_next_type_every_type_before_on_demand():
    def order(spec: LaunchSpec) -> list[str]:
        return [str(attempt) for attempt in launch_attempts(spec)]

    assert order(make_spec()) == [
        "g5.xlarge (spot) in subnet-0abc",
        "g5.xlarge (spot) in subnet-1def",
        "g6.xlarge (spot) in subnet-0abc",
        "g6.xlarge (spot) in subnet-1def",
        "g5.xlarge (on-demand) in subnet-0abc",
        "g5.xlarge (on-demand) in subnet-1def",
        "g6.xlarge (on-demand) in subnet-0abc",
        "g6.xlarge (on-demand) in subnet-1def",
    ]
    assert order(make_spec(spot_fallback_to_on_demand=False, subnet_ids=("subnet-0abc",))) == [
        "g5.xlarge (spot) in subnet-0abc",
        "g6.xlarge (spot) in subnet-0abc",
    ]
    assert order(make_spec(spot=False, subnet_ids=("subnet-1def",))) == [
        "g5.xlarge (on-demand) in subnet-1def",
        "g6.xlarge (on-demand) in subnet-1def",
    ]


def test_each_attempt_launches_in_its_own_subnet():
    for attempt in launch_attempts(make_spec()):
        req = build_run_instances_request(make_spec(), IDENTITY, "ud", attempt)
        assert [i["SubnetId"] for i in req["NetworkInterfaces"]] == [attempt.subnet_id]
        assert req["InstanceType"] == attempt.instance_type
        assert ("InstanceMarketOptions" in req) == (attempt.market == "spot")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ami_id": "resolve:ssm:/x"}, "is not an AMI id"),
        (
            {"instance_types": ()},
            r"^instance_types is empty: list at least one instance type, e\.g\. \('g5\.xlarge',\)$",
        ),
        ({"instance_types": ("g5.xlarge", "g5.xlarge")}, "lists a type twice"),
        ({"root_volume_gb": 0}, "root_volume_gb must be at least 1"),
        ({"subnet_ids": ()}, r"^subnet_ids is empty: list at least one subnet \(subnet-\.\.\.\)$"),
        ({"subnet_ids": ("subnet-0abc", "vpc-1")}, r"^subnet_ids \['vpc-1'\] are not subnet ids \(subnet-\.\.\.\)$"),
        (
            {"security_group_ids": ()},
            r"^security_group_ids is empty: EC2 would use the VPC's default group; name the groups$",
        ),
        ({"root_device_name": "sda1"}, "is not a device name"),
        ({"project_tag": " "}, r"^project_tag is empty: set it, the reaper finds instances by it$"),
        ({"extra_tags": {"ec2-trainer:run_id": "x"}}, "reserved keys"),
        ({"extra_tags": {"aws:cloudformation:stack-id": "x"}}, r"\['aws:cloudformation:stack-id'\] use reserved keys"),
        (
            {"extra_tags": {"Name": "mine"}},
            r"^extra_tags \['Name'\] use reserved keys \(ec2-trainer:\*, aws:\*, Name\)",
        ),
    ],
)
def test_invalid_spec_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        make_spec(**override)


def test_the_smallest_valid_spec_values_are_accepted():
    assert make_spec(root_volume_gb=1, extra_tags={"name": "lower-case is the user's own"}).root_volume_gb == 1


def test_a_tag_value_of_exactly_the_limit_is_kept_as_it_is():
    value = "r" * TAG_VALUE_MAX
    assert tag_value(value) == value
    assert tag_value(value + "r") != value + "r"


def test_expiry_tags_are_utc_whatever_the_machine_zone():
    with machine_zone("America/New_York"):
        assert run_tags(IDENTITY, "ec2-trainer")[TAG_EXPIRES_AT] == "2027-01-15T08:00:00Z"
        assert parse_expires_at("2027-01-15T08:00:00Z") == 1_800_000_000


def test_the_host_key_is_a_tag_of_the_launch():
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE"
    assert run_tags(IDENTITY, "ec2-trainer", key)[TAG_HOST_KEY] == key
    req = build_run_instances_request(
        make_spec(), IDENTITY, "ud", LaunchAttempt("g5.xlarge", "spot", "subnet-0abc"), host_public_key=key
    )
    assert {t["Key"]: t["Value"] for t in req["TagSpecifications"][0]["Tags"]}[TAG_HOST_KEY] == key


def test_the_client_token_is_the_hash_of_the_attempt_and_its_expiry():
    # Pinned: botocore's retries of one RunInstances must send the same token, whatever code computes it.
    fields = ("prod", "train_hurricane", IDENTITY.run_id, "g5.xlarge", "spot", "subnet-0abc", "1800000000")
    expected = hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:CLIENT_TOKEN_MAX]
    req = build_run_instances_request(make_spec(), IDENTITY, "ud", LaunchAttempt("g5.xlarge", "spot", "subnet-0abc"))
    assert req["ClientToken"] == expected
    later = dataclasses.replace(IDENTITY, expires_at_epoch=IDENTITY.expires_at_epoch + 1)
    assert (
        build_run_instances_request(make_spec(), later, "ud", LaunchAttempt("g5.xlarge", "spot", "subnet-0abc"))[
            "ClientToken"
        ]
        != expected
    )


class _FailingSsm:
    """An SSM client whose GetParameter fails with `response` (botocore's ClientError)."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.meta = type("Meta", (), {"region_name": "eu-west-1"})()

    def get_parameter(self, Name: str) -> Any:
        from botocore.exceptions import ClientError

        raise ClientError(self.response, "GetParameter")


def test_resolve_ami_says_not_found_for_an_invalid_parameter_name():
    ssm = _FailingSsm({"Error": {"Code": "ValidationException", "Message": "bad name"}})
    with pytest.raises(
        AmiNotFoundError,
        match=r"^SSM parameter /x not found in region eu-west-1: set aws\.ami_ssm_parameter to an existing Deep "
        r"Learning AMI parameter$",
    ):
        resolve_ami(ssm, "/x")


@pytest.mark.parametrize("response", [{"Error": {"Code": "AccessDeniedException"}}, {}])
def test_resolve_ami_lets_other_errors_through_as_they_are(response):
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        resolve_ami(_FailingSsm(response), "/x")


@pytest.fixture
def ssm(monkeypatch):
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    with in_process_aws():
        yield boto3.client("ssm", region_name="us-east-1")


def test_resolve_ami_reads_the_ssm_parameter(ssm):
    assert resolve_ami(ssm, AL2023).startswith("ami-")


def test_resolve_ami_names_the_missing_parameter(ssm):
    missing = "/aws/service/deeplearning/ami/x86_64/no-such-ami/latest/ami-id"
    with pytest.raises(
        AmiNotFoundError, match=f"SSM parameter {missing} not found in region us-east-1: set aws.ami_ssm"
    ):
        resolve_ami(ssm, missing)


def test_resolve_ami_refuses_a_value_that_is_no_ami(ssm):
    ssm.put_parameter(Name="/project/not-an-ami", Value="hello", Type="String")
    with pytest.raises(
        AmiNotFoundError,
        match=r"holds 'hello', not an AMI id: set aws\.ami_ssm_parameter to a parameter ending in /ami-id$",
    ):
        resolve_ami(ssm, "/project/not-an-ami")


def test_the_default_ami_is_a_supported_pytorch_ubuntu_dlami():
    """The PyTorch 2.8 DLAMI's support ended 2026-08-06; 2.11 and 2.12 Ubuntu 24.04 DLAMIs are current. The embedded
    stand-in image mirrors the default's name, so the demo runs what production runs."""
    import re
    import tomllib

    from embedded.cloud import UBUNTU_DLAMI
    from orchestrator.config.settings import DEFAULTS_FILE

    parameter = tomllib.loads(DEFAULTS_FILE.read_text())["aws"]["ami_ssm_parameter"]
    match = re.fullmatch(
        r"/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-(\d+)\.(\d+)-ubuntu-24\.04/latest/ami-id",
        parameter,
    )
    assert match, parameter
    assert (int(match[1]), int(match[2])) >= (2, 11), f"{parameter} names a PyTorch DLAMI out of support"
    assert parameter == UBUNTU_DLAMI.parameter


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "spot_then_on_demand",
            [
                "g5.xlarge (spot) in subnet-1def",
                "g6.xlarge (spot) in subnet-0abc",
                "g6.xlarge (spot) in subnet-1def",
                "g5.xlarge (spot) in subnet-0abc",
                "g5.xlarge (on-demand) in subnet-0abc",
                "g5.xlarge (on-demand) in subnet-1def",
                "g6.xlarge (on-demand) in subnet-0abc",
                "g6.xlarge (on-demand) in subnet-1def",
            ],
        ),
        (
            "spot_only",
            [
                "g5.xlarge (spot) in subnet-1def",
                "g6.xlarge (spot) in subnet-0abc",
                "g6.xlarge (spot) in subnet-1def",
                "g5.xlarge (spot) in subnet-0abc",
            ],
        ),
        (
            "on_demand",
            [
                "g5.xlarge (on-demand) in subnet-0abc",
                "g5.xlarge (on-demand) in subnet-1def",
                "g6.xlarge (on-demand) in subnet-0abc",
                "g6.xlarge (on-demand) in subnet-1def",
            ],
        ),
    ],
)
def test_after_a_spot_interruption_the_next_options_come_first_and_the_lost_one_last(policy, expected):
    """The same type in the next zone, then the next type; the lost zone again last (its capacity may come back);
    then on-demand, whatever the spec's own fallback says (aws.recovery decides after an interruption)."""
    from orchestrator.cloud.launch_spec import recovery_attempts

    lost = LaunchAttempt("g5.xlarge", "spot", "subnet-0abc")
    spec = make_spec(spot_fallback_to_on_demand=False)
    assert [str(a) for a in recovery_attempts(spec, lost, policy)] == expected
