"""What AWS authorizes for an EC2 request: the (action, resource ARN, condition keys) triples, one per resource.

EC2 authorizes RunInstances once per resource it uses or creates (the service authorization reference: instance,
volume, image, subnet, security group, network interface, and the spot request when spot), each with that
resource's condition keys, plus `ec2:CreateTags` per tagged resource type (`ec2:CreateAction` = RunInstances) and
`iam:PassRole` on the instance profile's role. Every triple must be allowed (embedded.services.iam_policy.evaluate).
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
) -> list[Check]:
    """The checks of one RunInstances request (boto3's parameters). `image_owner` is the AMI's owner alias or
    account, `vpc_id` the subnet's VPC, `role_of_profile` each instance profile's role name."""
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
    checks.append(("ec2:RunInstances", f"arn:aws:ec2:{region}::image/{request['ImageId']}", {"ec2:Owner": image_owner}))
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


def terminate_checks(instances: Mapping[str, Mapping[str, str]], *, region: str, account: str) -> list[Check]:
    """TerminateInstances is authorized per instance, on its tags (`aws:ResourceTag/...`)."""
    return [
        (
            "ec2:TerminateInstances",
            f"arn:aws:ec2:{region}:{account}:instance/{instance_id}",
            {f"aws:ResourceTag/{k}": v for k, v in tags.items()},
        )
        for instance_id, tags in instances.items()
    ]
