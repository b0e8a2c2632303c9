"""The embedded default's cloud: a moto server as AWS, and an emulator that boots each launched instance on loopback.

The orchestrator talks to the moto server exactly as it talks to AWS (through the aws connection's endpoint_url). The
emulator plays the hypervisor and cloud-init for the instances it launches:
- it gives each instance its own loopback address (127.0.x.y) as its public IP, which the orchestrator connects to,
  when EC2 would give it a public IP at all (the subnet maps public IPs, or the request asks for one), and serves
  SSH there only when one of its security groups admits the sshd's TCP port from 127.0.0.1 (Airflow's address here);
- it reads the instance's user-data and applies the parts cloud-init would, in cloud-init's order and as root:
  `bootcmd`, `write_files` (missing parents root:root 0755), the default user's `~/.ssh/authorized_keys`, sshd
  (after cloud-init's init stage, as ssh.service starts), the systemd jobs and units the boot asked for, `runcmd`;
- systemd is played by stand-ins for the verbs the user-data uses (`systemd-run --no-block` from bootcmd,
  `systemctl daemon-reload | enable [--now] | try-restart ssh.*`); a started unit's ExecStart runs as root; a
  unit file and an sshd drop-in are written to the instance's own /etc, never this machine's;
- it serves SSH with a real OpenSSH sshd bound to that address, with the host key from the user-data, configured as
  on Ubuntu: logins only as the AMI's unprivileged default user (LOGIN_USER, made once with useradd), whose home is
  the instance's own, never as root; the port is the one the user-data's sshd drop-in sets (22 without one);
- a `shutdown` run on the instance powers it off, honouring InstanceInitiatedShutdownBehavior (terminate or stop);
- when the instance is stopped or terminated, every process of the instance (sshd, sessions, detached jobs, watchdog)
  is killed, as powering off a VM would;
- when run as root, each instance has its own disk: a private mount namespace in which the emulated disk folder is
  its own directory, so instances running at the same time never see each other's files (as separate VMs would).
Not run as root, none of this can be made: cloud-init and SSH both run as the current user (a warning says so).
Nothing of this is visible to the orchestrator except through the EC2 and SSH APIs, so the same code paths run as in
production.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import getpass
import ipaddress
import itertools
import logging
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
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
# The emulated AMI's default user (Ubuntu's is `ubuntu`; a name of its own here, so no real account is ever used).
LOGIN_USER = "ec2-trainer"
# systemd's own PATH for units and cloud-init's commands; the instance's stand-ins go first.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Folders of the instance's /etc that the user-data writes: kept per instance, never written on this machine.
INSTANCE_ETC_DIRS = ("/etc/systemd/system", "/etc/ssh/sshd_config.d")
WRITE_FILES_KEYS = frozenset({"path", "content", "permissions"})
# The bucket and queue of the embedded default's dataset versions (README, "Retrain on new data and on a schedule").
DATASET_BUCKET = "ec2-trainer-datasets"
DATASET_PREFIX = "hurricane-damage/"
DATASET_QUEUE = "ec2-trainer-dataset-events"
_LIVE = ("pending", "running")
_OFF = ("shutting-down", "terminated", "stopping", "stopped")
_RUNNING: LocalCloud | None = None


def running_cloud() -> LocalCloud | None:
    """The LocalCloud started in this process, if any (there is at most one: moto's state is per process)."""
    return _RUNNING


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
    # The systemd units started on the instance (their ExecStart process), by unit name.
    units: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bootcmd_exit_codes: list[int] = field(default_factory=list)
    runcmd_exit_codes: list[int] = field(default_factory=list)
    booted_at: float = field(default_factory=time.time)
    powered_off_at: float | None = None
    # moto's security group objects of its network interface (live: a rule added later counts).
    security_groups: list[Any] = field(default_factory=list)
    # Launched with an instance profile: only then do its AWS SDKs find credentials, as on EC2.
    has_instance_profile: bool = False

    @property
    def poweroff_request(self) -> Path:
        return self.root / "poweroff-requested"

    @property
    def etc(self) -> Path:
        """The instance's own /etc (the parts the user-data writes)."""
        return self.root / "etc"

    @property
    def systemd(self) -> Path:
        """Where the systemd stand-ins leave queued jobs and start requests for the emulator."""
        return self.root / "systemd"


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


def sshd_port(drop_in_dir: Path) -> int:
    """The port sshd will listen on: the first `Port` of its drop-ins (sshd keeps a keyword's first value), else 22."""
    for conf in sorted(drop_in_dir.glob("*.conf")):
        for line in conf.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0].lower() == "port" and words[1].isdigit():
                return int(words[1])
    return 22


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

    RunInstances: EC2 refuses an unknown image (InvalidAMIID.NotFound) and a root override smaller than the image's
    root snapshot (InvalidBlockDeviceMapping); a mapping that misses the image's root device leaves the root as the
    image has it (moto would leave no root at all). TerminateInstances on a terminated instance changes nothing
    (moto deletes its network interface again and fails with InvalidNetworkInterfaceID.NotFound)."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.instances import Instance, InstanceBackend

    original = InstanceBackend.run_instances
    original_terminate = Instance.terminate

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
        disk_root: Path,
        region: str = "us-east-1",
        project_tag_key: str = "ec2-trainer:project",
        instance_profile: str = "ec2-trainer-instance",
        poll_s: float = 0.2,
        image_paths: Sequence[Path] = (),
        ssh_port: int = 22,
    ) -> None:
        """ssh_port: the TCP port the account's security group admits from Airflow (the instances' sshd port).
        image_paths: what the emulated AMI provides from this machine (e.g. the interpreter standing in for the
        AMI's); where a folder above one lets no other user through (pyenv under /root), each instance's namespace
        covers that folder with a 0755 tmpfs holding only the way down to it, as the AMI has it world-readable."""
        self.workdir = workdir
        self.disk_root = disk_root.resolve()
        self.region = region
        self.project_tag_key = project_tag_key
        self.instance_profile = instance_profile
        self.poll_s = poll_s
        self.ssh_port = ssh_port
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
        self.images: dict[str, str] = {}
        self.network: StandInNetwork | None = None
        self.dataset_queue_url = ""
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self.private_disks = False
        # Set by start(): LOGIN_USER as root (strict), else whoever runs the cloud.
        self.login_user = ""
        self.strict = False
        self.image_paths = tuple(image_paths)
        # Folder no other user may traverse -> the entries below it the image needs (see image_paths).
        self._exposures: dict[Path, set[str]] = {}
        self._staging: Path | None = None

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
        self.strict = os.geteuid() == 0
        if self.strict:
            self.login_user = ensure_login_user(LOGIN_USER)
            require_traversable(self.disk_root)
            self._exposures = hidden_ancestors(self.image_paths)
            if self._exposures:
                if not self.private_disks or any(self.workdir.resolve().is_relative_to(a) for a in self._exposures):
                    raise RuntimeError(
                        f"the login user cannot reach {list(self.image_paths)} (no o+x on {sorted(self._exposures)}) "
                        "and this cloud cannot expose them (needs mount namespaces and a workdir outside those "
                        "folders): make them traversable (chmod o+x) or use an interpreter outside them"
                    )
                self._staging = Path(tempfile.mkdtemp(prefix="ec2-trainer-image-"))
        else:
            self.login_user = getpass.getuser()
            log.warning(
                "Not root: the emulated instances run cloud-init and SSH as %s, not as root and an unprivileged "
                "login user as a real instance does; permission mistakes will not show here",
                self.login_user,
            )
        self._install_address_plan()
        self._uninstall_strict = install_strict_ec2()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.seed()
        self._thread = threading.Thread(target=self._run, name="instance-emulator", daemon=True)
        self._thread.start()
        log.info("Local cloud (moto) at %s; instances answer SSH as %s", self.endpoint_url, self.login_user)
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
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)  # only ever a mount point inside the namespaces
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
            sshd = f"sshd on port {inst.sshd.port}" if inst.sshd is not None else "no sshd"
            lines.append(
                f"{inst.instance_id} {inst.address} {state}, {sshd}, units {sorted(inst.units)}, "
                f"bootcmd exits {inst.bootcmd_exit_codes}, runcmd exits {inst.runcmd_exit_codes}"
            )
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

    def seed(self) -> None:
        """The account's standing resources: Deep-Learning-AMI-like images behind SSM parameters, the project's own
        VPC, subnet and security group (not moto's default VPC), and the instance profile. Called again after this
        process's moto state was wiped (moto's `mock_aws` wipes it on entering and on leaving): the network then gets
        new ids, which `EmbeddedStack.environment()` reports."""
        self.images = register_images(self.client("ssm"), self.region)
        self.network = create_network(self.client("ec2"), self.region, self.ssh_port)
        self.dataset_queue_url = create_dataset_bucket(self.client("s3"), self.client("sqs"))
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
        disk.chmod(0o755)
        inst = EmulatedInstance(moto_inst.id, self._planned[moto_inst.id], root, disk)
        self.instances[moto_inst.id] = inst
        inst.security_groups = list(moto_inst.nics[0].group_set)
        inst.has_instance_profile = bool(moto_inst.iam_instance_profile)
        log.info("Booting %s at %s", moto_inst.id, inst.address)
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
        """A process that binds the instance's disk over disk_root (and, strict, its own home over the login user's)
        in a private mount namespace, then sleeps."""
        env = {**os.environ, INSTANCE_MARKER_ENV: inst.instance_id}
        q = shlex.quote
        steps = [f"mount --bind {q(str(inst.disk))} {q(str(self.disk_root))}"]
        if self.strict:
            home = Path(pwd.getpwnam(self.login_user).pw_dir)
            steps.append(f"mount --bind {q(str(self.home_of(inst)))} {q(str(home))}")
        for i, (hidden, entries) in enumerate(sorted(self._exposures.items())):
            stage = Path(str(self._staging)) / f"{inst.instance_id}-{i}"  # start() made it: there are exposures
            steps += [f"mkdir -p {q(str(stage))}", f"mount --bind {q(str(hidden))} {q(str(stage))}"]
            steps.append(f"mount -t tmpfs -o mode=0755 tmpfs {q(str(hidden))}")
            for entry in sorted(entries):
                steps += [
                    f"mkdir {q(str(hidden / entry))}",
                    f"mount --bind {q(str(stage / entry))} {q(str(hidden / entry))}",
                ]
            steps.append(f"umount -l {q(str(stage))}")
        inst.namespace = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                " && ".join([*steps, "exec sleep infinity"]),
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
            if self.strict:
                self._make_home(inst)
            if self.private_disks:
                self._start_namespace(inst)
            self._apply_cloud_config(inst, config)
        except Exception as exc:
            log.exception("cloud-init emulation failed on %s", inst.instance_id)
            inst.notes.append(f"cloud-init emulation failed: {exc}")

    def home_of(self, inst: EmulatedInstance) -> Path:
        """The login user's home on the instance, as this machine sees it: the instance's own, bound over the user's
        home in its namespace; on a shared disk, the user's home itself."""
        return inst.root / "home" if self.private_disks else Path(pwd.getpwnam(self.login_user).pw_dir)

    def _make_home(self, inst: EmulatedInstance) -> None:
        """The login user's home on this instance, as useradd -m makes it (Ubuntu's homes are 0750)."""
        user, home = pwd.getpwnam(self.login_user), self.home_of(inst)
        shutil.copytree("/etc/skel", home, dirs_exist_ok=True)
        for path in (home, *home.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        home.chmod(0o750)

    def _root_env(self, inst: EmulatedInstance, stage: str) -> dict[str, str]:
        """What cloud-init's commands and systemd's units see: root's, with the instance's stand-ins first on PATH."""
        return {
            **os.environ,
            "PATH": f"{inst.root / 'bin'}:{SYSTEM_PATH}",
            INSTANCE_MARKER_ENV: inst.instance_id,
            "EC2_TRAINER_BOOT_STAGE": stage,
        }

    def _apply_cloud_config(self, inst: EmulatedInstance, config: dict[str, Any]) -> None:
        host_key = (config.get("ssh_keys") or {}).get("ed25519_private")
        authorized = list(config.get("ssh_authorized_keys") or [])
        for user in config.get("users") or []:
            if isinstance(user, dict):
                authorized += user.get("ssh_authorized_keys") or []
        self._install_standins(inst)
        # cloud-init's init stage: bootcmd, write_files, then the users and ssh modules.
        inst.bootcmd_exit_codes = self._run_commands(inst, config.get("bootcmd"), self._root_env(inst, "init"))
        for entry in config.get("write_files") or []:
            self._write_file(inst, entry)
        if not host_key or not authorized:
            inst.notes.append("user-data has no ed25519 host key or no authorized key: SSH not started")
        elif not admits_ssh(inst.security_groups, port := sshd_port(inst.etc / "ssh" / "sshd_config.d")):
            inst.notes.append(f"its security groups admit no TCP {port} from {AIRFLOW_ADDRESS}: SSH not served")
        else:
            self._start_sshd(inst, host_key, authorized)
        # Ordered after cloud-init's init stage: the jobs bootcmd queued, then the units they started.
        self._run_queued_jobs(inst)
        # The final stage.
        inst.runcmd_exit_codes = self._run_commands(inst, config.get("runcmd"), self._root_env(inst, "final"))

    def _install_standins(self, inst: EmulatedInstance) -> None:
        for folder in (inst.systemd / "queue", inst.etc / "systemd" / "system", inst.etc / "ssh" / "sshd_config.d"):
            folder.mkdir(parents=True, exist_ok=True)
        scripts = {
            "shutdown": f'#!/bin/sh\necho "$@" > {shlex.quote(str(inst.poweroff_request))}\n',
            "systemd-run": _SYSTEMD_RUN.replace("@QUEUE@", shlex.quote(str(inst.systemd / "queue"))),
            "systemctl": _SYSTEMCTL.replace("@UNITS@", shlex.quote(str(inst.etc / "systemd" / "system"))).replace(
                "@STARTS@", shlex.quote(str(inst.systemd / "start-requests"))
            ),
        }
        for name, text in scripts.items():
            path = inst.root / "bin" / name
            path.write_text(text)
            path.chmod(0o755)

    def _run_commands(self, inst: EmulatedInstance, commands: Any, env: dict[str, str]) -> list[int]:
        """bootcmd or runcmd: each entry in turn, as root, whatever the previous one returned (as cloud-init does)."""
        codes: list[int] = []
        for argv in commands or []:
            if inst.powered_off_at is not None:
                break
            cmd = [str(a) for a in argv] if isinstance(argv, list) else ["sh", "-c", str(argv)]
            result = subprocess.run([*self._enter(inst), *cmd], env=env, cwd="/", check=False, capture_output=True)
            codes.append(result.returncode)
            if result.returncode != 0:
                inst.notes.append(
                    f"{cmd[0]} exited {result.returncode}: {result.stderr.decode(errors='replace')[-300:]}"
                )
        return codes

    def _start_sshd(self, inst: EmulatedInstance, host_key: str, authorized: list[str]) -> None:
        if self.strict:
            # cloud-init's ssh module: the default user's keys, owned by the user, 0600 in a 0700 .ssh.
            user = pwd.getpwnam(self.login_user)
            ssh_dir = self.home_of(inst) / ".ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            keys = ssh_dir / "authorized_keys"
            keys.write_text("".join(f"{key.strip()}\n" for key in authorized))
            keys.chmod(0o600)
            for path in (ssh_dir, keys):
                os.chown(path, user.pw_uid, user.pw_gid)
        sshd = LoopbackSshd(
            host_key,
            None if self.strict else authorized,
            address=inst.address,
            workdir=inst.root / "sshd",
            login_user=self.login_user,
            drop_in_dir=inst.etc / "ssh" / "sshd_config.d",
            extra_config=[f"SetEnv {INSTANCE_MARKER_ENV}={inst.instance_id} {self._aws_env(inst)}"],
            command_prefix=self._enter(inst),
        )
        sshd.start()
        inst.sshd = sshd

    def _aws_env(self, inst: EmulatedInstance) -> str:
        """What the instance's AWS SDKs find on a real instance through its network (AWS's endpoints: here moto's),
        its region and, only when it was launched with an instance profile, the profile's credentials (from the
        metadata service on EC2); as sshd SetEnv words."""
        env = f"AWS_ENDPOINT_URL={self.endpoint_url} AWS_DEFAULT_REGION={self.region}"
        if inst.has_instance_profile:
            env += " AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing"
        return env

    def _run_queued_jobs(self, inst: EmulatedInstance) -> None:
        """The transient jobs `systemd-run --no-block` queued during the init stage, then the units they started."""
        for job in sorted((inst.systemd / "queue").iterdir()):
            argv = [a.decode() for a in job.read_bytes().split(b"\0") if a]
            result = subprocess.run(
                [*self._enter(inst), *argv],
                env=self._root_env(inst, "systemd"),
                cwd="/",
                check=False,
                capture_output=True,
            )
            if result.returncode != 0:
                inst.notes.append(f"systemd job {argv} exited {result.returncode}: {result.stderr.decode()[-300:]}")
        starts = inst.systemd / "start-requests"
        for unit in dict.fromkeys(starts.read_text().split() if starts.exists() else []):
            if inst.powered_off_at is None and unit not in inst.units:
                self._start_unit(inst, unit)

    def _start_unit(self, inst: EmulatedInstance, unit: str) -> None:
        """What systemd does for a simple service: its ExecStart as root, detached (not restarted if it exits)."""
        argv = unit_exec_start((inst.etc / "systemd" / "system" / unit).read_text())
        inst.units[unit] = subprocess.Popen(
            [*self._enter(inst), *argv],
            env=self._root_env(inst, "systemd"),
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("%s: started unit %s (%s)", inst.instance_id, unit, shlex.join(argv))

    def _write_file(self, inst: EmulatedInstance, entry: dict[str, Any]) -> None:
        unsupported = set(entry) - WRITE_FILES_KEYS
        if unsupported:
            # Honouring only some of an entry's keys would write what the instance would not: refuse it whole.
            inst.notes.append(f"skipped write_files {entry.get('path')}: keys {sorted(unsupported)} not emulated")
            return
        path = Path(str(entry["path"]))
        if str(path.parent) in INSTANCE_ETC_DIRS:
            target = inst.root / path.relative_to("/")
        elif path.resolve().is_relative_to(self.disk_root):
            target = self.host_path(inst, path)
        else:
            # The emulated disk is a folder of this machine: never write elsewhere.
            inst.notes.append(f"skipped write_files {path}: outside the emulated disk {self.disk_root}")
            return
        make_parents(target.parent)
        target.write_text(str(entry.get("content", "")))
        target.chmod(int(str(entry.get("permissions", "0644")), 8))

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
        for unit in inst.units.values():
            unit.kill()
            unit.wait(timeout=10)
        if inst.namespace is not None:
            inst.namespace.kill()
            inst.namespace.wait(timeout=10)
        log.info("Powered off %s (%d processes ended)", inst.instance_id, killed)


_SYSTEMD_RUN = """#!/bin/bash
# systemd-run as the emulated instance knows it: queues a transient job, run once cloud-init's init stage is over.
set -u
no_block=false
while (($#)); do
  case "$1" in
    --no-block) no_block=true ;;
    --unit=* | --description=* | --property=* | --collect | --quiet) ;;
    -*) echo "systemd-run: option $1 is not emulated" >&2; exit 1 ;;
    *) break ;;
  esac
  shift
done
if [[ "${EC2_TRAINER_BOOT_STAGE:-}" != init ]]; then
  echo "systemd-run: only emulated from cloud-init's bootcmd" >&2; exit 1
fi
if ! $no_block; then
  echo "systemd-run: without --no-block, bootcmd waits for a job ordered after cloud-init itself: the boot hangs" >&2
  exit 1
fi
(($#)) || { echo "systemd-run: no command" >&2; exit 1; }
printf '%s\\0' "$@" > @QUEUE@/"$(date +%s%N)"
"""

_SYSTEMCTL = """#!/bin/bash
# systemctl as the emulated instance knows it: the verbs the user-data uses, on the instance's own unit folder.
set -u
now=false
args=()
for arg in "$@"; do
  case "$arg" in
    --now) now=true ;;
    --no-block | --quiet) ;;
    -*) echo "systemctl: option $arg is not emulated" >&2; exit 1 ;;
    *) args+=("$arg") ;;
  esac
done
verb="${args[0]:-}"
units=("${args[@]:1}")
case "$verb" in
  daemon-reload) ;;
  enable)
    for unit in "${units[@]}"; do
      [[ -f @UNITS@/"$unit" ]] || { echo "Failed to enable unit: Unit file $unit does not exist." >&2; exit 1; }
    done
    if $now; then printf '%s\\n' "${units[@]}" >> @STARTS@; fi ;;
  try-restart)
    # sshd starts after cloud-init's init stage, with the drop-ins already written: nothing left to apply.
    for unit in "${units[@]}"; do
      case "$unit" in
        ssh.socket | ssh.service | sshd.service) ;;
        *) echo "systemctl try-restart $unit is not emulated" >&2; exit 1 ;;
      esac
    done ;;
  *) echo "systemctl $verb is not emulated" >&2; exit 1 ;;
esac
"""


def unit_exec_start(unit_text: str) -> list[str]:
    """The argv of a service unit's ExecStart, unquoted as systemd does; what it does not emulate is refused."""
    section, lines = "", []
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line.startswith("ExecStart="):
            lines.append(line.removeprefix("ExecStart="))
    if len(lines) != 1 or not lines[0] or lines[0][0] in "-@+!:":
        raise ValueError(f"unit needs exactly one plain ExecStart= in [Service], found {lines}")
    words = shlex.split(lines[0])
    if any("%" in w.replace("%%", "") or "$" in w.replace("$$", "") for w in words):
        raise ValueError(f"ExecStart {lines[0]!r} uses specifiers or variables the emulator does not expand")
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


def make_parents(folder: Path) -> None:
    """Missing folders made as cloud-init's write_files makes them: owned by whoever runs it (root), 0755."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        path.chmod(0o755)


def ensure_login_user(name: str) -> str:
    """The unprivileged login user, made once as the AMI has it (root only): useradd leaves it locked (`!`), which
    sshd refuses even for key logins, hence usermod -p '*' (no password, not locked)."""
    try:
        existing = pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], capture_output=True, text=True, check=False)
        if made.returncode not in (0, 9):  # 9: made meanwhile by another process
            raise RuntimeError(f"useradd {name} failed: {made.stderr.strip()}") from None
        existing = pwd.getpwnam(name)
    if existing.pw_uid == 0:
        raise RuntimeError(f"login user {name} is root: remove it (userdel) so an unprivileged one can be made")
    subprocess.run(["usermod", "-p", "*", name], capture_output=True, check=True)
    return name


def hidden_ancestors(paths: Sequence[Path]) -> dict[Path, set[str]]:
    """For each path (and its resolved self), the topmost folder above it that other users may not traverse, with the
    entry below it on the way to the path."""
    found: dict[Path, set[str]] = {}
    for path in {p for given in paths for p in (Path(given).absolute(), Path(given).resolve())}:
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & 0o001:
                found.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
                break
    return found


def require_traversable(folder: Path) -> None:
    """The login user must reach the emulated disk: every folder above it must let others through (o+x)."""
    for parent in folder.parents:
        if not parent.stat().st_mode & 0o001:
            raise RuntimeError(
                f"{parent} is not traversable by other users, so the instances' login user cannot reach the emulated "
                f"disk {folder}: put it under a folder such as /tmp"
            )


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
