"""The embedded default's cloud: a moto server as AWS, and an emulator that boots each launched instance on loopback.

The orchestrator talks to the moto server exactly as it talks to AWS (through the aws connection's endpoint_url). The
emulator plays the hypervisor for the instances it launches (cloud-init is embedded.cloud.cloud_init's):
- it gives each instance its own loopback address (127.0.x.y) as its public IP, which the orchestrator connects to,
  when EC2 would give it a public IP at all (the subnet maps public IPs, or the request asks for one);
- it boots the instance: cloud-init as root, SSH configured as on Ubuntu: logins only as the AMI's unprivileged
  default user (LOGIN_USER, made once with useradd), whose home is the instance's own, never as root;
- it serves each instance its own metadata service (IMDSv2, embedded.cloud.imds) on a loopback port, which the
  instance's processes are told of by AWS_EC2_METADATA_SERVICE_ENDPOINT (never 169.254.169.254, this machine's);
- a `shutdown` run on the instance powers it off, honouring InstanceInitiatedShutdownBehavior (terminate or stop);
- when the instance is stopped or terminated, every process of the instance (sshd, sessions, detached jobs, watchdog)
  is killed, as powering off a VM would;
- an image created from an instance (CreateImage, e.g. a baked image) holds a copy of the instance's disk, which an
  instance launched from the image boots with, as an EBS-backed image's root volume would;
- when run as root, each instance has its own disk: a private mount namespace in which the emulated disk folder is
  its own directory, so instances running at the same time never see each other's files (as separate VMs would).
Not run as root, none of this can be made: cloud-init and SSH both run as the current user (a warning says so).
Nothing of this is visible to the orchestrator except through the EC2 and SSH APIs, so the same code paths run as in
production.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import itertools
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from embedded.cloud.cloud_init import CloudInit
from embedded.cloud.host import (
    ensure_login_user,
    hidden_ancestors,
    kill_marked_processes,
    kill_process_tree,
    mount_namespaces_work,
    require_traversable,
    shut_down_marked_processes,
    start_mount_namespace,
)
from embedded.cloud.imds import InstanceMetadataService
from embedded.cloud.instance import EmulatedInstance
from embedded.cloud.seed import (
    ACCOUNT_ID,
    DATASET_BUCKET,
    DATASET_PREFIX,
    DATASET_QUEUE,
    StandInNetwork,
    create_dataset_bucket,
    create_network,
    register_images,
)
from embedded.cloud.strict_moto import install_address_plan, install_strict_ec2
from embedded.process import free_port
from embedded.services.aws_gate import AwsGate, GatedMotoServer, Identity, MotoLookup
from embedded.services.iam_policy import load_policy

log = logging.getLogger(__name__)

# The emulated AMI's default user (Ubuntu's is `ubuntu`; a name of its own here, so no real account is ever used).
LOGIN_USER = "ec2-trainer"

_LIVE = ("pending", "running")
_OFF = ("shutting-down", "terminated", "stopping", "stopped")
# How long an instance's processes get after SIGTERM before the power goes: short, as the tests wait on it.
SHUTDOWN_GRACE_S = 5.0
_RUNNING: LocalCloud | None = None


def running_cloud() -> LocalCloud | None:
    """The LocalCloud started in this process, if any (there is at most one: moto's state is per process)."""
    return _RUNNING


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
        deployment: str = "embedded",
    ) -> None:
        """deployment: the aws.deployment the policies (config/iam/) are filled with.
        ssh_port: the TCP port the account's security group admits from Airflow (the instances' sshd port).
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
        self.deployment = deployment
        # Who may call this cloud, each with its own random key (the policies tell them apart): the stand-in's own
        # set-up and the tests' assertions (unchecked), Airflow's connection, the instances' role.
        self.admin = Identity.new("ec2-trainer-embedded-admin", None)
        self.airflow = Identity.new("ec2-trainer-airflow", "airflow")
        self.instance_role = Identity.new("ec2-trainer-instance", "instance")
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.instances: dict[str, EmulatedInstance] = {}
        self._addresses = (f"127.0.{b}.{c}" for b, c in itertools.product(range(1, 255), range(2, 255)))
        # Instance id -> its address, entered once RunInstances has finished with it: only these may boot.
        self._planned: dict[str, str] = {}
        self._server: GatedMotoServer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._uninstall_address_plan: Callable[[], None] | None = None
        self._uninstall_strict: Callable[[], None] | None = None
        self.images: dict[str, str] = {}
        self.network: StandInNetwork | None = None
        self.dataset_queue_url = ""
        self._clients: dict[tuple[str, str], Any] = {}
        self._clients_lock = threading.Lock()
        self.private_disks = False
        # Set by start(): LOGIN_USER as root (strict), else whoever runs the cloud.
        self.login_user = ""
        self.strict = False
        self.image_paths = tuple(image_paths)
        # Folder no other user may traverse -> the entries below it the image needs (see image_paths).
        self._exposures: dict[Path, set[str]] = {}
        self._staging: Path | None = None
        self.cloud_init = CloudInit(self)

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> str:
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
        self._uninstall_address_plan = install_address_plan(self.project_tag_key, self._addresses, self._planned)
        self._uninstall_strict = install_strict_ec2()
        self._server = GatedMotoServer(
            "127.0.0.1",
            self.port,
            lambda app: AwsGate(
                app, (self.admin, self.airflow, self.instance_role), self.policy, MotoLookup(ACCOUNT_ID)
            ),
        )
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
        if self._uninstall_address_plan is not None:
            self._uninstall_address_plan()
            self._uninstall_address_plan = None
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

    def client(self, service: str, identity: Identity | None = None) -> Any:
        """One client per service and identity (the admin by default: the stand-in's own set-up and the tests'
        assertions), made from its own session: boto3 documents its default session as unsafe to share between
        threads, and the emulator makes clients from several (a made client is thread-safe)."""
        who = identity or self.admin
        with self._clients_lock:
            if (service, who.name) not in self._clients:
                import boto3

                self._clients[service, who.name] = boto3.session.Session().client(
                    service,
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=who.access_key,
                    aws_secret_access_key=who.secret_key,
                )
            return self._clients[service, who.name]

    @property
    def gate(self) -> AwsGate:
        """The gate in front of moto (started): what authorizes each request."""
        if self._server is None:
            raise RuntimeError("the cloud is not started")
        return self._server.gate

    @contextlib.contextmanager
    def policies_with(self, overrides: Mapping[str, str]) -> Iterator[None]:
        """Meanwhile the gate enforces the policies filled with `overrides`, as a deployment configured with them
        (its own aws.project_tag, say) has them in its policies."""
        previous = self.gate.policy_of
        self.gate.policy_of = lambda name: self.policy(name, overrides)
        try:
            yield
        finally:
            self.gate.policy_of = previous

    def policy(self, name: str, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
        """config/iam/<name>.json as this cloud's account, deployment, dataset bucket, queue and VPC fill it (or
        `overrides`: a deployment configured with its own prefix or queue has them in its policy)."""
        return load_policy(
            name,
            {
                "REGION": self.region,
                "ACCOUNT": ACCOUNT_ID,
                "PROJECT": "ec2-trainer",
                "DEPLOYMENT": self.deployment,
                "BUCKET": DATASET_BUCKET,
                "PREFIX": DATASET_PREFIX.rstrip("/"),
                "QUEUE": DATASET_QUEUE,
                "VPC-ID": self.network.vpc_id if self.network else "",
                **(overrides or {}),
            },
        )

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

    # ---- what AWS would already have ------------------------------------------------------------------------------

    def seed(self) -> None:
        """The account's standing resources: Deep-Learning-AMI-like images behind SSM parameters, the project's own
        VPC, subnet and security group (not moto's default VPC), and the instance profile. Called again after this
        process's moto state was wiped (moto's `mock_aws` wipes it on entering and on leaving): the network then gets
        new ids, which `EmbeddedStack.environment()` reports."""
        self.images = register_images(self.region)
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
        # Before any boot: an instance launched from a new image must find its disk.
        self._capture_images(backend)
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
        image_disk = self._image_disk(moto_inst.image_id)
        if image_disk.is_dir():
            _copy_disk(image_disk, disk)
        inst = EmulatedInstance(moto_inst.id, self._planned[moto_inst.id], root, disk)
        inst.imds = InstanceMetadataService(moto_inst.id)
        self.instances[moto_inst.id] = inst
        inst.security_groups = list(moto_inst.nics[0].group_set)
        inst.has_instance_profile = bool(moto_inst.iam_instance_profile)
        log.info("Booting %s at %s", moto_inst.id, inst.address)
        threading.Thread(target=self._cloud_init, args=(inst,), name=f"boot-{moto_inst.id}", daemon=True).start()

    def _image_disk(self, image_id: str) -> Path:
        return self.workdir / "images" / image_id

    def _capture_images(self, backend: Any) -> None:
        """Each new image of an emulated instance gets a copy of that instance's disk as it is now (CreateImage
        snapshots the root volume once; the builder is stopped by then); a deregistered image's copy goes."""
        folder = self.workdir / "images"
        if folder.is_dir():
            for kept in folder.iterdir():
                if kept.name not in backend.amis and not kept.name.endswith(".partial"):
                    shutil.rmtree(kept, ignore_errors=True)
        for image in list(backend.amis.values()):
            source = self.instances.get(getattr(image, "instance_id", None) or "")
            target = self._image_disk(image.id)
            if source is not None and not target.exists():
                partial = target.with_name(target.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                _copy_disk(source.disk, partial)
                partial.rename(target)
                log.info("Image %s holds a copy of %s's disk", image.id, source.instance_id)

    def host_path(self, inst: EmulatedInstance, path: Path | str) -> Path:
        """Where a path of the instance's disk, as the instance sees it, lies on this machine."""
        return inst.disk / Path(path).resolve().relative_to(self.disk_root)

    def _start_namespace(self, inst: EmulatedInstance) -> None:
        """The instance's private mount namespace: its disk bound over disk_root (and, strict, its own home over the
        login user's), the image's hidden folders exposed (see image_paths)."""
        binds = [(inst.disk, self.disk_root)]
        if self.strict:
            binds.append((self.home_of(inst), Path(pwd.getpwnam(self.login_user).pw_dir)))
        inst.namespace = start_mount_namespace(inst.instance_id, binds, self._exposures, self._staging)

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
            self.cloud_init.apply(inst, config)
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

    def _honour_shutdown(self, inst: EmulatedInstance) -> None:
        from moto.ec2.models.instances import StateReason

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
        # EC2 tells a shutdown from inside the OS apart from an API call; moto records every one as the user's.
        self._backend().get_instance(inst.instance_id).state_reason = StateReason(
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown", "Client.InstanceInitiatedShutdown"
        )
        self._power_off(inst)

    def _power_off(self, inst: EmulatedInstance) -> None:
        if inst.powered_off_at is not None:
            return
        inst.powered_off_at = time.time()
        shut_down_marked_processes(inst.instance_id, SHUTDOWN_GRACE_S)
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
        if inst.imds is not None:
            inst.imds.stop()
        log.info("Powered off %s (%d processes ended)", inst.instance_id, killed)


def _copy_disk(source: Path, target: Path) -> None:
    """Everything on `source` into `target`, owners and modes kept (cp -a, as a block copy would)."""
    subprocess.run(["cp", "-a", f"{source}/.", str(target)], check=True, capture_output=True)
