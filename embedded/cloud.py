"""The embedded default's cloud: a moto server as AWS, and an emulator that boots each launched instance on loopback.

The orchestrator talks to the moto server exactly as it talks to AWS (through the aws connection's endpoint_url). The
emulator plays the hypervisor and cloud-init for the instances it launches:
- it gives each instance its own loopback address (127.0.x.y) as its public IP, which the orchestrator connects to,
  when EC2 would give it a public IP at all (the subnet maps public IPs, or the request asks for one), and serves
  SSH there only when one of its security groups admits TCP ssh_port from 127.0.0.1 (Airflow's address here);
- it reads the instance's user-data and applies the parts cloud-init would: the pinned host key (`ssh_keys`), the
  authorized keys, `write_files`, and `runcmd` in order (watchdog, bootstrap);
- it serves SSH with a real OpenSSH sshd bound to that address, with the host key from the user-data;
- a `shutdown` run on the instance powers it off, honouring InstanceInitiatedShutdownBehavior (terminate or stop);
- when the instance is stopped or terminated, every process of the instance (sshd, sessions, detached jobs, watchdog)
  is killed, as powering off a VM would;
- when run as root, each instance has its own disk: a private mount namespace in which the emulated disk folder is
  its own directory, so instances running at the same time never see each other's files (as separate VMs would).
Nothing of this is visible to the orchestrator except through the EC2 and SSH APIs, so the same code paths run as in
production.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embedded.process import free_port
from embedded.sshd import LoopbackSshd

log = logging.getLogger(__name__)

ACCOUNT_ID = "123456789012"  # moto's default account
# Where the SSM parameters of the stand-in images live: `/aws/service/...` cannot be written in moto, so the same
# shape under another prefix (set aws.ami_ssm_parameter to one of them).
IMAGE_PARAMETER_PREFIX = "/ec2-trainer/embedded"
# The address Airflow connects from: a security group must admit it for the emulator to serve SSH.
AIRFLOW_ADDRESS = ipaddress.ip_address("127.0.0.1")
INSTANCE_MARKER_ENV = "EC2_TRAINER_EMULATED_INSTANCE"
_LIVE = ("pending", "running")
_OFF = ("shutting-down", "terminated", "stopping", "stopped")
_RUNNING: LocalCloud | None = None


@dataclass
class EmulatedInstance:
    instance_id: str
    address: str
    root: Path
    # Where the instance's disk (the cloud's disk_root, as the instance sees it) lies on this machine.
    disk: Path
    # The process holding the instance's private mount namespace; None on a shared disk.
    namespace: subprocess.Popen[bytes] | None = None
    sshd: LoopbackSshd | None = None
    notes: list[str] = field(default_factory=list)
    runcmd_exit_codes: list[int] = field(default_factory=list)
    booted_at: float = field(default_factory=time.time)
    powered_off_at: float | None = None

    @property
    def poweroff_request(self) -> Path:
        return self.root / "poweroff-requested"


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
    subnet_id: str
    security_group_id: str


def register_images(ssm: Any, region: str, images: tuple[StandInImage, ...] = STAND_IN_IMAGES) -> dict[str, str]:
    """Registers each image in moto's EC2 state with its root device and root snapshot size and publishes its id
    under its parameter; returns parameter -> image id. moto's RegisterImage takes only a name, hence the backend."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id

    class _Image(Ami):  # moto reports every image's root snapshot as 15 GB
        root_snapshot_gb = 15

        @property
        def block_device_mappings(self) -> list[dict[str, Any]]:
            ebs = {"SnapshotId": self.ebs_snapshot.id, "VolumeSize": self.root_snapshot_gb, "VolumeType": "gp3"}
            return [{"DeviceName": self.root_device_name, "Ebs": {**ebs, "DeleteOnTermination": True}}]

    backend = ec2_backends[ACCOUNT_ID][region]
    published = {}
    for image in images:
        ami = _Image(
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
        ssm.put_parameter(Name=image.parameter, Value=ami.id, Type="String", Overwrite=True)
        published[image.parameter] = ami.id
    return published


def create_network(ec2: Any, region: str, ssh_port: int) -> StandInNetwork:
    """A VPC of the project's own, as a user would make it: a subnet that does not map public IPs (the default
    outside the default VPC) and a security group admitting SSH from Airflow only."""
    vpc_id = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.77.1.0/24", AvailabilityZone=f"{region}a")["Subnet"][
        "SubnetId"
    ]
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
    return StandInNetwork(vpc_id, subnet_id, group_id)


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


def install_strict_ec2() -> Any:
    """Makes moto's EC2 behave as EC2 does where the launch depends on it; returns a function that undoes it.

    RunInstances: EC2 refuses a root override smaller than the image's root snapshot (InvalidBlockDeviceMapping),
    and a mapping that misses the image's root device leaves the root as the image has it (moto would leave no root
    at all). TerminateInstances on a terminated instance changes nothing (moto deletes its network interface again
    and fails with InvalidNetworkInterfaceID.NotFound)."""
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError
    from moto.ec2.models.instances import Instance, InstanceBackend

    original = InstanceBackend.run_instances
    original_terminate = Instance.terminate

    def terminate(instance: Any) -> Any:
        if instance.state == "terminated":
            return copy.copy(instance._state)
        return original_terminate(instance)

    def run_instances(backend: Any, image_id: str, *args: Any, **kwargs: Any) -> Any:
        mappings = kwargs.get("block_device_mappings")
        try:
            (image,) = backend.describe_images(ami_ids=[image_id])
        except InvalidAMIIdError:
            image = None  # moto launches unknown images; so does this (MOTO_ENABLE_AMI_VALIDATION is the switch)
        if image is not None and mappings:
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

    def uninstall() -> None:
        InstanceBackend.run_instances = original  # type: ignore[method-assign]
        Instance.terminate = original_terminate  # type: ignore[method-assign]

    return uninstall


class LocalCloud:
    """moto server + instance emulator; `start()` returns the endpoint URL for the aws connection."""

    def __init__(
        self,
        workdir: Path,
        *,
        ssh_port: int,
        disk_root: Path,
        region: str = "us-east-1",
        project_tag_key: str = "ec2-trainer:project",
        instance_profile: str = "ec2-trainer-instance",
        poll_s: float = 0.2,
    ) -> None:
        self.workdir = workdir
        self.ssh_port = ssh_port
        self.disk_root = disk_root.resolve()
        self.region = region
        self.project_tag_key = project_tag_key
        self.instance_profile = instance_profile
        self.poll_s = poll_s
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.instances: dict[str, EmulatedInstance] = {}
        self._addresses = (f"127.0.{b}.{c}" for b, c in itertools.product(range(1, 255), range(2, 255)))
        # Instance id -> its address, entered once RunInstances has finished with it: only these may boot.
        self._planned: dict[str, str] = {}
        self._server: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._original_run_instances: Any = None
        self._uninstall_strict: Any = None
        # Instances whose security groups admit no SSH from Airflow: booted, but their sshd is never reachable.
        self._firewalled: set[str] = set()
        self.images: dict[str, str] = {}
        self.network: StandInNetwork | None = None
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self.private_disks = False

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> str:
        from moto.server import ThreadedMotoServer

        global _RUNNING  # noqa: PLW0603 - moto's state is per process, so is the one cloud that emulates it
        if _RUNNING is not None and _RUNNING is not self:
            raise RuntimeError(
                "a LocalCloud already runs in this process: moto keeps one EC2 state per process, so a second "
                "cloud's emulator would boot the first one's instances too. Reuse the running cloud."
            )
        _RUNNING = self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.private_disks = mount_namespaces_work()
        if not self.private_disks:
            log.warning(
                "No mount namespaces (needs root and util-linux's unshare/nsenter): instances share one disk folder, "
                "so run one instance at a time"
            )
        self._install_address_plan()
        self._uninstall_strict = install_strict_ec2()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self._seed()
        self._thread = threading.Thread(target=self._run, name="instance-emulator", daemon=True)
        self._thread.start()
        log.info("Local cloud (moto) at %s; instances answer SSH on 127.0.x.y:%s", self.endpoint_url, self.ssh_port)
        return self.endpoint_url

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for inst in self.instances.values():
                self._power_off(inst)
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._clients.clear()
        if self._uninstall_strict is not None:  # installed over the address plan: undone first
            self._uninstall_strict()
            self._uninstall_strict = None
        self._uninstall_address_plan()
        global _RUNNING  # noqa: PLW0603
        if _RUNNING is self:
            _RUNNING = None

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, service: str) -> Any:
        """One client per service, made from its own session: boto3 documents its default session as unsafe to share
        between threads, and the emulator makes clients from several (a made client is thread-safe)."""
        with self._clients_lock:
            if service not in self._clients:
                import boto3

                self._clients[service] = boto3.session.Session().client(
                    service,
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",  # noqa: S106 - moto's fixed test credentials
                )
            return self._clients[service]

    def boot_report(self) -> str:
        """What the emulator did with each instance (its console, in effect): read when a test fails."""
        with self._lock:
            instances = list(self.instances.values())
        lines = []
        for inst in instances:
            state = "powered off" if inst.powered_off_at is not None else "on"
            sshd = "sshd up" if inst.sshd is not None else "no sshd"
            lines.append(f"{inst.instance_id} {inst.address} {state}, {sshd}, runcmd exits {inst.runcmd_exit_codes}")
            lines += [f"    {note}" for note in inst.notes]
        return "\n".join(lines) or "no instance booted"

    # ---- the cloud's address plan ----------------------------------------------------------------------------------

    def _install_address_plan(self) -> None:
        """Give each instance its loopback "public IP" inside RunInstances, as EC2 does: an instance is never seen
        running without its address (assigning it later, on the emulator's tick, raced a fast describe).

        moto lists an instance before its RunInstances has returned, so the emulator boots only instances entered in
        `_planned`, here, after their address is set (booting one earlier put its sshd on moto's own address)."""
        from moto.ec2.models.instances import InstanceBackend

        original = InstanceBackend.run_instances
        addresses, lock = self._addresses, threading.Lock()  # RunInstances may be served by several threads
        tag_key, planned = self.project_tag_key, self._planned

        def run_instances(backend: Any, *args: Any, **kwargs: Any) -> Any:
            reservation = original(backend, *args, **kwargs)
            with lock:
                for instance in reservation.instances:
                    if any(t["key"] == tag_key for t in instance.get_tags()):  # only the instances it emulates
                        planned[instance.id] = address = next(addresses)
                        # Reachable only through a public IP, and only when EC2 gave it one (the subnet maps public
                        # IPs, or the request asked for one): sshd still listens, at an address nobody is told.
                        if instance.nics[0].public_ip:
                            instance.nics[0].public_ip = address
            return reservation

        InstanceBackend.run_instances = run_instances  # type: ignore[method-assign,assignment]
        self._original_run_instances = original

    def _uninstall_address_plan(self) -> None:
        from moto.ec2.models.instances import InstanceBackend

        if self._original_run_instances is not None:
            InstanceBackend.run_instances = self._original_run_instances  # type: ignore[method-assign]
            self._original_run_instances = None

    # ---- what AWS would already have ------------------------------------------------------------------------------

    def _seed(self) -> None:
        """The account's standing resources: Deep-Learning-AMI-like images behind SSM parameters, the project's own
        VPC, subnet and security group (not moto's default VPC), and the instance profile."""
        self.images = register_images(self.client("ssm"), self.region)
        self.network = create_network(self.client("ec2"), self.region, self.ssh_port)
        iam = self.client("iam")
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_role(RoleName=self.instance_profile, AssumeRolePolicyDocument="{}")
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_instance_profile(InstanceProfileName=self.instance_profile)
            iam.add_role_to_instance_profile(InstanceProfileName=self.instance_profile, RoleName=self.instance_profile)

    # ---- the emulator loop -----------------------------------------------------------------------------------------

    def _backend(self) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[ACCOUNT_ID][self.region]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception:  # the emulator must outlive one bad instance
                log.exception("instance emulator tick failed")

    def _tick(self) -> None:
        backend = self._backend()
        for moto_inst in list(backend.all_instances()):
            tags = {t["key"]: t["value"] for t in moto_inst.get_tags()}
            if self.project_tag_key not in tags:
                continue
            state = moto_inst.state
            with self._lock:
                known = self.instances.get(moto_inst.id)
                if known is None and state in _LIVE and moto_inst.id in self._planned:
                    self._boot(moto_inst)
                elif known is not None and known.powered_off_at is None:
                    if state in _OFF:
                        self._power_off(known)
                    elif known.poweroff_request.exists():
                        self._honour_shutdown(known)

    def _boot(self, moto_inst: Any) -> None:
        root = self.workdir / "instances" / moto_inst.id
        (root / "bin").mkdir(parents=True, exist_ok=True)
        if self.private_disks:
            disk = root / "disk"
            disk.mkdir(exist_ok=True)
        else:
            disk = self.disk_root
            if not any(i.powered_off_at is None for i in self.instances.values()):
                # A new instance boots from a fresh disk; on a shared disk only when no other instance uses it.
                shutil.rmtree(self.disk_root, ignore_errors=True)
                self.disk_root.mkdir(parents=True, exist_ok=True)
        inst = EmulatedInstance(moto_inst.id, self._planned[moto_inst.id], root, disk)
        self.instances[moto_inst.id] = inst
        if not admits_ssh(moto_inst.nics[0].group_set, self.ssh_port):
            self._firewalled.add(moto_inst.id)
        log.info("Booting %s at %s:%s", moto_inst.id, inst.address, self.ssh_port)
        threading.Thread(target=self._cloud_init, args=(inst,), name=f"boot-{moto_inst.id}", daemon=True).start()

    def host_path(self, inst: EmulatedInstance, path: Path | str) -> Path:
        """Where a path of the instance's disk, as the instance sees it, lies on this machine."""
        return inst.disk / Path(path).resolve().relative_to(self.disk_root)

    def _enter(self, inst: EmulatedInstance) -> list[str]:
        """The command prefix that runs a program inside the instance (its mount namespace), if it has one."""
        if inst.namespace is None:
            return []
        return ["nsenter", f"--target={inst.namespace.pid}", "--mount", "--no-fork", "--"]

    def _start_namespace(self, inst: EmulatedInstance) -> None:
        """A process that binds the instance's disk over disk_root in a private mount namespace, then sleeps."""
        env = {**os.environ, INSTANCE_MARKER_ENV: inst.instance_id}
        script = 'mount --bind "$1" "$2" && exec sleep infinity'
        inst.namespace = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
                inst.disk,
                self.disk_root,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        cmdline = Path(f"/proc/{inst.namespace.pid}/cmdline")
        while not cmdline.read_bytes().startswith(b"sleep"):  # exec'd: the bind mount is in place
            if inst.namespace.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"could not give {inst.instance_id} its own disk (mount --bind in a namespace)")
            time.sleep(0.02)

    def _cloud_init(self, inst: EmulatedInstance) -> None:
        try:
            attr = self.client("ec2").describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
            raw = attr.get("UserData", {}).get("Value")
            if not raw:
                inst.notes.append("no user-data: nothing to configure, SSH not started")
                return
            config = yaml.safe_load(base64.b64decode(raw).decode())
            if self.private_disks:
                self._start_namespace(inst)
            self._apply_cloud_config(inst, config)
        except Exception as exc:
            log.exception("cloud-init emulation failed on %s", inst.instance_id)
            inst.notes.append(f"cloud-init emulation failed: {exc}")

    def _apply_cloud_config(self, inst: EmulatedInstance, config: dict[str, Any]) -> None:
        host_key = (config.get("ssh_keys") or {}).get("ed25519_private")
        authorized = list(config.get("ssh_authorized_keys") or [])
        for user in config.get("users") or []:
            if isinstance(user, dict):
                authorized += user.get("ssh_authorized_keys") or []
        for entry in config.get("write_files") or []:
            self._write_file(inst, entry)
        if not host_key or not authorized:
            inst.notes.append("user-data has no ed25519 host key or no authorized key: SSH not started")
        elif inst.instance_id in self._firewalled:
            inst.notes.append(
                f"its security groups admit no TCP {self.ssh_port} from {AIRFLOW_ADDRESS}: SSH not served"
            )
        else:
            sshd = LoopbackSshd(
                host_key,
                authorized,
                address=inst.address,
                port=self.ssh_port,
                workdir=inst.root / "sshd",
                extra_config=[f"SetEnv {INSTANCE_MARKER_ENV}={inst.instance_id}"],
                command_prefix=self._enter(inst),
            )
            sshd.start()
            inst.sshd = sshd
        shutdown = inst.root / "bin" / "shutdown"
        shutdown.write_text(f'#!/bin/sh\necho "$@" > {inst.poweroff_request}\n')
        shutdown.chmod(0o755)
        env = {**os.environ, "PATH": f"{inst.root / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        env[INSTANCE_MARKER_ENV] = inst.instance_id
        for argv in config.get("runcmd") or []:
            if inst.powered_off_at is not None:
                return
            cmd = [str(a) for a in argv] if isinstance(argv, list) else ["sh", "-c", str(argv)]
            result = subprocess.run(
                [*self._enter(inst), *cmd], env=env, cwd=inst.root, check=False, capture_output=True
            )
            inst.runcmd_exit_codes.append(result.returncode)

    def _write_file(self, inst: EmulatedInstance, entry: dict[str, Any]) -> None:
        path = Path(str(entry["path"]))
        if not path.resolve().is_relative_to(self.disk_root):
            # The emulated disk is a folder of this machine: never write elsewhere.
            inst.notes.append(f"skipped write_files {path}: outside the emulated disk {self.disk_root}")
            return
        path = self.host_path(inst, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(entry.get("content", "")))
        path.chmod(int(str(entry.get("permissions", "0644")), 8))

    def _honour_shutdown(self, inst: EmulatedInstance) -> None:
        behaviour = (
            self.client("ec2")
            .describe_instance_attribute(InstanceId=inst.instance_id, Attribute="instanceInitiatedShutdownBehavior")
            .get("InstanceInitiatedShutdownBehavior", {})
            .get("Value", "stop")
        )
        log.warning("%s powered itself off (shutdown behaviour: %s)", inst.instance_id, behaviour)
        ec2 = self.client("ec2")
        if behaviour == "terminate":
            ec2.terminate_instances(InstanceIds=[inst.instance_id])
        else:
            ec2.stop_instances(InstanceIds=[inst.instance_id])
        self._power_off(inst)

    def _power_off(self, inst: EmulatedInstance) -> None:
        if inst.powered_off_at is not None:
            return
        inst.powered_off_at = time.time()
        killed = 0
        if inst.sshd is not None:
            # Established connections are served by children of the daemon: a power-off cuts them too.
            killed += kill_process_tree(inst.sshd.pid)
            inst.sshd.stop()
        killed += kill_marked_processes(inst.instance_id)
        if inst.namespace is not None:
            inst.namespace.kill()
            inst.namespace.wait(timeout=10)
        log.info("Powered off %s (%d processes ended)", inst.instance_id, killed)


def mount_namespaces_work() -> bool:
    """Whether this process may give each instance a private mount namespace (root, unshare and nsenter)."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


def kill_process_tree(root_pid: int | None) -> int:
    """SIGKILL every descendant of `root_pid` (not the root itself: its owner reaps it)."""
    if root_pid is None:
        return 0
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    pending, killed = list(children.get(root_pid, [])), 0
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def kill_marked_processes(instance_id: str) -> int:
    """SIGKILL every process carrying the instance's marker in its environment: what a VM's power-off does."""
    marker = f"{INSTANCE_MARKER_ENV}={instance_id}\0".encode()
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue  # gone already, or not ours to read
    return killed
