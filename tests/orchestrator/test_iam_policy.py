"""The documented least-privilege policy covers every AWS call the orchestrator makes, and nothing broader.

The calls are read from the source (so a new call without a policy line fails here), and the launch request the code
builds is checked against the policy's conditions (IMDSv2, encrypted root volume, tags, instance profile).
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.hostkeys import generate_host_key
from orchestrator.launch import TAG_DEPLOYMENT, TAG_PROJECT, LaunchSpec, RunIdentity, build_run_instances_request

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "dags" / "orchestrator").rglob("*.py"))
# The policy's placeholder for aws.deployment, and the value the launch request below is built with.
DEPLOYMENT = "prod"


def airflow_policy() -> dict[str, Any]:
    """The documented policy, with its DEPLOYMENT placeholder filled in as a deployment named DEPLOYMENT would."""
    text = (REPO / "docs" / "iam.md").read_text()
    section = text.split("## Airflow's policy", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block, "docs/iam.md has no JSON policy under 'Airflow's policy'"
    assert '"DEPLOYMENT"' in block.group(1), "the policy is not scoped to a deployment"
    return dict(json.loads(block.group(1).replace('"DEPLOYMENT"', json.dumps(DEPLOYMENT))))


def allowed_actions(policy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_action: dict[str, list[dict[str, Any]]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            by_action.setdefault(action, []).append(statement)
    return by_action


CLIENTS = {"ec2": "ec2", "ssm_client": "ssm", "iam": "iam", "pricing": "pricing"}
# The API calls behind each boto waiter the code uses.
WAITERS = {"instance_running": "describe_instances", "instance_terminated": "describe_instances"}


def calls_in_source() -> set[str]:
    """`ec2.run_instances` -> `ec2:RunInstances`, for every boto3 call the orchestrator makes, paginated and waited
    ones included (`ec2.get_paginator("describe_instances")`, `ec2.get_waiter("instance_running")`)."""
    found = set()
    for path in SOURCES:
        calls = re.findall(r'(?<![/\w])(ec2|ssm_client|iam|pricing)\.([a-z_]+)\((?:\s*"([a-z_]+)")?', path.read_text())
        for client, method, argument in calls:
            if method in ("meta", "exceptions"):
                continue
            api_method = {"get_paginator": argument, "get_waiter": WAITERS.get(argument, "")}.get(method, method)
            api = "".join(part.capitalize() for part in api_method.split("_"))
            found.add(f"{CLIENTS[client]}:{api}")
    return found


def test_every_call_the_code_makes_is_allowed() -> None:
    calls = calls_in_source()
    assert {
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ec2:DescribeInstances",
        "ssm:GetParameter",
        "ec2:DescribeImages",
        "ec2:DescribeSubnets",
        "ec2:DescribeSecurityGroups",
        "iam:GetInstanceProfile",
        "pricing:GetProducts",
        "ec2:DescribeSpotPriceHistory",
    } <= calls
    missing = calls - set(allowed_actions(airflow_policy()))
    assert not missing, f"docs/iam.md does not allow {sorted(missing)}"


def test_policy_is_least_privilege() -> None:
    actions = allowed_actions(airflow_policy())
    assert not [a for a in actions if "*" in a.split(":", 1)[1]], "no wildcard actions"
    assert "ec2:DescribeInstanceAttribute" not in actions, "the user-data holds the host private key"
    (terminate,) = actions["ec2:TerminateInstances"]
    assert terminate["Condition"]["StringEquals"] == {
        f"aws:ResourceTag/{TAG_PROJECT}": "ec2-trainer",
        f"aws:ResourceTag/{TAG_DEPLOYMENT}": DEPLOYMENT,
    }
    (tagging,) = actions["ec2:CreateTags"]
    assert tagging["Condition"]["StringEquals"]["ec2:CreateAction"] == "RunInstances"
    (pass_role,) = actions["iam:PassRole"]
    assert "*" not in pass_role["Resource"]


def test_every_instance_or_volume_it_creates_or_tags_is_the_deployments() -> None:
    """Another deployment's role (another DEPLOYMENT) can neither launch as this one nor tag its way into it."""
    actions = allowed_actions(airflow_policy())
    scoped = [
        s
        for s in [*actions["ec2:RunInstances"], *actions["ec2:CreateTags"]]
        if any(r.endswith((":instance/*", ":volume/*")) for r in _resources(s))
    ]
    assert len(scoped) == 3  # RunInstances on the instance and on its volume, CreateTags while launching
    for statement in scoped:
        assert statement["Condition"]["StringEquals"][f"aws:RequestTag/{TAG_DEPLOYMENT}"] == DEPLOYMENT, statement


def _resources(statement: dict[str, Any]) -> list[str]:
    resource = statement["Resource"]
    return resource if isinstance(resource, list) else [resource]


@pytest.fixture
def launch_request() -> dict[str, Any]:
    spec = LaunchSpec(
        ami_id="ami-0123456789abcdef0",
        instance_types=("g6.xlarge",),
        spot=False,
        spot_fallback_to_on_demand=True,
        subnet_id="subnet-0123456789abcdef0",
        security_group_ids=("sg-0123456789abcdef0",),
        public_ip=True,
        instance_profile="ec2-trainer-instance",
        root_volume_gb=100,
        root_device_name="/dev/sda1",
        project_tag="ec2-trainer",
    )
    identity = RunIdentity("ec2_training", "manual__1", "a" * 40, 2_000_000_000, DEPLOYMENT)
    return build_run_instances_request(
        spec, identity, "#cloud-config\n", "g6.xlarge", "on-demand", host_public_key=generate_host_key().public_line
    )


def condition_holds(conditions: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    """IAM's evaluation of a statement's Condition block for the operators the policy uses: a key missing from the
    request fails its test unless the operator ends in IfExists."""
    for operator, tests in conditions.items():
        kind = operator.removesuffix("IfExists")
        for key, expected in tests.items():
            allowed = [str(v) for v in (expected if isinstance(expected, list) else [expected])]
            if key not in context:
                if operator.endswith("IfExists"):
                    continue
                return False
            value = context[key]
            if kind in ("StringEquals", "ArnEquals"):
                ok = value in allowed
            elif kind in ("StringLike", "ArnLike"):
                ok = any(fnmatch.fnmatchcase(value, pattern) for pattern in allowed)
            elif kind == "Bool":
                ok = value.lower() in [a.lower() for a in allowed]
            else:
                raise AssertionError(f"this test does not evaluate {operator}: extend condition_holds")
            if not ok:
                return False
    return True


def instance_context(request: dict[str, Any]) -> dict[str, str]:
    """The condition keys RunInstances presents for the instance resource, from the request the code builds."""
    tags = next(s["Tags"] for s in request["TagSpecifications"] if s["ResourceType"] == "instance")
    context = {f"aws:RequestTag/{t['Key']}": t["Value"] for t in tags}
    context["ec2:MetadataHttpTokens"] = request["MetadataOptions"]["HttpTokens"]
    context["ec2:InstanceType"] = request["InstanceType"]
    profile = request.get("IamInstanceProfile")
    if profile:
        context["ec2:InstanceProfile"] = (
            profile.get("Arn") or f"arn:aws:iam::ACCOUNT:instance-profile/{profile['Name']}"
        )
    return context


def instance_rule() -> dict[str, Any]:
    return next(
        s for s in allowed_actions(airflow_policy())["ec2:RunInstances"] if s["Resource"].endswith(":instance/*")
    )


def test_launch_with_without_or_with_another_instance_profile(launch_request: dict[str, Any]) -> None:
    """README and docs/iam.md say an empty aws.instance_profile launches with none: the policy must allow that too."""
    conditions = instance_rule()["Condition"]
    assert condition_holds(conditions, instance_context(launch_request))
    without = {k: v for k, v in launch_request.items() if k != "IamInstanceProfile"}
    assert condition_holds(conditions, instance_context(without)), "a launch with no instance profile is denied"
    other = {**launch_request, "IamInstanceProfile": {"Name": "admin"}}
    assert not condition_holds(conditions, instance_context(other)), "a launch with another profile is allowed"


def test_network_statements_cover_every_zone_of_the_vpc_and_spot() -> None:
    statements = allowed_actions(airflow_policy())["ec2:RunInstances"]
    network = next(s for s in statements if isinstance(s["Resource"], list))
    assert sorted(r.rsplit(":", 1)[1] for r in network["Resource"]) == [
        "network-interface/*",
        "security-group/*",
        "subnet/*",
    ]
    assert set(network["Condition"]["ArnEquals"]) == {"ec2:Vpc"}
    assert any(
        s["Resource"].endswith(":spot-instances-request/*") for s in statements if isinstance(s["Resource"], str)
    )
    (profile_check,) = allowed_actions(airflow_policy())["iam:GetInstanceProfile"]
    assert profile_check["Resource"].endswith(":instance-profile/ec2-trainer-instance")


def test_launch_request_meets_the_policy_conditions(launch_request: dict[str, Any]) -> None:
    actions = allowed_actions(airflow_policy())
    assert condition_holds(instance_rule()["Condition"], instance_context(launch_request))
    assert launch_request["IamInstanceProfile"] == {"Name": "ec2-trainer-instance"}
    volume_rule = next(s for s in actions["ec2:RunInstances"] if s["Resource"] == "arn:aws:ec2:REGION:ACCOUNT:volume/*")
    (root,) = launch_request["BlockDeviceMappings"]
    volume_tags = next(s["Tags"] for s in launch_request["TagSpecifications"] if s["ResourceType"] == "volume")
    volume_context = {f"aws:RequestTag/{t['Key']}": t["Value"] for t in volume_tags}
    assert condition_holds(volume_rule["Condition"], {**volume_context, "ec2:Encrypted": str(root["Ebs"]["Encrypted"])})
    tagged = {
        spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]}
        for spec in launch_request["TagSpecifications"]
    }
    # Every tag a RunInstances or CreateTags rule requires is in the request, on the instance and on the volume.
    required = {
        key.split("/", 1)[1]: value
        for s in [*actions["ec2:RunInstances"], *actions["ec2:CreateTags"]]
        for key, value in s.get("Condition", {}).get("StringEquals", {}).items()
        if key.startswith("aws:RequestTag/")
    }
    assert required == {TAG_PROJECT: "ec2-trainer", TAG_DEPLOYMENT: DEPLOYMENT}
    assert required.items() <= tagged["instance"].items()
    assert required.items() <= tagged["volume"].items()
    (root,) = launch_request["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
    assert launch_request["InstanceInitiatedShutdownBehavior"] == "terminate"
    # No SSH key pair and nothing but the configured network: access is by the pinned keys in user-data only.
    assert "KeyName" not in launch_request
    assert "SecurityGroupIds" not in launch_request and "SubnetId" not in launch_request
    (interface,) = launch_request["NetworkInterfaces"]
    assert (interface["SubnetId"], interface["Groups"]) == ("subnet-0123456789abcdef0", ["sg-0123456789abcdef0"])
