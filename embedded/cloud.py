"""The embedded default's cloud: a moto server as AWS, and an emulator that boots each launched instance on loopback.

The orchestrator talks to the moto server exactly as it talks to AWS (through the aws connection's endpoint_url). The
emulator plays the hypervisor and cloud-init for the instances it launches:
- it gives each instance its own loopback address (127.0.x.y) as its public IP, which the orchestrator connects to;
- it reads the instance's user-data and applies the parts cloud-init would: the pinned host key (`ssh_keys`), the
  authorized keys, `write_files`, and `runcmd` in order (watchdog, bootstrap);
- it serves SSH with a real OpenSSH sshd bound to that address, with the host key from the user-data;
- a `shutdown` run on the instance powers it off, honouring InstanceInitiatedShutdownBehavior (terminate or stop);
- when the instance is stopped or terminated, every process of the instance (sshd, sessions, detached jobs, watchdog)
  is killed, as powering off a VM would.
Nothing of this is visible to the orchestrator except through the EC2 and SSH APIs, so the same code paths run as in
production.
"""

from __future__ import annotations

import base64
import contextlib
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
INSTANCE_MARKER_ENV = "EC2_TRAINER_EMULATED_INSTANCE"
_LIVE = ("pending", "running")
_OFF = ("shutting-down", "terminated", "stopping", "stopped")
_RUNNING: LocalCloud | None = None


@dataclass
class EmulatedInstance:
    instance_id: str
    address: str
    root: Path
    sshd: LoopbackSshd | None = None
    notes: list[str] = field(default_factory=list)
    runcmd_exit_codes: list[int] = field(default_factory=list)
    booted_at: float = field(default_factory=time.time)
    powered_off_at: float | None = None

    @property
    def poweroff_request(self) -> Path:
        return self.root / "poweroff-requested"


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
        ami_parameter: str = "/ec2-trainer/embedded/ami-id",
        instance_profile: str = "ec2-trainer-instance",
        poll_s: float = 0.2,
    ) -> None:
        self.workdir = workdir
        self.ssh_port = ssh_port
        self.disk_root = disk_root.resolve()
        self.region = region
        self.project_tag_key = project_tag_key
        self.ami_parameter = ami_parameter
        self.instance_profile = instance_profile
        self.poll_s = poll_s
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.instances: dict[str, EmulatedInstance] = {}
        self._addresses = (f"127.0.{b}.{c}" for b, c in itertools.product(range(1, 255), range(2, 255)))
        self._server: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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
        global _RUNNING  # noqa: PLW0603
        if _RUNNING is self:
            _RUNNING = None

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's fixed test credentials
        )

    def reset(self) -> None:
        """Forget every instance (moto's own reset), powering off the emulated ones first."""
        with self._lock:
            for inst in self.instances.values():
                self._power_off(inst)
            self.instances.clear()
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(request, timeout=10).close()  # noqa: S310 - the loopback moto server
        self._seed()

    # ---- what AWS would already have ------------------------------------------------------------------------------

    def _seed(self) -> None:
        """The account's standing resources: an AMI behind an SSM parameter and the instance profile."""
        ec2, ssm, iam = self.client("ec2"), self.client("ssm"), self.client("iam")
        image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        ssm.put_parameter(Name=self.ami_parameter, Value=image_id, Type="String", Overwrite=True)
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
                if known is None and state in _LIVE:
                    self._boot(moto_inst)
                elif known is not None and known.powered_off_at is None:
                    if state in _OFF:
                        self._power_off(known)
                    elif known.poweroff_request.exists():
                        self._honour_shutdown(known)

    def _boot(self, moto_inst: Any) -> None:
        if not any(i.powered_off_at is None for i in self.instances.values()):
            # A new instance boots from a fresh disk. The emulated disk is one folder of this machine, so instances
            # that run at the same time share it (their job directories are keyed by DAG run, their markers are not).
            shutil.rmtree(self.disk_root, ignore_errors=True)
            self.disk_root.mkdir(parents=True, exist_ok=True)
        address = next(self._addresses)
        moto_inst.nics[0].public_ip = address  # the cloud's address plan: this instance's public IP
        root = self.workdir / "instances" / moto_inst.id
        (root / "bin").mkdir(parents=True, exist_ok=True)
        inst = EmulatedInstance(moto_inst.id, address, root)
        self.instances[moto_inst.id] = inst
        log.info("Booting %s at %s:%s", moto_inst.id, address, self.ssh_port)
        threading.Thread(target=self._cloud_init, args=(inst,), name=f"boot-{moto_inst.id}", daemon=True).start()

    def _cloud_init(self, inst: EmulatedInstance) -> None:
        try:
            attr = self.client("ec2").describe_instance_attribute(InstanceId=inst.instance_id, Attribute="userData")
            raw = attr.get("UserData", {}).get("Value")
            if not raw:
                inst.notes.append("no user-data: nothing to configure, SSH not started")
                return
            config = yaml.safe_load(base64.b64decode(raw).decode())
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
        else:
            sshd = LoopbackSshd(
                host_key,
                authorized,
                address=inst.address,
                port=self.ssh_port,
                workdir=inst.root / "sshd",
                extra_config=[f"SetEnv {INSTANCE_MARKER_ENV}={inst.instance_id}"],
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
            result = subprocess.run(cmd, env=env, cwd=inst.root, check=False, capture_output=True)
            inst.runcmd_exit_codes.append(result.returncode)

    def _write_file(self, inst: EmulatedInstance, entry: dict[str, Any]) -> None:
        path = Path(str(entry["path"]))
        if not path.resolve().is_relative_to(self.disk_root):
            # The emulated disk is a folder of this machine: never write elsewhere.
            inst.notes.append(f"skipped write_files {path}: outside the emulated disk {self.disk_root}")
            return
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
        log.info("Powered off %s (%d processes ended)", inst.instance_id, killed)


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
