"""cloud-init as the emulator plays it: the parts of an instance's user-data cloud-init applies, in order, as root.

- `bootcmd`, `write_files` (missing parents root:root 0755), the default user's `~/.ssh/authorized_keys`, sshd
  (after cloud-init's init stage, as ssh.service starts), the systemd jobs and units the boot asked for, `runcmd`;
- systemd is played by stand-ins (the scripts in bin/) for the verbs the user-data uses (`systemd-run --no-block` from
  bootcmd, `systemctl daemon-reload | enable [--now] | try-restart ssh.*`); a started unit's ExecStart runs as root;
  a unit file and an sshd drop-in are written to the instance's own /etc, never this machine's;
- sshd is a real OpenSSH sshd bound to the instance's address, with the host key from the user-data, serving only
  when one of the instance's security groups admits its TCP port (the drop-in's `Port`, else 22) from Airflow.
"""

from __future__ import annotations

import base64
import gzip
import logging
import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedded.cloud.host import INSTANCE_MARKER_ENV
from embedded.cloud.instance import EmulatedInstance
from embedded.cloud.seed import AIRFLOW_ADDRESS, admits_ssh
from embedded.services.sshd import LoopbackSshd

if TYPE_CHECKING:
    from embedded.cloud.hypervisor import LocalCloud

log = logging.getLogger(__name__)

# systemd's own PATH for units and cloud-init's commands; the instance's stand-ins go first.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Folders of the instance's /etc that the user-data writes: kept per instance, never written on this machine.
INSTANCE_ETC_DIRS = ("/etc/systemd/system", "/etc/ssh/sshd_config.d")
WRITE_FILES_KEYS = frozenset({"path", "content", "permissions", "encoding"})
# The one encoding the user-data uses (cloud-init also knows others): gzip, then base64.
GZIP_BASE64 = "gz+b64"
# The instance's shutdown, systemd-run and systemctl: shell scripts, copied into each instance's bin/.
STANDINS = Path(__file__).with_name("bin")
METADATA_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"


class CloudInit:
    """Applies an instance's cloud-config on the cloud that booted it (its login user, disk and endpoint)."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud

    def apply(self, inst: EmulatedInstance, config: dict[str, Any]) -> None:
        """The instance's cloud-config (its user-data, parsed), stage by stage as cloud-init runs it."""
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

    def _root_env(self, inst: EmulatedInstance, stage: str) -> dict[str, str]:
        """What cloud-init's commands and systemd's units see: root's, with the instance's stand-ins first on PATH."""
        return {
            **os.environ,
            "PATH": f"{inst.root / 'bin'}:{SYSTEM_PATH}",
            INSTANCE_MARKER_ENV: inst.instance_id,
            "EC2_TRAINER_BOOT_STAGE": stage,
            **metadata_env(inst),
        }

    def _install_standins(self, inst: EmulatedInstance) -> None:
        """The instance's shutdown, systemd-run and systemctl (STANDINS) in its bin/, first on its PATH: they find the
        instance's etc/ and systemd/ beside that folder."""
        for folder in (inst.systemd / "queue", inst.etc / "systemd" / "system", inst.etc / "ssh" / "sshd_config.d"):
            folder.mkdir(parents=True, exist_ok=True)
        for script in STANDINS.iterdir():
            path = inst.root / "bin" / script.name
            shutil.copyfile(script, path)
            path.chmod(0o755)

    def _run_commands(self, inst: EmulatedInstance, commands: Any, env: dict[str, str]) -> list[int]:
        """bootcmd or runcmd: each entry in turn, as root, whatever the previous one returned (as cloud-init does)."""
        codes: list[int] = []
        for argv in commands or []:
            if inst.powered_off_at is not None:
                break
            cmd = [str(a) for a in argv] if isinstance(argv, list) else ["sh", "-c", str(argv)]
            result = subprocess.run([*inst.enter, *cmd], env=env, cwd="/", check=False, capture_output=True)
            codes.append(result.returncode)
            if result.returncode != 0:
                inst.notes.append(
                    f"{cmd[0]} exited {result.returncode}: {result.stderr.decode(errors='replace')[-300:]}"
                )
        return codes

    def _start_sshd(self, inst: EmulatedInstance, host_key: str, authorized: list[str]) -> None:
        if self.cloud.strict:
            # cloud-init's ssh module: the default user's keys, owned by the user, 0600 in a 0700 .ssh.
            user = pwd.getpwnam(self.cloud.login_user)
            ssh_dir = self.cloud.home_of(inst) / ".ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            keys = ssh_dir / "authorized_keys"
            keys.write_text("".join(f"{key.strip()}\n" for key in authorized))
            keys.chmod(0o600)
            for path in (ssh_dir, keys):
                os.chown(path, user.pw_uid, user.pw_gid)
        sshd = LoopbackSshd(
            host_key,
            None if self.cloud.strict else authorized,
            address=inst.address,
            workdir=inst.root / "sshd",
            login_user=self.cloud.login_user,
            drop_in_dir=inst.etc / "ssh" / "sshd_config.d",
            extra_config=[f"SetEnv {INSTANCE_MARKER_ENV}={inst.instance_id} {self.aws_env(inst)}"],
            command_prefix=inst.enter,
        )
        sshd.start()
        inst.sshd = sshd

    def aws_env(self, inst: EmulatedInstance) -> str:
        """What the instance's AWS SDKs find on a real instance through its network (AWS's endpoints: here moto's),
        its region and, only when it was launched with an instance profile, the profile's credentials (from the
        metadata service on EC2); as sshd SetEnv words."""
        env = f"AWS_ENDPOINT_URL={self.cloud.endpoint_url} AWS_DEFAULT_REGION={self.cloud.region}"
        env += "".join(f" {name}={value}" for name, value in metadata_env(inst).items())
        if inst.has_instance_profile:
            role = self.cloud.instance_role
            env += f" AWS_ACCESS_KEY_ID={role.access_key} AWS_SECRET_ACCESS_KEY={role.secret_key}"
        return env

    def _run_queued_jobs(self, inst: EmulatedInstance) -> None:
        """The transient jobs `systemd-run --no-block` queued during the init stage, then the units they started."""
        for job in sorted((inst.systemd / "queue").iterdir()):
            argv = [a.decode() for a in job.read_bytes().split(b"\0") if a]
            result = subprocess.run(
                [*inst.enter, *argv],
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
            [*inst.enter, *argv],
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
        if entry.get("encoding", GZIP_BASE64) != GZIP_BASE64:
            unsupported.add(f"encoding {entry['encoding']}")
        if unsupported:
            # Honouring only some of an entry's keys would write what the instance would not: refuse it whole.
            inst.notes.append(f"skipped write_files {entry.get('path')}: keys {sorted(unsupported)} not emulated")
            return
        path = Path(str(entry["path"]))
        if str(path.parent) in INSTANCE_ETC_DIRS:
            target = inst.root / path.relative_to("/")
        elif path.resolve().is_relative_to(self.cloud.disk_root):
            target = self.cloud.host_path(inst, path)
        else:
            # The emulated disk is a folder of this machine: never write elsewhere.
            inst.notes.append(f"skipped write_files {path}: outside the emulated disk {self.cloud.disk_root}")
            return
        make_parents(target.parent)
        content = str(entry.get("content", ""))
        if "encoding" in entry:
            target.write_bytes(gzip.decompress(base64.b64decode(content)))
        else:
            target.write_text(content)
        target.chmod(int(str(entry.get("permissions", "0644")), 8))


def metadata_env(inst: EmulatedInstance) -> dict[str, str]:
    """Where the instance's processes find its metadata service: AWS's own variable (botocore and the watcher read it);
    on EC2 it is unset and they use 169.254.169.254."""
    return {METADATA_ENDPOINT_ENV: inst.imds.endpoint} if inst.imds is not None else {}


def sshd_port(drop_in_dir: Path) -> int:
    """The port sshd will listen on: the first `Port` of its drop-ins (sshd keeps a keyword's first value), else 22."""
    for conf in sorted(drop_in_dir.glob("*.conf")):
        for line in conf.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[0].lower() == "port" and words[1].isdigit():
                return int(words[1])
    return 22


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
