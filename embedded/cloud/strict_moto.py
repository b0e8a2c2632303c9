"""moto patched where the code depends on EC2's own behaviour; each `install_*` returns the function that undoes it."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

from embedded.cloud.seed import sized_image_class
from embedded.cloud.service_quotas import install_service_quotas


def install_strict_ec2() -> Callable[[], None]:
    """Makes moto's EC2 behave as EC2 does where the launch depends on it; returns a function that undoes it.

    RunInstances: EC2 refuses an unknown image (InvalidAMIID.NotFound) and a root override smaller than the image's
    root snapshot (InvalidBlockDeviceMapping); a mapping that misses the image's root device leaves the root as the
    image has it (moto would leave no root at all). CreateImage: only of a running or stopped instance; the image is
    EBS-backed, with the source image's root device and a root snapshot the size of the instance's root volume, which
    gets the request's snapshot tags (moto: instance store, 15 GB, NotImplementedError for snapshot tags).
    TerminateInstances on a terminated instance changes nothing (moto deletes its network interface again and fails
    with InvalidNetworkInterfaceID.NotFound). Service Quotas answers EC2's G and VT instance quotas
    (embedded.cloud.service_quotas); SSM checks a parameter's type (install_strict_ssm)."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.amis import AmiBackend
    from moto.ec2.models.instances import Instance, InstanceBackend

    original = InstanceBackend.run_instances
    original_terminate = Instance.terminate
    original_create_image = AmiBackend.create_image

    def create_image(backend: Any, instance_id: str, name: str, description: str, tag_specifications: Any) -> Any:
        instance = backend.get_instance(instance_id)
        if instance.state not in ("running", "stopped"):
            raise EC2ClientError(
                "IncorrectInstanceState", f"The instance '{instance_id}' is not in a state from which it can be imaged."
            )
        snapshot_tags = {
            t["Key"]: t["Value"]
            for spec in tag_specifications
            if spec["ResourceType"] == "snapshot"
            for t in spec["Tags"]
        }
        image_specs = [spec for spec in tag_specifications if spec["ResourceType"] != "snapshot"]
        image: Any = original_create_image(backend, instance_id, name, description, image_specs)
        source = backend.amis.get(instance.image_id)
        image.__class__ = sized_image_class()
        image.root_device_name = source.root_device_name if source is not None else "/dev/sda1"
        image.root_device_type = "ebs"  # an image of an EBS-backed instance is EBS-backed (moto: instance store)
        root = instance.block_device_mapping.get(image.root_device_name)
        image.root_snapshot_gb = image.ebs_snapshot.volume.size = (
            int(root.size) if root is not None and root.size else 15
        )
        if snapshot_tags:
            backend.create_tags([image.ebs_snapshot.id], snapshot_tags)
        return image

    def terminate(instance: Any) -> Any:
        if instance.state == "terminated":
            return copy.copy(instance._state)
        return original_terminate(instance)

    def run_instances(backend: Any, image_id: str, *args: Any, **kwargs: Any) -> Any:
        mappings = kwargs.get("block_device_mappings")
        # EC2 refuses an image it does not know (InvalidAMIID.NotFound); moto would launch it.
        (image,) = backend.describe_images(ami_ids=[image_id])
        if mappings:
            (root,) = image.block_device_mappings
            snapshot_gb = int(root["Ebs"]["VolumeSize"])
            overrides = [m for m in mappings if m.get("DeviceName") == image.root_device_name]
            for mapping in overrides:
                size = (mapping.get("Ebs") or {}).get("VolumeSize")
                if size is not None and int(size) < snapshot_gb:
                    raise EC2ClientError(
                        "InvalidBlockDeviceMapping",
                        f"Volume of size {size}GB is smaller than snapshot '{root['Ebs']['SnapshotId']}', "
                        f"expect size >= {snapshot_gb}GB",
                    )
            if not overrides:
                ebs = {"VolumeSize": snapshot_gb, "VolumeType": "gp3", "DeleteOnTermination": True, "Encrypted": False}
                kwargs["block_device_mappings"] = [{"DeviceName": image.root_device_name, "Ebs": ebs}, *mappings]
        return original(backend, image_id, *args, **kwargs)

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign,assignment]
    Instance.terminate = terminate  # type: ignore[method-assign,assignment]
    AmiBackend.create_image = create_image  # type: ignore[method-assign,assignment]
    uninstall_quotas = install_service_quotas()
    uninstall_ssm = install_strict_ssm()

    def uninstall() -> None:
        InstanceBackend.run_instances = original  # type: ignore[method-assign]
        Instance.terminate = original_terminate  # type: ignore[method-assign]
        AmiBackend.create_image = original_create_image  # type: ignore[method-assign]
        uninstall_quotas()
        uninstall_ssm()

    return uninstall


def install_strict_ssm() -> Callable[[], None]:
    """PutParameter checks Type as SSM does, with Overwrite too (moto checks it only without, and then lets a new
    parameter have none): the baked image's parameter is written with Overwrite."""
    from moto.ssm.exceptions import ValidationException
    from moto.ssm.models import SimpleSystemManagerBackend, _valid_parameter_type

    original = SimpleSystemManagerBackend.put_parameter

    def put_parameter(
        backend: Any, name: str, description: str, value: str, parameter_type: str, *args: Any, **kwargs: Any
    ) -> Any:
        if parameter_type and not _valid_parameter_type(parameter_type):
            raise ValidationException(
                f"1 validation error detected: Value '{parameter_type}' at 'type' failed to satisfy constraint: "
                "Member must satisfy enum value set: [SecureString, StringList, String]"
            )
        if not parameter_type and not backend._parameters.get(name):
            raise ValidationException("A parameter type is required when you create a parameter.")
        return original(backend, name, description, value, parameter_type, *args, **kwargs)

    SimpleSystemManagerBackend.put_parameter = put_parameter  # type: ignore[method-assign,assignment]

    def uninstall() -> None:
        SimpleSystemManagerBackend.put_parameter = original  # type: ignore[method-assign]

    return uninstall


def install_address_plan(tag_key: str, addresses: Iterator[str], planned: dict[str, str]) -> Callable[[], None]:
    """Gives each instance tagged `tag_key` (only the instances the cloud emulates) its loopback "public IP" inside
    RunInstances, as EC2 does: an instance is never seen running without its address (assigning it later, on the
    emulator's tick, raced a fast describe).

    moto lists an instance before its RunInstances has returned, so the emulator boots only instances entered in
    `planned` (instance id -> address), here, after their address is set (booting one earlier put its sshd on moto's
    own address)."""
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances
    lock = threading.Lock()  # RunInstances may be served by several threads

    def run_instances(backend: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original(backend, *args, **kwargs)
        with lock:
            for instance in reservation.instances:
                if any(t["key"] == tag_key for t in instance.get_tags()):
                    planned[instance.id] = address = next(addresses)
                    # Reachable only through a public IP, and only when EC2 gave it one (the subnet maps public
                    # IPs, or the request asked for one): sshd still listens, at an address nobody is told.
                    if instance.nics[0].public_ip:
                        instance.nics[0].public_ip = address
        return reservation

    InstanceBackend.run_instances = run_instances  # type: ignore[method-assign,assignment]

    def uninstall() -> None:
        InstanceBackend.run_instances = original  # type: ignore[method-assign]

    return uninstall
