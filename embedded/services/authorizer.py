"""What AWS authorizes for an EC2 request: the (action, resource ARN, condition keys) triples, one per resource.

EC2 authorizes RunInstances once per resource it uses or creates (the service authorization reference: instance,
volume, image, subnet, security group, network interface, and the spot request when spot), each with that
resource's condition keys, plus `ec2:CreateTags` per tagged resource type (`ec2:CreateAction` = RunInstances) and
`iam:PassRole` on the instance profile's role; CreateImage likewise on the instance, the image and its snapshots.
Every triple must be allowed (embedded.services.iam_policy.evaluate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Check = tuple[str, str, dict[str, str | list[str]]]
# Where the IAM action differs from the API operation's name (the service authorization reference says so).
ACTION_OF = {
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:HeadObject": "s3:GetObject",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
}


def _tags(request: Mapping[str, Any], resource_type: str) -> dict[str, str | list[str]]:
    tags = [
        tag
        for spec in request.get("TagSpecifications", [])
        if spec["ResourceType"] == resource_type
        for tag in spec["Tags"]
    ]
    context: dict[str, str | list[str]] = {f"aws:RequestTag/{t['Key']}": t["Value"] for t in tags}
    if tags:
        context["aws:TagKeys"] = [t["Key"] for t in tags]
    return context


def run_instances_checks(
    request: Mapping[str, Any],
    *,
    region: str,
    account: str,
    image_owner: str,
    vpc_id: str,
    role_of_profile: Mapping[str, str],
    image_tags: Mapping[str, str] | None = None,
) -> list[Check]:
    """The checks of one RunInstances request (boto3's parameters). `image_owner` is the AMI's owner alias or
    account, `image_tags` its tags, `vpc_id` the subnet's VPC, `role_of_profile` each instance profile's role name."""
    arn = f"arn:aws:ec2:{region}:{account}"
    vpc = {"ec2:Vpc": f"{arn}:vpc/{vpc_id}"}
    instance = {
        **_tags(request, "instance"),
        "ec2:InstanceType": request["InstanceType"],
        "ec2:MetadataHttpTokens": request.get("MetadataOptions", {}).get("HttpTokens", "optional"),
    }
    checks: list[Check] = []
    profile = request.get("IamInstanceProfile")
    if profile:
        name = profile.get("Name") or profile["Arn"].rsplit("/", 1)[1]
        instance["ec2:InstanceProfile"] = f"arn:aws:iam::{account}:instance-profile/{name}"
        checks.append(
            (
                "iam:PassRole",
                f"arn:aws:iam::{account}:role/{role_of_profile[name]}",
                {"iam:PassedToService": "ec2.amazonaws.com"},
            )
        )
    checks.append(("ec2:RunInstances", f"{arn}:instance/*", instance))
    for mapping in request.get("BlockDeviceMappings", []):
        volume = {**_tags(request, "volume"), "ec2:Encrypted": str(mapping["Ebs"].get("Encrypted", False)).lower()}
        checks.append(("ec2:RunInstances", f"{arn}:volume/*", volume))
    image = {"ec2:Owner": image_owner, **_resource_tags(image_tags or {})}
    checks.append(("ec2:RunInstances", f"arn:aws:ec2:{region}::image/{request['ImageId']}", image))
    for interface in request.get("NetworkInterfaces", []):
        checks.append(("ec2:RunInstances", f"{arn}:subnet/{interface['SubnetId']}", dict(vpc)))
        checks.extend(("ec2:RunInstances", f"{arn}:security-group/{g}", dict(vpc)) for g in interface["Groups"])
        checks.append(("ec2:RunInstances", f"{arn}:network-interface/*", dict(vpc)))
    if request.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
        checks.append(("ec2:RunInstances", f"{arn}:spot-instances-request/*", {}))
    for resource_type in ("instance", "volume"):
        tags = _tags(request, resource_type)
        if tags:
            checks.append(("ec2:CreateTags", f"{arn}:{resource_type}/*", {**tags, "ec2:CreateAction": "RunInstances"}))
    return checks


def _resource_tags(tags: Mapping[str, str]) -> dict[str, str | list[str]]:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


def terminate_checks(
    instances: Mapping[str, Mapping[str, str]], *, region: str, account: str, action: str = "ec2:TerminateInstances"
) -> list[Check]:
    """TerminateInstances (and StopInstances, `action`) is authorized per instance, on its tags
    (`aws:ResourceTag/...`)."""
    return [
        (action, f"arn:aws:ec2:{region}:{account}:instance/{instance_id}", _resource_tags(tags))
        for instance_id, tags in instances.items()
    ]


def create_image_checks(
    request: Mapping[str, Any], instance_tags: Mapping[str, str], *, region: str, account: str
) -> list[Check]:
    """CreateImage is authorized on the instance (its tags), on the new image and on its snapshots (each with the
    request's tags for it), plus `ec2:CreateTags` per tagged resource type (`ec2:CreateAction` = CreateImage).
    Images and snapshots have no account in their ARNs."""
    checks: list[Check] = [
        (
            "ec2:CreateImage",
            f"arn:aws:ec2:{region}:{account}:instance/{request['InstanceId']}",
            _resource_tags(instance_tags),
        )
    ]
    for resource_type in ("image", "snapshot"):
        tags = _tags(request, resource_type)
        checks.append(("ec2:CreateImage", f"arn:aws:ec2:{region}::{resource_type}/*", tags))
        if tags:
            checks.append(
                (
                    "ec2:CreateTags",
                    f"arn:aws:ec2:{region}::{resource_type}/*",
                    {**tags, "ec2:CreateAction": "CreateImage"},
                )
            )
    return checks


def image_resource_checks(
    action: str, resource_type: str, tags_by_id: Mapping[str, Mapping[str, str]], *, region: str
) -> list[Check]:
    """DeregisterImage (an image) and DeleteSnapshot (a snapshot): authorized on the resource's tags."""
    return [
        (action, f"arn:aws:ec2:{region}::{resource_type}/{resource_id}", _resource_tags(tags))
        for resource_id, tags in tags_by_id.items()
    ]
