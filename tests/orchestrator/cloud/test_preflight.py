"""plan_launch's checks against a strict in-process AWS: each misconfiguration fails before launch, naming it."""

from __future__ import annotations

from typing import Any

import pytest

from embedded.cloud import ACCOUNT_ID, AMAZON_LINUX_DLAMI, UBUNTU_DLAMI
from orchestrator.cloud.preflight import (
    ImageRoot,
    Network,
    Subnet,
    check_architecture,
    check_instance_profile,
    check_network,
    read_image_root,
    root_volume_gb,
)
from orchestrator.errors import ConfigError
from tests.support.aws_cloud import PROFILE, REGION, SSH_PORT, StrictAws, strict_aws


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Any:
    with strict_aws(monkeypatch) as aws:
        yield aws


def test_the_image_root_is_read_from_describe_images(cloud: StrictAws) -> None:
    for image in (UBUNTU_DLAMI, AMAZON_LINUX_DLAMI):
        root = read_image_root(cloud.ec2, cloud.images[image.parameter])
        assert root == ImageRoot(image.root_device_name, image.root_snapshot_gb, image.name, "x86_64")


def test_an_unknown_image_is_a_config_error(cloud: StrictAws) -> None:
    with pytest.raises(ConfigError, match=r"aws.ami_ssm_parameter: image ami-0123456789abcdef0 does not exist"):
        read_image_root(cloud.ec2, "ami-0123456789abcdef0")
    with pytest.raises(ConfigError, match=r"aws.ami_id: image ami-0123456789abcdef0 does not exist.*ec2.ami_id"):
        read_image_root(cloud.ec2, "ami-0123456789abcdef0", "aws.ami_id")


def moto_image(image_id: str) -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT_ID][REGION].amis[image_id]


@pytest.mark.parametrize("state", ["pending", "failed", "deregistered", "disabled"])
def test_an_image_that_is_not_available_is_refused_naming_its_state(cloud: StrictAws, state: str) -> None:
    image_id = cloud.images[UBUNTU_DLAMI.parameter]
    moto_image(image_id).state = state
    with pytest.raises(ConfigError, match=rf"aws.ami_id: image {image_id} \(.*\) is {state}, not available"):
        read_image_root(cloud.ec2, image_id, "aws.ami_id")


def test_the_image_must_be_of_every_instance_types_architecture(cloud: StrictAws) -> None:
    image_id = cloud.images[UBUNTU_DLAMI.parameter]
    x86 = read_image_root(cloud.ec2, image_id, "aws.ami_id")
    check_architecture(cloud.ec2, image_id, x86, ("g6.xlarge", "g5.xlarge"), "aws.ami_id")
    with pytest.raises(ConfigError, match=r"aws.ami_id: image .* is x86_64, which instance types \['g5g.xlarge'\]"):
        check_architecture(cloud.ec2, image_id, x86, ("g6.xlarge", "g5g.xlarge"), "aws.ami_id")
    moto_image(image_id).architecture = "arm64"
    arm = read_image_root(cloud.ec2, image_id, "aws.ami_id")
    check_architecture(cloud.ec2, image_id, arm, ("g5g.xlarge",), "aws.ami_id")
    with pytest.raises(ConfigError, match=r"is arm64, which instance types \['g6.xlarge'\] do not run"):
        check_architecture(cloud.ec2, image_id, arm, ("g5g.xlarge", "g6.xlarge"), "aws.ami_id")


def test_a_root_volume_below_the_snapshot_is_refused_naming_the_setting() -> None:
    root = ImageRoot("/dev/sda1", 75)
    assert root_volume_gb(100, root) == 100
    assert root_volume_gb(75, root) == 75
    with pytest.raises(ConfigError, match=r"aws.root_volume_gb = 50 .*75 GB at /dev/sda1.*at least 75"):
        root_volume_gb(50, root)


def test_a_good_network_passes_and_says_each_subnets_zone_and_whether_it_maps_public_ips(cloud: StrictAws) -> None:
    zone_b, zone_a = cloud.network.subnet_ids[::-1]
    group = (cloud.network.security_group_id,)
    network = check_network(cloud.ec2, (zone_b, zone_a), group, SSH_PORT, "aws.subnet_ids")
    assert network == Network(
        cloud.network.vpc_id,
        (Subnet(zone_b, f"{REGION}b", False), Subnet(zone_a, f"{REGION}a", False)),
    )


def group(cloud: StrictAws, vpc_id: str, *permissions: dict[str, Any]) -> str:
    name = f"g{len(cloud.ec2.describe_security_groups()['SecurityGroups'])}"
    group_id = str(cloud.ec2.create_security_group(GroupName=name, Description="x", VpcId=vpc_id)["GroupId"])
    if permissions:
        cloud.ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=list(permissions))
    return group_id


def test_a_group_with_any_rule_admitting_the_ssh_port_will_do(cloud: StrictAws) -> None:
    vpc = cloud.network.vpc_id
    https = {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ranged = {"IpProtocol": "tcp", "FromPort": 20, "ToPort": 30, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    everything = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
    for admitting in (ranged, everything):
        groups = (group(cloud, vpc, https), group(cloud, vpc, admitting))
        check_network(cloud.ec2, (cloud.network.subnet_id,), groups, 22, "aws.subnet_id")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no subnet", r"aws.subnet_ids \(or aws.subnet_id\) is empty"),
        (
            "unknown subnet",
            r"aws.subnet_ids: InvalidSubnetID.NotFound: .* set subnets that exist",
        ),
        ("subnets of two vpcs", r"aws.subnet_ids: \['subnet-.*', 'subnet-.*'\] are in more than one VPC"),
        ("no groups", r"aws.security_group_ids is empty: EC2 would use the VPC's default group"),
        ("unknown group", r"aws.security_group_ids: \['sg-0123456789abcdef0'\]: InvalidGroup.NotFound"),
        ("no ssh rule", r"none of .* has an inbound rule for TCP 22 \(instance.ssh_port\)"),
        ("other vpc", r"aws.security_group_ids: \['sg-.*'\] are not in the VPC vpc-"),
    ],
)
def test_a_bad_network_is_a_config_error_naming_the_setting(cloud: StrictAws, case: str, message: str) -> None:
    subnets, groups = cloud.network.subnet_ids, (cloud.network.security_group_id,)
    ssh = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    if case == "no subnet":
        subnets = ()
    elif case == "unknown subnet":
        subnets = (cloud.network.subnet_id, "subnet-0123456789abcdef0")
    elif case == "subnets of two vpcs":
        other_vpc = cloud.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        other = cloud.ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
        subnets = (cloud.network.subnet_id, other)
    elif case == "no groups":
        groups = ()
    elif case == "unknown group":
        groups = ("sg-0123456789abcdef0",)
    elif case == "no ssh rule":
        groups = (group(cloud, cloud.network.vpc_id),)
    else:
        other_vpc = cloud.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        groups = (group(cloud, other_vpc, ssh),)
    with pytest.raises(ConfigError, match=message):
        check_network(cloud.ec2, subnets, groups, SSH_PORT, "aws.subnet_ids")


def test_the_instance_profile_must_exist(cloud: StrictAws) -> None:
    check_instance_profile(cloud.iam, PROFILE)
    check_instance_profile(cloud.iam, f"arn:aws:iam::123456789012:instance-profile/{PROFILE}")
    with pytest.raises(ConfigError, match=r"aws.instance_profile: instance profile 'nope' does not exist"):
        check_instance_profile(cloud.iam, "nope")
