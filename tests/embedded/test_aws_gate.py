"""The embedded cloud enforces the documented policies (config/iam/*.json) on every request, as AWS would: each
statement is needed by a representative request from its identity, a request outside a condition is denied, and the
denial has the service's own error code.

A new statement (or a new action in one) fails here until REQUESTS holds a representative request for its action
(STATEMENT_REQUESTS one for the statement, where another statement allows the action too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from embedded.cloud import DATASET_BUCKET, DATASET_PREFIX, UBUNTU_DLAMI, EmulatedInstance, LocalCloud
from embedded.deploy.stack import DEPLOYMENT, EmbeddedStack
from embedded.services.aws_gate import Identity
from embedded.services.iam_policy import POLICIES, policy_text
from orchestrator.config.settings import load_settings
from orchestrator.contracts import TAG_DEPLOYMENT, TAG_PROJECT
from remote.checkpoint_store import open_store

# The code each service denies with (botocore's parsed error code).
DENIAL = {
    "ec2": "UnauthorizedOperation",
    "s3": "AccessDenied",
    "sqs": "AccessDenied",
    "iam": "AccessDenied",
    "ssm": "AccessDeniedException",
    "pricing": "AccessDeniedException",
    "servicequotas": "AccessDeniedException",
}
NO_RETRIES = Config(retries={"total_max_attempts": 1})
BAKED_PARAMETER = f"/ec2-trainer/{DEPLOYMENT}/baked-image"
# A run's folder under the instance policy's fixed checkpoint prefix in the data's bucket (config/iam/instance.json).
RUN_CHECKPOINTS = "checkpoints/0123abcd/"
CHECKPOINT = f"{RUN_CHECKPOINTS}ckpt-000001/state.pt"


@dataclass(frozen=True)
class Image:
    image_id: str
    snapshot_id: str


def our_tags(deployment: str = DEPLOYMENT) -> list[dict[str, str]]:
    return [{"Key": TAG_PROJECT, "Value": "ec2-trainer"}, {"Key": TAG_DEPLOYMENT, "Value": deployment}]


def image_tag_specifications(deployment: str = DEPLOYMENT) -> list[dict[str, Any]]:
    return [{"ResourceType": kind, "Tags": our_tags(deployment)} for kind in ("image", "snapshot")]


@dataclass
class Aws:
    """Clients of the stand-in as one identity, and what a representative request needs."""

    cloud: LocalCloud
    identity: Identity
    instance_id: str  # a running instance of this deployment
    image: Image | None = None  # an image of it, tagged as this deployment's baked images are

    def client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session().client(
            service,
            endpoint_url=self.cloud.endpoint_url,
            region_name=self.cloud.region,
            aws_access_key_id=self.identity.access_key,
            aws_secret_access_key=self.identity.secret_key,
            config=NO_RETRIES,
        )

    def launch(self, **overrides: Any) -> Any:
        """The launch the code makes (a spot one, so every RunInstances statement is used), as a dry run."""
        tags = [{"Key": TAG_PROJECT, "Value": "ec2-trainer"}, {"Key": TAG_DEPLOYMENT, "Value": DEPLOYMENT}]
        network = self.cloud.network
        assert network is not None
        request = {
            "ImageId": self.cloud.images[UBUNTU_DLAMI.parameter],
            "InstanceType": "g6.xlarge",
            "MinCount": 1,
            "MaxCount": 1,
            "MetadataOptions": {"HttpTokens": "required"},
            "IamInstanceProfile": {"Name": self.cloud.instance_profile},
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 100, "Encrypted": True}}],
            "NetworkInterfaces": [
                {"DeviceIndex": 0, "SubnetId": network.subnet_id, "Groups": [network.security_group_id]}
            ],
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
            "InstanceMarketOptions": {"MarketType": "spot"},
            **overrides,
        }
        return self.client("ec2").run_instances(DryRun=True, **request)

    def create_image(self, **overrides: Any) -> Any:
        """The bake's CreateImage of a builder of this deployment (orchestrator.cloud.bake), as a dry run."""
        request = {
            "InstanceId": self.instance_id,
            "Name": "ec2-trainer-baked-probe",
            "TagSpecifications": image_tag_specifications(),
            **overrides,
        }
        return self.client("ec2").create_image(DryRun=True, **request)

    @property
    def baked(self) -> Image:
        assert self.image is not None, "the fixture makes an image of this deployment"
        return self.image


# One request per IAM action the policies allow, made as the code makes it.
REQUESTS: dict[str, Callable[[Aws], Any]] = {
    "ssm:GetParameter": lambda aws: aws.client("ssm").get_parameter(Name=UBUNTU_DLAMI.parameter),
    "ec2:DescribeInstances": lambda aws: aws.client("ec2").describe_instances(),
    "ec2:DescribeInstanceTypeOfferings": lambda aws: aws.client("ec2").describe_instance_type_offerings(),
    "ec2:DescribeInstanceTypes": lambda aws: aws.client("ec2").describe_instance_types(InstanceTypes=["t3.micro"]),
    "ec2:DescribeImages": lambda aws: aws.client("ec2").describe_images(ImageIds=list(aws.cloud.images.values())),
    "ec2:DescribeSubnets": lambda aws: aws.client("ec2").describe_subnets(),
    "ec2:DescribeSecurityGroups": lambda aws: aws.client("ec2").describe_security_groups(),
    "ec2:DescribeSpotPriceHistory": lambda aws: aws.client("ec2").describe_spot_price_history(),
    "pricing:GetProducts": lambda aws: aws.client("pricing").get_products(ServiceCode="AmazonEC2", MaxResults=1),
    "servicequotas:GetServiceQuota": lambda aws: aws.client("service-quotas").get_service_quota(
        ServiceCode="ec2", QuotaCode="L-DB2E81BA"
    ),
    "iam:GetInstanceProfile": lambda aws: aws.client("iam").get_instance_profile(
        InstanceProfileName=aws.cloud.instance_profile
    ),
    "ec2:RunInstances": Aws.launch,
    "ec2:CreateTags": Aws.launch,
    "iam:PassRole": Aws.launch,
    "ec2:TerminateInstances": lambda aws: aws.client("ec2").terminate_instances(
        InstanceIds=[aws.instance_id], DryRun=True
    ),
    "ec2:StopInstances": lambda aws: aws.client("ec2").stop_instances(InstanceIds=[aws.instance_id], DryRun=True),
    "ec2:CreateImage": Aws.create_image,
    "ec2:DeregisterImage": lambda aws: aws.client("ec2").deregister_image(ImageId=aws.baked.image_id, DryRun=True),
    "ec2:DeleteSnapshot": lambda aws: aws.client("ec2").delete_snapshot(SnapshotId=aws.baked.snapshot_id, DryRun=True),
    "ssm:PutParameter": lambda aws: aws.client("ssm").put_parameter(
        Name=BAKED_PARAMETER, Value=aws.baked.image_id, Type="String", Overwrite=True
    ),
    "s3:ListBucket": lambda aws: aws.client("s3").list_objects_v2(Bucket=DATASET_BUCKET, Prefix=DATASET_PREFIX),
    "s3:GetObject": lambda aws: aws.client("s3").get_object(Bucket=DATASET_BUCKET, Key=f"{DATASET_PREFIX}v1/probe"),
    "s3:PutObject": lambda aws: aws.client("s3").put_object(Bucket=DATASET_BUCKET, Key=CHECKPOINT, Body=b"state"),
    "s3:DeleteObject": lambda aws: aws.client("s3").delete_object(Bucket=DATASET_BUCKET, Key=CHECKPOINT),
    "sqs:ReceiveMessage": lambda aws: aws.client("sqs").receive_message(
        QueueUrl=aws.cloud.dataset_queue_url, WaitTimeSeconds=0
    ),
    "sqs:DeleteMessage": lambda aws: aws.client("sqs").delete_message(
        QueueUrl=aws.cloud.dataset_queue_url, ReceiptHandle="no-such-receipt"
    ),
}


# (statement, action) -> a request only that statement allows, where REQUESTS' one is allowed by another statement.
STATEMENT_REQUESTS: dict[tuple[str, str], Callable[[Aws], Any]] = {
    ("ReadAndRecordTheBakedImage", "ssm:GetParameter"): lambda aws: aws.client("ssm").get_parameter(
        Name=BAKED_PARAMETER
    ),
    ("RunFromOurBakedImages", "ec2:RunInstances"): lambda aws: aws.launch(ImageId=aws.baked.image_id),
    ("TagImagesOnlyWhileCreating", "ec2:CreateTags"): Aws.create_image,
    ("ListTheCheckpoints", "s3:ListBucket"): lambda aws: aws.client("s3").list_objects_v2(
        Bucket=DATASET_BUCKET, Prefix=RUN_CHECKPOINTS
    ),
    ("WriteReadAndPruneTheCheckpoints", "s3:GetObject"): lambda aws: aws.client("s3").get_object(
        Bucket=DATASET_BUCKET, Key=CHECKPOINT
    ),
}


def request_of(sid: str, action: str) -> Callable[[Aws], Any]:
    return STATEMENT_REQUESTS.get((sid, action)) or REQUESTS[action]


def statements() -> list[tuple[str, str, list[str]]]:
    found = []
    for name in POLICIES:
        for statement in json.loads(policy_text(name))["Statement"]:
            actions = statement["Action"]
            found.append((name, statement["Sid"], actions if isinstance(actions, list) else [actions]))
    return found


def error_code(call: Callable[[], Any]) -> str | None:
    """The error code the stand-in answered with; None when it succeeded."""
    try:
        call()
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return None


def identity_of(cloud: LocalCloud, policy: str) -> Identity:
    return {"airflow": cloud.airflow, "instance": cloud.instance_role}[policy]


@pytest.fixture(scope="module")
def instance(stack: EmbeddedStack) -> Iterator[tuple[str, str]]:
    """Two instances, one of this deployment and one of another (launched by the admin, without user-data: the
    emulator boots nothing on them)."""
    ec2 = stack.cloud.client("ec2")

    def launch(deployment: str) -> str:
        tags = [{"Key": TAG_PROJECT, "Value": "ec2-trainer"}, {"Key": TAG_DEPLOYMENT, "Value": deployment}]
        reservation = ec2.run_instances(
            ImageId=stack.cloud.images[UBUNTU_DLAMI.parameter],
            InstanceType="g6.xlarge",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        return str(reservation["Instances"][0]["InstanceId"])

    ours, theirs = launch(DEPLOYMENT), launch("other")
    yield ours, theirs
    ec2.terminate_instances(InstanceIds=[ours, theirs])


@pytest.fixture(scope="module")
def images(stack: EmbeddedStack, instance: tuple[str, str]) -> Iterator[tuple[Image, Image]]:
    """An image of each instance, tagged (with its snapshot) as its deployment's baked images are; the parameter the
    representative PutParameter writes is removed afterwards (no bake made it)."""
    ec2 = stack.cloud.client("ec2")

    def image_of(instance_id: str, deployment: str) -> Image:
        image_id = ec2.create_image(
            InstanceId=instance_id, Name=f"probe-{deployment}", TagSpecifications=image_tag_specifications(deployment)
        )["ImageId"]
        (made,) = ec2.describe_images(ImageIds=[image_id])["Images"]
        return Image(image_id, made["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"])

    made = image_of(instance[0], DEPLOYMENT), image_of(instance[1], "other")
    yield made
    stack.cloud.client("ssm").delete_parameters(Names=[BAKED_PARAMETER])
    for image in made:
        ec2.deregister_image(ImageId=image.image_id)
        ec2.delete_snapshot(SnapshotId=image.snapshot_id)


def as_identity(stack: EmbeddedStack, instance: tuple[str, str], policy: str, image: Image | None = None) -> Aws:
    return Aws(stack.cloud, identity_of(stack.cloud, policy), instance[0], image)


@pytest.mark.parametrize(("policy", "sid", "actions"), statements(), ids=[f"{p}:{s}" for p, s, _ in statements()])
def test_each_statement_is_enforced(
    stack: EmbeddedStack,
    instance: tuple[str, str],
    images: tuple[Image, Image],
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    sid: str,
    actions: list[str],
) -> None:
    """The policy allows the representative request of each of the statement's actions; without the statement, the
    stand-in denies it with the service's error code."""
    aws = as_identity(stack, instance, policy, images[0])
    missing = [a for a in actions if a not in REQUESTS]
    assert not missing, f"add a representative request for {missing} (config/iam/{policy}.json, {sid}) to REQUESTS"
    for action in actions:
        code = error_code(lambda: request_of(sid, action)(aws))  # noqa: B023 - called at once
        assert code not in DENIAL.values(), f"{policy} policy denies its own {action}: {code}"
    full = stack.cloud.policy

    def without(name: str) -> dict[str, Any]:
        document = full(name)
        if name == policy:
            document["Statement"] = [s for s in document["Statement"] if s.get("Sid") != sid]
        return document

    monkeypatch.setattr(stack.cloud.gate, "policy_of", without)
    for action in actions:
        code = error_code(lambda: request_of(sid, action)(aws))  # noqa: B023 - called at once
        # EC2 authorizes iam:PassRole and ec2:CreateTags inside RunInstances and CreateImage, and denies them as EC2.
        inside_ec2 = request_of(sid, action) in (Aws.launch, Aws.create_image)
        service = "ec2" if inside_ec2 else action.split(":")[0]
        assert code == DENIAL[service], f"without {sid}, {action} answered {code}"


def test_a_request_outside_a_condition_is_denied(stack: EmbeddedStack, instance: tuple[str, str]) -> None:
    cloud = stack.cloud
    airflow, on_instance = as_identity(stack, instance, "airflow"), as_identity(stack, instance, "instance")
    assert error_code(airflow.launch) == "DryRunOperation"
    # Another deployment's tags, IMDSv1, a type outside the GPU families, an unencrypted root volume.
    other_tags = [{"Key": TAG_PROJECT, "Value": "ec2-trainer"}, {"Key": TAG_DEPLOYMENT, "Value": "other"}]
    for overrides in (
        {"TagSpecifications": [{"ResourceType": k, "Tags": other_tags} for k in ("instance", "volume")]},
        {"MetadataOptions": {"HttpTokens": "optional"}},
        {"InstanceType": "p5.48xlarge"},
        {"BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 100, "Encrypted": False}}]},
        {"IamInstanceProfile": {"Name": "admin"}},
    ):
        assert error_code(lambda: airflow.launch(**overrides)) == "UnauthorizedOperation", overrides  # noqa: B023
    # A subnet of another VPC.
    ec2 = cloud.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.78.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.78.1.0/24")["Subnet"]["SubnetId"]
    assert cloud.network is not None
    interface = {"DeviceIndex": 0, "SubnetId": subnet, "Groups": [cloud.network.security_group_id]}
    assert error_code(lambda: airflow.launch(NetworkInterfaces=[interface])) == "UnauthorizedOperation"
    # Another deployment's instance.
    other = instance[1]
    terminate = airflow.client("ec2").terminate_instances
    assert error_code(lambda: terminate(InstanceIds=[other], DryRun=True)) == "UnauthorizedOperation"
    assert error_code(lambda: terminate(InstanceIds=[instance[0], other], DryRun=True)) == "UnauthorizedOperation"
    # Outside the dataset prefix, and the whole bucket.
    for aws in (airflow, on_instance):
        s3 = aws.client("s3")
        for prefix in ("other/", "hurricane-damage-old/"):
            assert error_code(lambda: s3.list_objects_v2(Bucket=DATASET_BUCKET, Prefix=prefix)) == "AccessDenied"  # noqa: B023
        assert error_code(lambda: s3.list_objects_v2(Bucket=DATASET_BUCKET)) == "AccessDenied"  # noqa: B023
    s3 = on_instance.client("s3")
    assert error_code(lambda: s3.get_object(Bucket=DATASET_BUCKET, Key="other/a.jpg")) == "AccessDenied"
    # The instance writes and deletes under the checkpoint prefix only: never the data, nor a look-alike prefix.
    for key in (f"{DATASET_PREFIX}v1/probe", "checkpoints-old/a", "other/checkpoints/a"):
        assert error_code(lambda: s3.put_object(Bucket=DATASET_BUCKET, Key=key, Body=b"x")) == "AccessDenied", key  # noqa: B023
        assert error_code(lambda: s3.delete_object(Bucket=DATASET_BUCKET, Key=key)) == "AccessDenied", key  # noqa: B023
    # A copy reads another object as well: the gate derives no such request and denies it.
    source = {"Bucket": DATASET_BUCKET, "Key": f"{DATASET_PREFIX}v1/probe"}
    copy = s3.copy_object
    assert error_code(lambda: copy(Bucket=DATASET_BUCKET, Key=CHECKPOINT, CopySource=source)) == "AccessDenied"
    ssm = airflow.client("ssm")
    assert error_code(lambda: ssm.get_parameter(Name="/aws/service/other")) == "AccessDeniedException"


def test_each_identity_has_its_own_policy_and_the_gate_fails_closed(
    stack: EmbeddedStack, instance: tuple[str, str]
) -> None:
    cloud = stack.cloud
    airflow, on_instance = as_identity(stack, instance, "airflow"), as_identity(stack, instance, "instance")
    # The instance's role launches nothing, reads no parameter, no queue.
    assert error_code(on_instance.launch) == "UnauthorizedOperation"
    assert error_code(lambda: REQUESTS["ssm:GetParameter"](on_instance)) == "AccessDeniedException"
    assert error_code(lambda: REQUESTS["sqs:ReceiveMessage"](on_instance)) == "AccessDenied"
    # Airflow reads no data object (the instance does).
    assert error_code(lambda: REQUESTS["s3:GetObject"](airflow)) == "AccessDenied"
    # Requests the gate derives no resources for are denied, not waved through.
    reboot = airflow.client("ec2").reboot_instances
    assert error_code(lambda: reboot(InstanceIds=[instance[0]], DryRun=True)) == "UnauthorizedOperation"
    put = airflow.client("s3").put_object
    assert error_code(lambda: put(Bucket=DATASET_BUCKET, Key=f"{DATASET_PREFIX}x", Body=b"")) == "AccessDenied"
    # A key the cloud does not know is refused; the admin is not checked.
    unknown = Aws(cloud, Identity.new("stranger", "airflow"), instance[0])
    assert error_code(lambda: REQUESTS["ec2:DescribeInstances"](unknown)) == "AuthFailure"
    admin = Aws(cloud, cloud.admin, instance[0])
    assert error_code(lambda: admin.client("ec2").reboot_instances(InstanceIds=[instance[0]], DryRun=True)) == (
        "DryRunOperation"
    )


def test_the_jobs_checkpoints_beside_s3_data_pass_the_gate_with_the_instances_credentials(
    stack: EmbeddedStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's own S3 store (remote/checkpoint_store.py) in the AWS environment an emulated instance's job inherits
    from its SSH session (its profile's credentials, as it reads S3 data with), at the place the settings' default
    puts checkpoints of S3 data: one run's checkpoints are written, listed, read and pruned."""
    profiled = EmulatedInstance("i-1", "127.0.0.3", tmp_path, tmp_path, has_instance_profile=True)
    for word in stack.cloud.cloud_init.aws_env(profiled).split():
        name, _, value = word.partition("=")
        monkeypatch.setenv(name, value)
    data = f"s3://{DATASET_BUCKET}/{DATASET_PREFIX}v1/"
    uri = load_settings({"data_uri": data}, env={"TRAINER__AWS__DEPLOYMENT": DEPLOYMENT}).checkpoint_uri
    store = open_store(uri, RUN_CHECKPOINTS.split("/")[1])
    assert store.location == f"s3://{DATASET_BUCKET}/{RUN_CHECKPOINTS}"
    key = CHECKPOINT.removeprefix(RUN_CHECKPOINTS)
    store.put(key, b"state")
    assert (store.keys(), store.get(key)) == ([key], b"state")
    store.delete(key)
    assert store.keys() == []


def test_a_bake_outside_its_deployment_is_denied(
    stack: EmbeddedStack, instance: tuple[str, str], images: tuple[Image, Image]
) -> None:
    """Another deployment's builder to stop or image, an image tagged as another's, untagged, or its image and
    snapshot to prune, another deployment's parameter, a launch from another deployment's image."""
    airflow = as_identity(stack, instance, "airflow", images[0])
    ec2, theirs = airflow.client("ec2"), images[1]
    assert error_code(airflow.create_image) == "DryRunOperation"
    denied = "UnauthorizedOperation"
    assert error_code(lambda: ec2.stop_instances(InstanceIds=[instance[1]], DryRun=True)) == denied
    assert error_code(lambda: airflow.create_image(InstanceId=instance[1])) == denied
    assert error_code(lambda: airflow.create_image(TagSpecifications=image_tag_specifications("other"))) == denied
    assert error_code(lambda: airflow.create_image(TagSpecifications=[])) == denied
    assert error_code(lambda: ec2.deregister_image(ImageId=theirs.image_id, DryRun=True)) == denied
    assert error_code(lambda: ec2.delete_snapshot(SnapshotId=theirs.snapshot_id, DryRun=True)) == denied
    assert error_code(lambda: airflow.launch(ImageId=theirs.image_id)) == denied
    ssm = airflow.client("ssm")
    other = "/ec2-trainer/other/baked-image"
    assert error_code(lambda: ssm.put_parameter(Name=other, Value="x", Type="String")) == "AccessDeniedException"
