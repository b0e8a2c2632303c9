"""What the embedded cloud's account already has, as AWS would: Deep-Learning-AMI-like images behind AWS's public SSM
parameters, the project's own network (VPC, subnet, a security group admitting SSH from Airflow), and the dataset
bucket notifying its queue."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
from dataclasses import dataclass
from typing import Any

ACCOUNT_ID = "123456789012"  # moto's default account
# Where the stand-in images are published: AWS's own public parameters (the names the code reads by default, and
# those the policy's ssm:GetParameter is scoped to).
IMAGE_PARAMETER_PREFIX = "/aws/service"
# The address Airflow connects from: a security group must admit it for the emulator to serve SSH.
AIRFLOW_ADDRESS = ipaddress.ip_address("127.0.0.1")
# The bucket and queue of the embedded default's dataset versions (docs/operations.md, "Retrain on new data and on a
# schedule").
DATASET_BUCKET = "ec2-trainer-datasets"
DATASET_PREFIX = "hurricane-damage/"
DATASET_QUEUE = "ec2-trainer-dataset-events"


@dataclass(frozen=True)
class StandInImage:
    """An image as DescribeImages shows it; the embedded cloud registers each behind an SSM parameter."""

    ami_type: str  # the part of a Deep Learning AMI parameter that names the image
    name: str
    description: str
    root_device_name: str
    root_snapshot_gb: int

    @property
    def parameter(self) -> str:
        return f"{IMAGE_PARAMETER_PREFIX}/deeplearning/ami/x86_64/{self.ami_type}/latest/ami-id"


# Shaped like the PyTorch Deep Learning AMIs: Ubuntu's root is /dev/sda1, Amazon Linux's /dev/xvda.
UBUNTU_DLAMI = StandInImage(
    ami_type="oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04",
    name="Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.12 (Ubuntu 24.04) 20260815",
    description="Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4d, P4de, P5, P5e, P5en, P6-B200. PyTorch-2.12, "
    "Python 3.12 at /opt/pytorch/bin/python, Ubuntu 24.04",
    root_device_name="/dev/sda1",
    root_snapshot_gb=75,
)
AMAZON_LINUX_DLAMI = StandInImage(
    ami_type="oss-nvidia-driver-gpu-pytorch-2.12-amazon-linux-2023",
    name="Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.12 (Amazon Linux 2023) 20260815",
    description="Supported EC2 instances: G4dn, G5, G6, Gr6, G6e, P4d, P4de, P5, P5e, P5en, P6-B200. PyTorch-2.12, "
    "Amazon Linux 2023",
    root_device_name="/dev/xvda",
    root_snapshot_gb=65,
)
STAND_IN_IMAGES = (UBUNTU_DLAMI, AMAZON_LINUX_DLAMI)


@dataclass(frozen=True)
class StandInNetwork:
    vpc_id: str
    # One per availability zone (a, b), as a user lists them in aws.subnet_ids.
    subnet_ids: tuple[str, ...]
    security_group_id: str

    @property
    def subnet_id(self) -> str:
        """The first zone's subnet."""
        return self.subnet_ids[0]


@functools.cache
def sized_image_class() -> type[Any]:
    """moto's image with the root snapshot size EC2 reports (moto reports 15 GB for every image)."""
    from moto.ec2.models.amis import Ami

    class SizedImage(Ami):
        root_snapshot_gb = 15

        @property
        def block_device_mappings(self) -> list[dict[str, Any]]:
            ebs = {"SnapshotId": self.ebs_snapshot.id, "VolumeSize": self.root_snapshot_gb, "VolumeType": "gp3"}
            return [{"DeviceName": self.root_device_name, "Ebs": {**ebs, "DeleteOnTermination": True}}]

    return SizedImage


def register_images(region: str, images: tuple[StandInImage, ...] = STAND_IN_IMAGES) -> dict[str, str]:
    """Registers each image in moto's EC2 state with its root device and root snapshot size and publishes its id
    under its parameter; returns parameter -> image id. moto's RegisterImage takes only a name, and its PutParameter
    refuses `/aws/...` names (AWS's own), hence the backends."""
    from moto.core.utils import utcnow
    from moto.ec2.models import ec2_backends
    from moto.ec2.utils import random_ami_id
    from moto.ssm.models import Parameter, ssm_backends

    backend = ec2_backends[ACCOUNT_ID][region]
    published = {}
    for image in images:
        ami = sized_image_class()(
            backend,
            random_ami_id(),
            name=image.name,
            description=image.description,
            owner_alias="amazon",
            public=True,
            virtualization_type="hvm",
            architecture="x86_64",
            hypervisor="xen",
            root_device_type="ebs",
            root_device_name=image.root_device_name,
            region_name=f"{region}a",
        )
        ami.root_snapshot_gb = image.root_snapshot_gb
        ami.ebs_snapshot.volume.size = image.root_snapshot_gb
        backend.amis[ami.id] = ami
        ssm_backends[ACCOUNT_ID][region]._parameters[image.parameter] = [
            Parameter(  # type: ignore[abstract]  # moto's CloudFormation hooks, never called here
                account_id=ACCOUNT_ID,
                name=image.parameter,
                value=ami.id,
                parameter_type="String",
                description=None,
                allowed_pattern=None,
                keyid=None,
                last_modified_date=utcnow(),
                version=1,
                data_type="aws:ec2:image",
            )
        ]
        published[image.parameter] = ami.id
    return published


def create_dataset_bucket(s3: Any, sqs: Any) -> str:
    """The dataset bucket, notifying every object created under DATASET_PREFIX to a queue (as a production bucket
    would, though there a suffix filter on the marker spares the queue: the watcher filters either way); its URL."""
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=DATASET_BUCKET)
    queue_url = str(sqs.create_queue(QueueName=DATASET_QUEUE)["QueueUrl"])
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rules = [{"Name": "prefix", "Value": DATASET_PREFIX}]
    s3.put_bucket_notification_configuration(
        Bucket=DATASET_BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"], "Filter": {"Key": {"FilterRules": rules}}}
            ]
        },
    )
    return queue_url


def create_network(ec2: Any, region: str, ssh_port: int) -> StandInNetwork:
    """A VPC of the project's own, as a user would make it: a subnet in each of two zones, neither mapping public IPs
    (the default outside the default VPC), and a security group admitting SSH from Airflow only."""
    vpc_id = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet_ids = tuple(
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=f"10.77.{n}.0/24", AvailabilityZone=f"{region}{zone}")["Subnet"][
            "SubnetId"
        ]
        for n, zone in ((1, "a"), (2, "b"))
    )
    group_id = ec2.create_security_group(
        GroupName="ec2-trainer-instance", Description="SSH from Airflow", VpcId=vpc_id
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": ssh_port,
                "ToPort": ssh_port,
                "IpRanges": [{"CidrIp": f"{AIRFLOW_ADDRESS}/32", "Description": "Airflow"}],
            }
        ],
    )
    return StandInNetwork(vpc_id, subnet_ids, group_id)


def admits_ssh(groups: Any, port: int, source: ipaddress.IPv4Address | ipaddress.IPv6Address = AIRFLOW_ADDRESS) -> bool:
    """Whether any of these moto security groups has an inbound rule for TCP `port` from `source`."""
    for group in groups:
        for rule in group.ingress_rules:
            if rule.ip_protocol not in ("tcp", "-1"):
                continue
            if rule.ip_protocol == "tcp" and not (rule.from_port <= port <= rule.to_port):
                continue
            cidr = rule.ip_range.get("CidrIp") or rule.ip_range.get("CidrIpv6")
            if cidr and source in ipaddress.ip_network(cidr, strict=False):
                return True
    return False
