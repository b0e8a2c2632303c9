"""Checks before anything is launched: the image (it exists, is available, suits the instance types, its root volume),
the network and the instance profile.

Each failure is a ConfigError naming the setting and the fix, raised by plan_launch before any money is spent, where
EC2 would otherwise refuse the launch (or launch an instance nobody can reach) only later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError, aws_error_code, aws_error_message


@dataclass(frozen=True)
class ImageRoot:
    """The image's root device as DescribeImages shows it: its name differs between AMIs (/dev/sda1, /dev/xvda)."""

    device_name: str
    snapshot_gb: int
    name: str = ""  # the image's name, recorded on the run (the id alone says nothing once the image is gone)
    architecture: str = "x86_64"


@dataclass(frozen=True)
class Subnet:
    subnet_id: str
    availability_zone: str
    # The subnet's own default; a launch that needs a public IP asks for one whatever this says.
    maps_public_ip: bool


@dataclass(frozen=True)
class Network:
    vpc_id: str
    # In the order launches try them: one availability zone after another.
    subnets: tuple[Subnet, ...]


def _reason(exc: BaseException) -> str:
    """EC2's own words: the error code and its message."""
    return f"{aws_error_code(exc)}: {aws_error_message(exc)}"


def read_image_root(ec2: Any, ami_id: str, setting: str = "aws.ami_ssm_parameter") -> ImageRoot:
    """The root device name and root snapshot size of an EBS-backed, available image; `setting` is where the id came
    from (aws.ami_ssm_parameter, or aws.ami_id when a run repeats an image), named by each error."""
    from botocore.exceptions import ClientError

    try:
        images = ec2.describe_images(ImageIds=[ami_id])["Images"]
    except ClientError as exc:
        if not aws_error_code(exc).startswith("InvalidAMIID"):
            raise
        images = []
    fix = (
        "set the parameter to a Deep Learning AMI parameter of this region"
        if setting == "aws.ami_ssm_parameter"
        else "give an image of this region (an earlier run's ec2.ami_id tag), or leave it empty for the newest"
    )
    if not images:
        raise ConfigError(f"{setting}: image {ami_id} does not exist in this region (or is not shared with you): {fix}")
    image = images[0]
    # A pending image cannot launch yet; a failed, deregistered or disabled one never will.
    if image.get("State", "available") != "available":
        raise ConfigError(
            f"{setting}: image {ami_id} ({image.get('Name')}) is {image.get('State')}, not available: {fix}"
        )
    device = image.get("RootDeviceName", "")
    root = next((m for m in image.get("BlockDeviceMappings", []) if m.get("DeviceName") == device), None)
    if image.get("RootDeviceType", "ebs") != "ebs" or root is None or "Ebs" not in root:
        raise ConfigError(
            f"{setting}: image {ami_id} ({image.get('Name')}) has no EBS root volume at {device!r}: "
            "use an EBS-backed Deep Learning AMI"
        )
    return ImageRoot(
        device, int(root["Ebs"]["VolumeSize"]), str(image.get("Name") or ""), str(image.get("Architecture") or "")
    )


def check_architecture(ec2: Any, ami_id: str, image: ImageRoot, instance_types: tuple[str, ...], setting: str) -> None:
    """Every instance type runs the image's architecture: EC2 would refuse the launch of an x86_64 image on a
    Graviton type (or the reverse) only at RunInstances, option after option."""
    pages = ec2.get_paginator("describe_instance_types").paginate(InstanceTypes=list(instance_types))
    supported = {
        t["InstanceType"]: t.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        for page in pages
        for t in page.get("InstanceTypes", [])
    }
    wrong = [t for t in instance_types if image.architecture not in supported.get(t, [])]
    if wrong:
        raise ConfigError(
            f"{setting}: image {ami_id} ({image.name}) is {image.architecture}, which instance types {wrong} do not "
            f"run ({', '.join(f'{t}: {sorted(supported.get(t, []))}' for t in wrong)}): choose an image of their "
            "architecture or other instance types"
        )


def root_volume_gb(configured_gb: int, image: ImageRoot) -> int:
    """The root volume size to request; EC2 refuses one below the image's snapshot (InvalidBlockDeviceMapping)."""
    if configured_gb < image.snapshot_gb:
        raise ConfigError(
            f"aws.root_volume_gb = {configured_gb} is smaller than the image's root snapshot "
            f"({image.snapshot_gb} GB at {image.device_name}): set aws.root_volume_gb to at least {image.snapshot_gb}"
        )
    return configured_gb


def _admits_tcp(permission: dict[str, Any], port: int) -> bool:
    protocol = str(permission.get("IpProtocol", ""))
    if protocol == "-1":
        return True
    if protocol not in ("tcp", "6"):
        return False
    return int(permission.get("FromPort", -1)) <= port <= int(permission.get("ToPort", -1))


def check_network(
    ec2: Any, subnet_ids: tuple[str, ...], security_group_ids: tuple[str, ...], ssh_port: int, setting: str
) -> Network:
    """Every subnet and group exists, all in one VPC, and at least one group admits TCP ssh_port inbound. `setting`
    is where the subnets came from (aws.subnet_ids, or aws.subnet_id alone), named by each error."""
    from botocore.exceptions import ClientError

    if not subnet_ids:
        raise ConfigError(
            "aws.subnet_ids (or aws.subnet_id) is empty: set the subnets to launch in (subnet-..., one per "
            "availability zone), each with a route to the internet (an internet gateway for a public IP, or a NAT "
            "with instance.address = private_ip)"
        )
    if not security_group_ids:
        raise ConfigError(
            "aws.security_group_ids is empty: EC2 would use the VPC's default group, which admits no SSH from "
            "Airflow. Set it to a group allowing TCP instance.ssh_port from the Airflow workers (docs/iam.md)"
        )
    try:
        found = {s["SubnetId"]: s for s in ec2.describe_subnets(SubnetIds=list(subnet_ids))["Subnets"]}
    except ClientError as exc:
        if aws_error_code(exc) not in ("InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"):
            raise
        raise ConfigError(
            f"{setting}: {_reason(exc)}: set subnets that exist in this region, of the security groups' VPC"
        ) from exc
    subnets = [found[subnet_id] for subnet_id in subnet_ids]
    vpcs = sorted({subnet["VpcId"] for subnet in subnets})
    if len(vpcs) > 1:
        raise ConfigError(f"{setting}: {list(subnet_ids)} are in more than one VPC ({vpcs}): use subnets of one VPC")
    (vpc_id,) = vpcs
    try:
        groups = ec2.describe_security_groups(GroupIds=list(security_group_ids))["SecurityGroups"]
    except ClientError as exc:
        if not aws_error_code(exc).startswith("InvalidGroup"):
            raise
        raise ConfigError(
            f"aws.security_group_ids: {list(security_group_ids)}: {_reason(exc)}. Set existing security group ids"
        ) from exc
    elsewhere = sorted(g["GroupId"] for g in groups if g.get("VpcId") != vpc_id)
    if elsewhere:
        raise ConfigError(
            f"aws.security_group_ids: {elsewhere} are not in the VPC {vpc_id} of {setting} {list(subnet_ids)}: "
            "use groups of that VPC"
        )
    if not any(_admits_tcp(p, ssh_port) for g in groups for p in g.get("IpPermissions", [])):
        raise ConfigError(
            f"aws.security_group_ids: none of {list(security_group_ids)} has an inbound rule for TCP {ssh_port} "
            "(instance.ssh_port), so SSH would never answer: add one from the Airflow workers' addresses"
        )
    return Network(
        vpc_id,
        tuple(
            Subnet(s["SubnetId"], str(s.get("AvailabilityZone", "")), bool(s.get("MapPublicIpOnLaunch")))
            for s in subnets
        ),
    )


def check_instance_profile(iam: Any, profile: str) -> None:
    """The instance profile (a name or an ARN) exists; RunInstances would refuse it only at launch."""
    from botocore.exceptions import ClientError

    name = profile.rsplit("/", 1)[-1] if profile.startswith("arn:") else profile
    try:
        iam.get_instance_profile(InstanceProfileName=name)
    except ClientError as exc:
        if aws_error_code(exc) != "NoSuchEntity":
            raise
        raise ConfigError(
            f"aws.instance_profile: instance profile {name!r} does not exist: create it (docs/iam.md) or leave the "
            "setting empty to launch without one"
        ) from exc
