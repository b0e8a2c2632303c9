"""The documented least-privilege policy covers every AWS call the orchestrator makes, and nothing broader.

The calls are read from the source (so a new call without a policy line fails here), and the launch request the code
builds is checked against the policy's conditions (IMDSv2, encrypted root volume, tags, instance profile).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.hostkeys import generate_host_key
from orchestrator.launch import TAG_DEPLOYMENT, TAG_PROJECT, LaunchSpec, RunIdentity, build_run_instances_request

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "dags" / "orchestrator").glob("*.py"))
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


def calls_in_source() -> set[str]:
    """`ec2.run_instances` -> `ec2:RunInstances`, for every boto3 call the orchestrator makes."""
    found = set()
    for path in SOURCES:
        for service, method in re.findall(r"\b(ec2|ssm_client)\.([a-z_]+)\b", path.read_text()):
            if method in ("meta", "exceptions"):
                continue
            api = "".join(part.capitalize() for part in method.split("_"))
            found.add(f"{'ssm' if service == 'ssm_client' else 'ec2'}:{api}")
    return found


def test_every_call_the_code_makes_is_allowed() -> None:
    calls = calls_in_source()
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ssm:GetParameter"} <= calls
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
        instance_profile="ec2-trainer-instance",
        root_volume_gb=100,
        project_tag="ec2-trainer",
    )
    identity = RunIdentity("ec2_training", "manual__1", "a" * 40, 2_000_000_000, DEPLOYMENT)
    return build_run_instances_request(
        spec, identity, "#cloud-config\n", "g6.xlarge", "on-demand", host_public_key=generate_host_key().public_line
    )


def test_launch_request_meets_the_policy_conditions(launch_request: dict[str, Any]) -> None:
    actions = allowed_actions(airflow_policy())
    instance_rule = next(s for s in actions["ec2:RunInstances"] if s["Resource"].endswith(":instance/*"))
    conditions = instance_rule["Condition"]
    assert launch_request["MetadataOptions"]["HttpTokens"] == conditions["StringEquals"]["ec2:MetadataHttpTokens"]
    assert launch_request["IamInstanceProfile"] == {"Name": "ec2-trainer-instance"}
    assert conditions["StringEquals"]["ec2:InstanceProfile"].endswith(":instance-profile/ec2-trainer-instance")
    assert any(
        re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), launch_request["InstanceType"])
        for p in conditions["StringLike"]["ec2:InstanceType"]
    )
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
    groups = launch_request.get("SecurityGroupIds") or launch_request["NetworkInterfaces"][0]["Groups"]
    assert groups == ["sg-0123456789abcdef0"]
