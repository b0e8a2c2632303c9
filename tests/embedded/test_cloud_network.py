"""The embedded cloud is as strict as EC2 where the launch depends on it: images, public addresses, security groups
and the root volume."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from embedded.cloud import AMAZON_LINUX_DLAMI, UBUNTU_DLAMI, LocalCloud
from orchestrator.cloud.hostkeys import generate_host_key
from orchestrator.cloud.user_data import UserDataSpec, render_user_data
from tests.embedded.test_cloud import describe, listening, wait_until
from tests.support.sshd import make_ed25519_keypair

TAGS = [{"ResourceType": "instance", "Tags": [{"Key": "ec2-trainer:project", "Value": "ec2-trainer"}]}]


@pytest.fixture
def cloud(stack: Any) -> LocalCloud:
    return stack.cloud


def run(cloud: LocalCloud, **request: Any) -> str:
    response = cloud.client("ec2").run_instances(MinCount=1, MaxCount=1, TagSpecifications=TAGS, **request)
    return str(response["Instances"][0]["InstanceId"])


def test_images_look_like_deep_learning_amis_behind_dlami_shaped_parameters(cloud: LocalCloud) -> None:
    ec2, ssm = cloud.client("ec2"), cloud.client("ssm")
    for image in (UBUNTU_DLAMI, AMAZON_LINUX_DLAMI):
        assert image.parameter.endswith(f"/deeplearning/ami/x86_64/{image.ami_type}/latest/ami-id")
        image_id = ssm.get_parameter(Name=image.parameter)["Parameter"]["Value"]
        (described,) = ec2.describe_images(ImageIds=[image_id])["Images"]
        assert (described["RootDeviceName"], described["Architecture"]) == (image.root_device_name, "x86_64")
        assert described["Name"] == image.name
        (root,) = described["BlockDeviceMappings"]
        assert (root["DeviceName"], root["Ebs"]["VolumeSize"]) == (image.root_device_name, image.root_snapshot_gb)
        (snapshot,) = ec2.describe_snapshots(SnapshotIds=[root["Ebs"]["SnapshotId"]])["Snapshots"]
        assert snapshot["VolumeSize"] == image.root_snapshot_gb
    assert "Ubuntu 24.04" in UBUNTU_DLAMI.name and UBUNTU_DLAMI.root_device_name == "/dev/sda1"
    assert AMAZON_LINUX_DLAMI.root_device_name == "/dev/xvda"


def test_the_stacks_subnet_maps_no_public_ip_unless_the_request_asks(cloud: LocalCloud) -> None:
    assert cloud.network is not None
    ec2, network = cloud.client("ec2"), cloud.network
    (subnet,) = ec2.describe_subnets(SubnetIds=[network.subnet_id])["Subnets"]
    assert subnet["MapPublicIpOnLaunch"] is False
    defaults = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    assert subnet["VpcId"] == network.vpc_id not in [v["VpcId"] for v in defaults]
    image = cloud.images[UBUNTU_DLAMI.parameter]
    private = run(cloud, ImageId=image, SubnetId=network.subnet_id, SecurityGroupIds=[network.security_group_id])
    public = run(
        cloud,
        ImageId=image,
        NetworkInterfaces=[
            {
                "DeviceIndex": 0,
                "SubnetId": network.subnet_id,
                "Groups": [network.security_group_id],
                "AssociatePublicIpAddress": True,
                "DeleteOnTermination": True,
            }
        ],
    )
    try:
        assert "PublicIpAddress" not in describe(cloud, private)
        assert describe(cloud, public)["PublicIpAddress"].startswith("127.0.")
    finally:
        ec2.terminate_instances(InstanceIds=[private, public])


def test_ssh_never_answers_when_no_security_group_admits_it(cloud: LocalCloud) -> None:
    assert cloud.network is not None
    ec2, network = cloud.client("ec2"), cloud.network
    closed = ec2.create_security_group(GroupName=f"closed-{time.time_ns()}", Description="x", VpcId=network.vpc_id)
    client_key = make_ed25519_keypair()
    user_data = render_user_data(
        UserDataSpec(
            host_key=generate_host_key(),
            authorized_public_key=client_key.public_line,
            ssh_user=cloud.login_user,
            deadline_epoch=int(time.time()) + 3600,
            state_dir=str(cloud.disk_root / "state"),
            python_bin=sys.executable,
            require_gpu=False,
            ssh_port=cloud.ssh_port,
        )
    )
    instance_id = run(
        cloud,
        ImageId=cloud.images[UBUNTU_DLAMI.parameter],
        UserData=user_data,
        NetworkInterfaces=[
            {
                "DeviceIndex": 0,
                "SubnetId": network.subnet_id,
                "Groups": [closed["GroupId"]],
                "AssociatePublicIpAddress": True,
            }
        ],
    )
    try:
        note = f"admit no TCP {cloud.ssh_port} from 127.0.0.1: SSH not served"
        booted = wait_until("the instance to boot", lambda: cloud.instances.get(instance_id))
        wait_until("the emulator to refuse SSH", lambda: any(note in n for n in booted.notes))
        assert not listening(describe(cloud, instance_id)["PublicIpAddress"], cloud.ssh_port)
    finally:
        ec2.terminate_instances(InstanceIds=[instance_id])


def test_root_volume_rules_of_ec2(cloud: LocalCloud) -> None:
    assert cloud.network is not None
    ec2, subnet = cloud.client("ec2"), cloud.network.subnet_id
    with pytest.raises(Exception, match=r"InvalidBlockDeviceMapping.*expect size >= 75GB"):
        run(
            cloud,
            ImageId=cloud.images[UBUNTU_DLAMI.parameter],
            SubnetId=subnet,
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 50}}],
        )
    # A mapping that misses the image's root device adds a volume; the root stays as the image has it.
    instance_id = run(
        cloud,
        ImageId=cloud.images[AMAZON_LINUX_DLAMI.parameter],
        SubnetId=subnet,
        BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 100, "Encrypted": True}}],
    )
    try:
        mappings = describe(cloud, instance_id)["BlockDeviceMappings"]
        volumes = ec2.describe_volumes(VolumeIds=[m["Ebs"]["VolumeId"] for m in mappings])["Volumes"]
        by_device = {v["Attachments"][0]["Device"]: (v["Size"], v["Encrypted"]) for v in volumes}
        assert by_device == {"/dev/xvda": (AMAZON_LINUX_DLAMI.root_snapshot_gb, False), "/dev/sda1": (100, True)}
    finally:
        ec2.terminate_instances(InstanceIds=[instance_id])


def test_an_unknown_image_is_refused_as_ec2_refuses_it(cloud: LocalCloud) -> None:
    assert cloud.network is not None
    with pytest.raises(Exception, match=r"InvalidAMIID\.NotFound"):
        run(cloud, ImageId="ami-0123456789abcdef0", SubnetId=cloud.network.subnet_id)
