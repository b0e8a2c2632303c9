"""The least-privilege policies (config/iam/, shown in docs/iam.md) cover every AWS call the code makes, and nothing
broader.

The calls are read from the source (so a new call without a policy line fails here), and the launch request the code
builds is checked against the policy's conditions (IMDSv2, encrypted root volume, tags, instance profile).
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from embedded.services.authorizer import (
    ACTION_OF,
    Check,
    create_image_checks,
    image_resource_checks,
    run_instances_checks,
    terminate_checks,
)
from embedded.services.iam_policy import evaluate, load_policy
from orchestrator.cloud.hostkeys import generate_host_key
from orchestrator.cloud.launch_spec import LaunchAttempt, LaunchSpec, RunIdentity, build_run_instances_request
from orchestrator.cloud.quotas import QUOTA_GROUPS
from orchestrator.contracts import TAG_DEPLOYMENT, TAG_PROJECT

REPO = Path(__file__).resolve().parents[2]
# The policy's placeholder for aws.deployment, and the value the launch request below is built with.
DEPLOYMENT = "prod"


def airflow_policy() -> dict[str, Any]:
    """config/iam/airflow.json (docs/iam.md shows it), its DEPLOYMENT and PROJECT placeholders filled in as a
    deployment named DEPLOYMENT with the default project tag would."""
    policy = load_policy("airflow")
    assert '"DEPLOYMENT"' in json.dumps(policy), "the policy is not scoped to a deployment"
    filled = json.dumps(policy).replace('"DEPLOYMENT"', json.dumps(DEPLOYMENT)).replace('"PROJECT"', '"ec2-trainer"')
    return dict(json.loads(filled))


def allowed_actions(policy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_action: dict[str, list[dict[str, Any]]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            by_action.setdefault(action, []).append(statement)
    return by_action


# Methods boto3 adds to a client, and the operations they make.
INJECTED = {"s3": {"download_file": ("HeadObject", "GetObject")}}
# A client built by the code: `aws_client("s3", ...)`, `to_thread(aws_client, "sqs", ...)`, `boto3.client("s3")`.
CLIENT_BUILT = re.compile(r'(?:\baws_client(?:\(|,\s*)|\.client\()"([a-z0-9-]+)"')
ATTRIBUTE = re.compile(r'\.([a-z][a-z0-9_]*)\b(?:\(\s*"([a-z0-9_]+)")?')


def calls_in_source(root: str) -> set[str]:
    """The IAM action of every AWS call the code under `root` (dags/ or remote/) makes: the services are those whose
    clients the code builds, and the calls every attribute of a name that is one of their operations (a method
    call, a method passed to a thread, a paginator or a waiter), found through botocore's own service models."""
    import botocore.session
    from botocore import xform_name

    session = botocore.session.get_session()
    sources = {path: path.read_text() for path in sorted((REPO / root).rglob("*.py"))}
    services = {service for text in sources.values() for service in CLIENT_BUILT.findall(text)}
    assert services, f"found no AWS client built under {root}/"
    found = set()
    for service in sorted(services):
        model = session.get_service_model(service)
        operations = {xform_name(op): [op] for op in model.operation_names}
        operations.update({m: list(ops) for m, ops in INJECTED.get(service, {}).items()})
        waiters = session.get_waiter_model(service) if service == "ec2" else None
        for text in sources.values():
            for method, argument in ATTRIBUTE.findall(text):
                if method == "get_paginator" and argument in operations:
                    names = operations[argument]
                elif method == "get_waiter" and waiters and argument:
                    names = [waiters.get_waiter("".join(p.capitalize() for p in argument.split("_"))).operation]
                else:
                    names = operations.get(method, [])
                # IAM names actions by the service's signing name: service-quotas' calls are servicequotas:*.
                found |= {ACTION_OF.get(f"{model.signing_name}:{n}", f"{model.signing_name}:{n}") for n in names}
    return found


def test_every_call_the_code_makes_is_allowed() -> None:
    calls = calls_in_source("dags")
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
        "s3:ListBucket",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "servicequotas:GetServiceQuota",
    } <= calls
    missing = calls - set(allowed_actions(airflow_policy()))
    assert not missing, f"config/iam/airflow.json does not allow {sorted(missing)}"
    on_instance = calls_in_source("remote")
    assert on_instance == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    missing = on_instance - set(allowed_actions(load_policy("instance")))
    assert not missing, f"config/iam/instance.json does not allow {sorted(missing)}"


def test_data_calls_are_allowed_on_the_data_prefix_only() -> None:
    """The S3 and SQS requests the code makes, evaluated as AWS would: the listing of the data prefix (plan_launch,
    train, ec2_retrain, the poll trigger; ListObjectsV2 with Prefix), the queue's receive and delete, the instance's
    reads; nothing outside the prefix."""
    values = {
        "REGION": "eu-west-1",
        "ACCOUNT": "123456789012",
        "PROJECT": "ec2-trainer",
        "DEPLOYMENT": DEPLOYMENT,
        "BUCKET": "data",
        "PREFIX": "hurricane-damage",
        "QUEUE": "dataset-events",
        "VPC-ID": "vpc-0abc",
    }
    bucket = "arn:aws:s3:::data"
    for name in ("airflow", "instance"):
        policy = load_policy(name, values)
        for prefix in ("hurricane-damage/", "hurricane-damage/v2/"):
            assert evaluate(policy, "s3:ListBucket", bucket, {"s3:prefix": prefix}) == "Allow", (name, prefix)
        for prefix in ("", "other/", "hurricane-damage-old/"):
            assert evaluate(policy, "s3:ListBucket", bucket, {"s3:prefix": prefix}) == "ImplicitDeny", (name, prefix)
        assert evaluate(policy, "s3:ListBucket", bucket) == "ImplicitDeny", "a listing of the whole bucket"
    airflow, instance = load_policy("airflow", values), load_policy("instance", values)
    queue = "arn:aws:sqs:eu-west-1:123456789012:dataset-events"
    for action in ("sqs:ReceiveMessage", "sqs:DeleteMessage"):
        assert evaluate(airflow, action, queue) == "Allow"
        assert evaluate(airflow, action, queue + "-other") == "ImplicitDeny"
        assert evaluate(instance, action, queue) == "ImplicitDeny"
    assert evaluate(airflow, "s3:GetObject", bucket + "/hurricane-damage/a.jpg") == "ImplicitDeny", "Airflow reads none"
    assert evaluate(instance, "s3:GetObject", bucket + "/hurricane-damage/a.jpg") == "Allow"
    assert evaluate(instance, "s3:GetObject", bucket + "/other/a.jpg") == "ImplicitDeny"


def test_the_instance_writes_checkpoints_under_the_checkpoint_prefix_only() -> None:
    """The job's checkpoints (checkpoint_uri=s3://BUCKET/checkpoints/): written, read back, listed and pruned under
    `checkpoints/`; the data and the rest of the bucket stay read-only or out of reach."""
    instance, bucket = load_policy("instance", VALUES), "arn:aws:s3:::data"
    state = f"{bucket}/checkpoints/0123abcd/ckpt-000003/state.pt"
    for action in ("s3:PutObject", "s3:GetObject", "s3:DeleteObject"):
        assert evaluate(instance, action, state) == "Allow", action
        assert evaluate(instance, action, f"{bucket}/checkpoints-old/a") == "ImplicitDeny", action
    assert evaluate(instance, "s3:ListBucket", bucket, {"s3:prefix": "checkpoints/0123abcd/"}) == "Allow"
    for prefix in ("", "checkpoints-old/", "other/"):
        assert evaluate(instance, "s3:ListBucket", bucket, {"s3:prefix": prefix}) == "ImplicitDeny", prefix
    for action in ("s3:PutObject", "s3:DeleteObject"):
        assert evaluate(instance, action, f"{bucket}/hurricane-damage/train/a.jpg") == "ImplicitDeny", action
        assert evaluate(load_policy("airflow", VALUES), action, state) == "ImplicitDeny", action


def test_policy_is_least_privilege() -> None:
    actions = allowed_actions(airflow_policy())
    assert not [a for a in actions if "*" in a.split(":", 1)[1]], "no wildcard actions"
    assert "ec2:DescribeInstanceAttribute" not in actions, "the user-data holds the host private key"
    (terminate,) = actions["ec2:TerminateInstances"]
    assert terminate["Condition"]["StringEquals"] == {
        f"aws:ResourceTag/{TAG_PROJECT}": "ec2-trainer",
        f"aws:ResourceTag/{TAG_DEPLOYMENT}": DEPLOYMENT,
    }
    # Tags only at creation: of instances and volumes by RunInstances, of images and snapshots by CreateImage.
    creators = {t["Condition"]["StringEquals"]["ec2:CreateAction"] for t in actions["ec2:CreateTags"]}
    assert creators == {"RunInstances", "CreateImage"}
    (pass_role,) = actions["iam:PassRole"]
    assert "*" not in pass_role["Resource"]
    # What changes or removes an existing instance, image or snapshot is scoped to the deployment's tags.
    for action in ("ec2:StopInstances", "ec2:DeregisterImage", "ec2:DeleteSnapshot"):
        (statement,) = actions[action]
        assert statement["Condition"]["StringEquals"][f"aws:ResourceTag/{TAG_DEPLOYMENT}"] == DEPLOYMENT, action
    # CreateImage: on the deployment's instances, and its image and snapshots tagged as the deployment's.
    for statement in actions["ec2:CreateImage"]:
        required = statement["Condition"]["StringEquals"]
        assert DEPLOYMENT in (
            required.get(f"aws:ResourceTag/{TAG_DEPLOYMENT}"),
            required.get(f"aws:RequestTag/{TAG_DEPLOYMENT}"),
        )


def test_every_instance_or_volume_it_creates_or_tags_is_the_deployments() -> None:
    """Another deployment's or project's role can neither launch as this one nor tag its way into it: each statement
    carries both conditions itself (the others would hide one missing, since a launch tags instance and volume)."""
    actions = allowed_actions(airflow_policy())
    scoped = [
        s
        for s in [*actions["ec2:RunInstances"], *actions["ec2:CreateTags"]]
        if any(r.endswith((":instance/*", ":volume/*")) for r in _resources(s))
    ]
    assert len(scoped) == 3  # RunInstances on the instance and on its volume, CreateTags while launching
    for statement in scoped:
        required = statement["Condition"]["StringEquals"]
        assert required[f"aws:RequestTag/{TAG_DEPLOYMENT}"] == DEPLOYMENT, statement
        assert required[f"aws:RequestTag/{TAG_PROJECT}"] == "ec2-trainer", statement


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
        subnet_ids=("subnet-0123456789abcdef0",),
        security_group_ids=("sg-0123456789abcdef0",),
        public_ip=True,
        instance_profile="ec2-trainer-instance",
        root_volume_gb=100,
        root_device_name="/dev/sda1",
        project_tag="ec2-trainer",
    )
    identity = RunIdentity("ec2_training", "manual__1", "a" * 40, 2_000_000_000, DEPLOYMENT)
    return build_run_instances_request(
        spec,
        identity,
        "#cloud-config\n",
        LaunchAttempt("g6.xlarge", "on-demand", "subnet-0123456789abcdef0"),
        host_public_key=generate_host_key().public_line,
    )


def condition_holds(conditions: dict[str, dict[str, Any]], context: dict[str, str]) -> bool:
    """A statement's Condition block as IAM evaluates it (embedded.services.iam_policy, the stand-in's evaluator)."""
    statement = {"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": conditions}
    return evaluate({"Statement": [statement]}, "ec2:RunInstances", "*", context) == "Allow"


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


VALUES = {
    "REGION": "eu-west-1",
    "ACCOUNT": "123456789012",
    "PROJECT": "ec2-trainer",
    "DEPLOYMENT": DEPLOYMENT,
    "BUCKET": "data",
    "PREFIX": "hurricane-damage",
    "QUEUE": "dataset-events",
    "VPC-ID": "vpc-0abc",
}


def requests_of_a_run(launch_request: dict[str, Any]) -> dict[str, list[Check]]:
    """Each policy's (action, resource, condition keys) checks for the requests one run makes: the launch request the
    code builds (on-demand and spot) as EC2 authorizes it, a terminate of the run's instance by its tags, the
    preflight reads, the vCPU quotas plan_launch reads (both markets), the price, the data listing and the queue; on
    the instance, the data's listing and reads, and its checkpoints' listing, writes, reads and deletes."""
    region, account = VALUES["REGION"], VALUES["ACCOUNT"]
    spot = {**launch_request, "InstanceMarketOptions": {"MarketType": "spot"}}
    launches = [
        check
        for request in (launch_request, spot)
        for check in run_instances_checks(
            request,
            region=region,
            account=account,
            image_owner="amazon",
            vpc_id=VALUES["VPC-ID"],
            role_of_profile={"ec2-trainer-instance": "ec2-trainer-instance"},
        )
    ]
    tags = next(s["Tags"] for s in launch_request["TagSpecifications"] if s["ResourceType"] == "instance")
    terminate = terminate_checks({"i-0123": {t["Key"]: t["Value"] for t in tags}}, region=region, account=account)
    describes = [(action, "*", {}) for action in sorted(calls_in_source("dags")) if ":Describe" in action]
    bake = bake_checks(launch_request, {t["Key"]: t["Value"] for t in tags})
    parameter = tomllib.loads((REPO / "config" / "defaults.toml").read_text())["aws"]["ami_ssm_parameter"]
    bucket = f"arn:aws:s3:::{VALUES['BUCKET']}"
    listing: Check = ("s3:ListBucket", bucket, {"s3:prefix": f"{VALUES['PREFIX']}/"})
    queue = f"arn:aws:sqs:{region}:{account}:{VALUES['QUEUE']}"
    airflow: list[Check] = [
        *launches,
        *terminate,
        *describes,
        *bake,
        ("ssm:GetParameter", f"arn:aws:ssm:{region}::parameter{parameter}", {}),
        ("iam:GetInstanceProfile", f"arn:aws:iam::{account}:instance-profile/ec2-trainer-instance", {}),
        *(
            ("servicequotas:GetServiceQuota", f"arn:aws:servicequotas:{region}:{account}:ec2/{quota.code}", {})
            for group in QUOTA_GROUPS
            for quota in group.quotas.values()
        ),
        ("pricing:GetProducts", "*", {}),
        listing,
        ("sqs:ReceiveMessage", queue, {}),
        ("sqs:DeleteMessage", queue, {}),
    ]
    checkpoint = f"{bucket}/checkpoints/0123abcd/ckpt-000003/state.pt"
    instance = [
        listing,
        ("s3:GetObject", f"{bucket}/{VALUES['PREFIX']}/train/a.jpg", {}),
        ("s3:ListBucket", bucket, {"s3:prefix": "checkpoints/0123abcd/"}),
        *(("s3:" + action, checkpoint, {}) for action in ("PutObject", "GetObject", "DeleteObject")),
    ]
    return {"airflow": airflow, "instance": instance}


def create_image_request(deployment: str = DEPLOYMENT) -> dict[str, Any]:
    """The CreateImage request the bake builds (orchestrator.cloud.bake.create_image_request) for `deployment`."""
    from orchestrator.cloud.bake import create_image_request as build
    from orchestrator.config.settings import load_settings
    from orchestrator.contracts_steps import LaunchPlan

    s = load_settings(env={"TRAINER__AWS__DEPLOYMENT": deployment})
    plan = LaunchPlan("ami-0123456789abcdef0", "base", "/dev/sda1", 100, "none", "ec2_bake_image", "manual__1", True)
    return build(s, plan, "i-0123", "0" * 64, "3.17.2", 2_000_000_000.5)


def bake_checks(launch_request: dict[str, Any], instance_tags: dict[str, str]) -> list[Check]:
    """A bake's own requests: stop and image its builder, prune an image and its snapshot, record the image, and a
    training launched from it."""
    region, account = VALUES["REGION"], VALUES["ACCOUNT"]
    ours = {TAG_PROJECT: "ec2-trainer", TAG_DEPLOYMENT: DEPLOYMENT}
    parameter = f"arn:aws:ssm:{region}:{account}:parameter/ec2-trainer/{DEPLOYMENT}/baked-image"
    return [
        *terminate_checks({"i-0123": instance_tags}, region=region, account=account, action="ec2:StopInstances"),
        *create_image_checks(create_image_request(), instance_tags, region=region, account=account),
        *image_resource_checks("ec2:DeregisterImage", "image", {"ami-1": ours}, region=region),
        *image_resource_checks("ec2:DeleteSnapshot", "snapshot", {"snap-1": ours}, region=region),
        ("ssm:PutParameter", parameter, {}),
        ("ssm:GetParameter", parameter, {}),
        *run_instances_checks(
            launch_request,
            region=region,
            account=account,
            image_owner=account,
            image_tags=ours,
            vpc_id=VALUES["VPC-ID"],
            role_of_profile={"ec2-trainer-instance": "ec2-trainer-instance"},
        ),
    ]


def test_a_bake_outside_the_policy_is_denied(launch_request: dict[str, Any]) -> None:
    """Another deployment's builder, image or snapshot, an image tagged as another deployment's, another
    deployment's parameter, and a launch from an image of another account carrying our tags."""
    policy = load_policy("airflow", VALUES)
    region, account = VALUES["REGION"], VALUES["ACCOUNT"]
    theirs = {TAG_PROJECT: "ec2-trainer", TAG_DEPLOYMENT: "staging"}

    def denied(checks: list[Check]) -> bool:
        return any(evaluate(policy, *c) != "Allow" for c in checks)

    ours = {TAG_PROJECT: "ec2-trainer", TAG_DEPLOYMENT: DEPLOYMENT}
    assert not denied(create_image_checks(create_image_request(), ours, region=region, account=account))
    assert denied(terminate_checks({"i-9": theirs}, region=region, account=account, action="ec2:StopInstances"))
    assert denied(create_image_checks(create_image_request(), theirs, region=region, account=account))
    assert denied(create_image_checks(create_image_request("staging"), ours, region=region, account=account))
    untagged = {**create_image_request(), "TagSpecifications": []}
    assert denied(create_image_checks(untagged, ours, region=region, account=account))
    assert denied(image_resource_checks("ec2:DeregisterImage", "image", {"ami-9": theirs}, region=region))
    assert denied(image_resource_checks("ec2:DeleteSnapshot", "snapshot", {"snap-9": {}}, region=region))
    other = f"arn:aws:ssm:{region}:{account}:parameter/ec2-trainer/staging/baked-image"
    assert evaluate(policy, "ssm:PutParameter", other) == "ImplicitDeny"
    foreign = {"region": region, "account": account, "vpc_id": VALUES["VPC-ID"]}
    roles = {"ec2-trainer-instance": "ec2-trainer-instance"}
    assert denied(
        run_instances_checks(
            launch_request, image_owner="111122223333", image_tags=ours, role_of_profile=roles, **foreign
        )
    )


def test_a_run_is_allowed_and_every_statement_is_needed(launch_request: dict[str, Any]) -> None:
    """All of a run's requests pass each policy, and removing any one statement denies at least one of them: no
    statement is dead weight, and a test fails when one goes missing."""
    for name, checks in requests_of_a_run(launch_request).items():
        policy = load_policy(name, VALUES)
        denied = [c for c in checks if evaluate(policy, *c) != "Allow"]
        assert not denied, f"config/iam/{name}.json denies {denied}"
        for statement in policy["Statement"]:
            without = {**policy, "Statement": [s for s in policy["Statement"] if s is not statement]}
            assert any(evaluate(without, *c) != "Allow" for c in checks), f"{name}: {statement['Sid']} is unused"


def test_a_launch_outside_the_policy_is_denied(launch_request: dict[str, Any]) -> None:
    """The conditions bite: another deployment's tag, IMDSv1, an unencrypted root volume, another VPC, a non-Amazon
    image, a foreign instance to terminate."""
    policy = load_policy("airflow", VALUES)

    def denied(request: dict[str, Any], **overrides: Any) -> bool:
        options = {
            "region": VALUES["REGION"],
            "account": VALUES["ACCOUNT"],
            "image_owner": "amazon",
            "vpc_id": VALUES["VPC-ID"],
            "role_of_profile": {"ec2-trainer-instance": "ec2-trainer-instance"},
            **overrides,
        }
        return any(evaluate(policy, *c) != "Allow" for c in run_instances_checks(request, **options))

    assert not denied(launch_request)
    other = json.loads(json.dumps(launch_request).replace(f'"{DEPLOYMENT}"', '"staging"'))
    assert denied(other)
    # Another project's tag on the instance alone (its volume keeps ours) is denied.
    project = copy.deepcopy(dict(launch_request))
    for spec in project["TagSpecifications"]:
        if spec["ResourceType"] == "instance":
            spec["Tags"] = [
                {**tag, "Value": "another-project"} if tag["Key"] == "ec2-trainer:project" else tag
                for tag in spec["Tags"]
            ]
    assert project != launch_request, "the request carries no instance project tag to change"
    assert denied(project)
    assert denied({**launch_request, "MetadataOptions": {"HttpTokens": "optional"}})
    plain = json.loads(json.dumps(launch_request).replace('"Encrypted": true', '"Encrypted": false'))
    assert denied(plain)
    assert denied(launch_request, vpc_id="vpc-other")
    assert denied(launch_request, image_owner="111122223333")
    assert denied({**launch_request, "InstanceType": "p5.48xlarge"})
    foreign = terminate_checks(
        {"i-9": {TAG_PROJECT: "ec2-trainer", TAG_DEPLOYMENT: "staging"}},
        region=VALUES["REGION"],
        account=VALUES["ACCOUNT"],
    )
    assert evaluate(policy, *foreign[0]) == "ImplicitDeny"
