"""The instance's cloud-init user-data: pinned host key, authorized key, max-lifetime watchdog, spot watcher, guard
and bootstrap.

The `#cloud-config` document is built as a dict and dumped with `yaml.safe_dump` (so every value is YAML-quoted
by the library); the shell scripts are files under `userdata/` whose `@@{name}` placeholders are filled with
`shlex.quote`d values. Only the keys the embedded default's instance emulator also interprets are used:
`ssh_keys`, `ssh_authorized_keys`, `bootcmd`, `write_files` (the scripts with `encoding: gz+b64`) and argv-list
`runcmd` (plus cloud-init-only hardening keys).

What runs when (cloud-init's own order, every step as root):
- init stage: `bootcmd` (every boot, before `write_files`): removes the bootstrap's status marker a baked image
  holds from its bake (sshd starts only after this stage), then queues, with `systemd-run --no-block`, one transient job
  that systemd starts only once cloud-init's init stage is over (its default dependencies order it after
  sysinit.target, which cloud-init.service precedes), by when `write_files` has written the files;
- init stage: `write_files` (parents are created root:root 0755): the scripts, the deadline, the watchdog's, the
  spot watcher's and the guard's systemd units and, for a port other than 22, an sshd drop-in with `Port N`; then
  sshd starts (after cloud-init.service);
- the queued job: `systemctl enable --now` the units (so they also run after a reboot, and whatever the later
  stages do) and, for a port other than 22, restarts sshd's socket or service (Ubuntu 24.04's socket activation
  reads `Port` only on a daemon-reload);
- final stage: `runcmd` runs the bootstrap, which makes the folders the SSH login user writes its own.

The spot watcher polls the instance's metadata for a spot interruption notice or a rebalance recommendation and
writes it to CHECKPOINT_REQUEST (the job finds it through EC2_TRAINER_CHECKPOINT_REQUEST, from env.sh) and to
SPOT_NOTICE, which stays for the orchestrator to read over SSH.

The guard stops a running job that prints nothing for stall_minutes, whose GPUs stay idle, or whose run's cost would
pass its cap (the job's cost-deadline file, placed by train as it starts the job), writes why to GUARD_REASON and
powers the instance off; GUARD_COST_HELD names the job whose cost deadline it holds.

The user-data is readable through IMDS on the instance and by anyone allowed ec2:DescribeInstanceAttribute:
it holds the per-run host private key (worthless once the instance is gone) and nothing else secret.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.cloud.hostkeys import HostKey
from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config.settings import Settings

# The project's userdata/ folder, beside dags/.
TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "userdata"

# EC2 limit on user-data, counted before base64 encoding.
USER_DATA_MAX_BYTES = 16 * 1024

BOOTSTRAP_MODES = ("train", "bake")
# Under the state folder: what a baked image was made by ("digest <sha256>", "mlflow <version>" lines). There, not in
# /etc, so the embedded default's instances write it on their own disk.
BAKED_MARKER = "baked"

WATCHDOG_UNIT = "ec2-trainer-watchdog.service"
SPOT_WATCHER_UNIT = "ec2-trainer-spot-watcher.service"
GUARD_UNIT = "ec2-trainer-guard.service"
# Under the state folder, root's: why the guard stopped the job and powered the instance off (one line).
GUARD_REASON = "guard-reason"
# Under the state folder, root's: the job folder whose cost deadline the guard holds (the job waits for it to start).
GUARD_COST_HELD = "guard-cost-held"
# Under the state folder. The request lies in a folder the login user owns, so the job can remove it once it has
# checkpointed (the state folder itself is root's); the notice stays, root's and readable.
CHECKPOINT_REQUEST = "signals/checkpoint-request"
SPOT_NOTICE = "spot-notice"
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
# Read by Ubuntu's sshd_config (`Include /etc/ssh/sshd_config.d/*.conf`); cloud images ship 60-cloudimg-settings.conf.
SSHD_PORT_DROP_IN = "/etc/ssh/sshd_config.d/50-ec2-trainer-port.conf"
SSH_DEFAULT_PORT = 22

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")
_MLFLOW_PIN_RE = re.compile(r"^mlflow==([0-9][0-9A-Za-z.+!-]*)$")
_UV_PIN_RE = re.compile(r"^uv==[0-9][0-9A-Za-z.+!-]*$")
# A whole-line comment of the scripts: they ship without them (EC2's 16 KB user-data limit), the readers' copy stays
# under userdata/. The shebang and shellcheck's directives are kept (the tests shellcheck the scripts as shipped).
_COMMENT_LINE_RE = re.compile(r"^[ \t]*#(?!!|\s*shellcheck ).*\n", re.MULTILINE)
_PUBLIC_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*( [^\n]*)?$")


# The scripts are written compressed (cloud-init's write_files `encoding`): about a third of their size against the
# 16 KB limit, and the same bytes once on the disk.
SCRIPT_ENCODING = "gz+b64"


class UserDataTooLargeError(ConfigError):
    """The rendered user-data exceeds EC2's 16 KB limit."""


@dataclass(frozen=True)
class UserDataSpec:
    """Everything the instance needs to boot into a ready training host."""

    host_key: HostKey
    authorized_public_key: str
    # Must be the AMI's default user (cloud-init installs the authorized key for that user).
    ssh_user: str
    # Absolute epoch seconds by which the instance must be gone; the watchdog powers it off then.
    deadline_epoch: int
    state_dir: str = "/var/lib/ec2-trainer"
    # The interpreter that has torch (the PyTorch Deep Learning AMI's).
    python_bin: str = "/opt/pytorch/bin/python"
    mlflow_requirement: str = "mlflow==3.17.2"
    # What the job imports beyond torch and mlflow (instance.job_requirements): installed where the image lacks them.
    job_requirements: tuple[str, ...] = ()
    # The installer of mlflow where the image lacks the pin (from PyPI into the state folder; pip where it fails).
    uv_requirement: str = "uv==0.13.10"
    require_gpu: bool = True
    # Debian package names, each also the name of the command that shows it is installed.
    # tar unpacks the commit's tree that train uploads (the instance fetches no code itself: no git needed).
    packages: tuple[str, ...] = ("tar",)
    # The port sshd listens on; another than 22 is set with an sshd drop-in and a restart early in the boot.
    ssh_port: int = SSH_DEFAULT_PORT
    # The guard's thresholds (training.stall_minutes, min_gpu_utilization, gpu_idle_minutes); 0 turns one off.
    stall_minutes: float = 0.0
    min_gpu_utilization: int = 0
    gpu_idle_minutes: float = 0.0
    # "bake": the bootstrap of an image being baked (ec2_bake_image), which also writes the image's BAKED_MARKER.
    mode: str = "train"


class _ShellTemplate(string.Template):
    # `$` is bash's own; `@@{name}` cannot clash with it.
    delimiter = "@@"


def _validate(spec: UserDataSpec) -> None:
    if not _PUBLIC_KEY_RE.fullmatch(spec.authorized_public_key.strip()):
        raise ConfigError(
            "authorized_public_key is not an OpenSSH public key line ('ssh-ed25519 AAAA...'): "
            "derive it with orchestrator.cloud.hostkeys.public_line_from_private"
        )
    if not _USER_RE.fullmatch(spec.ssh_user):
        raise ConfigError(f"ssh_user {spec.ssh_user!r} is not a valid Linux user name: use e.g. 'ubuntu'")
    if not spec.state_dir.startswith("/") or "\n" in spec.state_dir:
        raise ConfigError(f"state_dir {spec.state_dir!r} must be an absolute path on one line")
    if not spec.python_bin or "\n" in spec.python_bin:
        raise ConfigError("python_bin must be an interpreter path on one line, e.g. /opt/pytorch/bin/python")
    if not _MLFLOW_PIN_RE.match(spec.mlflow_requirement):
        raise ConfigError(
            f"mlflow_requirement {spec.mlflow_requirement!r} must pin one version, e.g. mlflow==3.17.2: the bootstrap "
            "compares it with the installed version"
        )
    if not _UV_PIN_RE.match(spec.uv_requirement):
        raise ConfigError(f"uv_requirement {spec.uv_requirement!r} must pin one version, e.g. uv==0.13.10")
    if not 1 <= spec.ssh_port <= 65535:
        raise ConfigError(f"ssh_port must be a TCP port (1-65535), got {spec.ssh_port}")
    if spec.stall_minutes < 0 or spec.gpu_idle_minutes < 0 or not 0 <= spec.min_gpu_utilization <= 100:
        raise ConfigError(
            "stall_minutes and gpu_idle_minutes must be 0 (off) or more, min_gpu_utilization a percentage (0-100)"
        )
    if spec.mode not in BOOTSTRAP_MODES:
        raise ConfigError(f"mode must be one of {BOOTSTRAP_MODES}, got {spec.mode!r}")
    if spec.deadline_epoch <= 0:
        raise ConfigError(f"deadline_epoch must be a positive epoch time in seconds, got {spec.deadline_epoch}")
    bad = [p for p in spec.packages if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise ConfigError(f"packages {bad!r} are not valid Debian package names: use names like 'git'")


def spec_from_settings(
    s: Settings, *, host_key: HostKey, authorized_public_key: str, deadline_epoch: int, mode: str = "train"
) -> UserDataSpec:
    """The user-data spec of an instance of this deployment: its bootstrap from the settings, the rest per launch."""
    return UserDataSpec(
        host_key=host_key,
        authorized_public_key=authorized_public_key,
        ssh_user=s.instance.ssh_user,
        ssh_port=s.instance.ssh_port,
        deadline_epoch=deadline_epoch,
        state_dir=s.instance.state_dir,
        python_bin=s.instance.python_bin,
        job_requirements=s.instance.job_requirements,
        require_gpu=s.instance.require_gpu,
        stall_minutes=s.training.stall_minutes,
        min_gpu_utilization=s.training.min_gpu_utilization,
        gpu_idle_minutes=s.training.gpu_idle_minutes,
        mode=mode,
    )


def bootstrap_spec(s: Settings) -> UserDataSpec:
    """The spec of the bootstrap these settings render, the per-launch values (absent from the bootstrap) empty: for
    its digest and pins, never to launch with."""
    return spec_from_settings(s, host_key=HostKey("", "", ""), authorized_public_key="", deadline_epoch=0)


def settings_digest(s: Settings) -> str:
    """bootstrap_digest of the bootstrap these settings render."""
    return bootstrap_digest(bootstrap_spec(s))


def render_script(name: str, spec: UserDataSpec) -> str:
    """One of the shell scripts under userdata/ with the spec's values filled in, shell-quoted."""
    return _render(name, spec, mode=spec.mode, digest=bootstrap_digest(spec))


def bootstrap_digest(spec: UserDataSpec) -> str:
    """The sha256 of the bootstrap as rendered for training, its mode and this digest left out: equal for every run
    of the same bootstrap settings (the host key, login key and deadline are not in the script), so a baked image
    tagged with it is known to hold what this bootstrap installs."""
    return hashlib.sha256(_render("bootstrap.sh", spec, mode="", digest="").encode()).hexdigest()


def _render(name: str, spec: UserDataSpec, *, mode: str, digest: str) -> str:
    values = {
        "mode": shlex.quote(mode),
        "bootstrap_digest": shlex.quote(digest),
        "baked_marker": shlex.quote(state_path(spec, BAKED_MARKER)),
        "state_dir": shlex.quote(spec.state_dir),
        "python_bin": shlex.quote(spec.python_bin),
        "mlflow_requirement": shlex.quote(spec.mlflow_requirement),
        "mlflow_version": shlex.quote(mlflow_version(spec)),
        "uv_requirement": shlex.quote(spec.uv_requirement),
        "job_requirements": " ".join(shlex.quote(r) for r in spec.job_requirements),
        "require_gpu": "true" if spec.require_gpu else "false",
        "ssh_user": shlex.quote(spec.ssh_user),
        "packages": " ".join(shlex.quote(p) for p in spec.packages),
        "deadline_epoch": str(int(spec.deadline_epoch)),
        "checkpoint_request": shlex.quote(state_path(spec, CHECKPOINT_REQUEST)),
        "spot_notice": shlex.quote(state_path(spec, SPOT_NOTICE)),
        "guard_reason": shlex.quote(state_path(spec, GUARD_REASON)),
        "guard_cost_held": shlex.quote(state_path(spec, GUARD_COST_HELD)),
        # Whole seconds, at least 1 when on: bash has no floats.
        "stall_s": str(_seconds(spec.stall_minutes)),
        "gpu_min_util": str(int(spec.min_gpu_utilization)),
        "gpu_idle_s": str(_seconds(spec.gpu_idle_minutes)),
    }
    template = _ShellTemplate((TEMPLATE_DIR / name).read_text(encoding="utf-8"))
    return _COMMENT_LINE_RE.sub("", template.substitute(values))


def _seconds(minutes: float) -> int:
    return max(1, round(minutes * 60)) if minutes > 0 else 0


def state_path(spec: UserDataSpec, name: str) -> str:
    """A path under the instance's state folder."""
    return f"{spec.state_dir.rstrip('/')}/{name}"


def mlflow_version(spec: UserDataSpec) -> str:
    match = _MLFLOW_PIN_RE.match(spec.mlflow_requirement)
    if match is None:
        raise ConfigError(f"mlflow_requirement {spec.mlflow_requirement!r} must pin one version, e.g. mlflow==3.17.2")
    return match.group(1)


def _systemd_quote(word: str) -> str:
    """One word of a unit's ExecStart: double-quoted, with systemd's own `$` and `%` expansions escaped."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%")
    return f'"{escaped}"'


def service_unit(description: str, script: str) -> str:
    """The systemd unit of one of the scripts (the watchdog, the spot watcher, the guard): enabled, so it runs on
    every boot whatever cloud-init's later stages do, and restarted if it ever exits."""
    return (
        "[Unit]\n"
        f"Description={description}\n"
        "\n"
        "[Service]\n"
        f"ExecStart=/bin/bash {_systemd_quote(script)}\n"
        "Restart=always\n"
        "RestartSec=10\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _early_boot_command(spec: UserDataSpec) -> list[str]:
    """bootcmd's one entry: a transient systemd job that runs once cloud-init's init stage (write_files) is over.

    `--no-block` is required: bootcmd runs inside cloud-init.service, which the job is ordered after."""
    # The reload loads the unit written after boot and re-runs ssh.socket's generator, which reads Port (Ubuntu 24.04).
    steps = ["systemctl daemon-reload", f"systemctl enable --now {WATCHDOG_UNIT} {SPOT_WATCHER_UNIT} {GUARD_UNIT}"]
    if spec.ssh_port != SSH_DEFAULT_PORT:
        steps.append("systemctl try-restart ssh.socket ssh.service")
    return [
        "systemd-run",
        "--no-block",
        "--unit=ec2-trainer-early-boot",
        "--description=ec2-trainer: start the watchdog, spot watcher and guard units and apply the sshd port",
        "sh",
        "-c",
        "; ".join(steps),
    ]


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks so the scripts stay readable in the user-data."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def _script_file(path: str, script: str) -> dict[str, str]:
    # mtime=0: the same script always renders the same bytes.
    content = base64.b64encode(gzip.compress(script.encode("utf-8"), mtime=0)).decode("ascii")
    return {"path": path, "encoding": SCRIPT_ENCODING, "content": content, "permissions": "0755"}


def file_text(entry: Mapping[str, Any]) -> str:
    """What cloud-init writes for one `write_files` entry of this module's user-data (its encoding undone)."""
    content = str(entry.get("content", ""))
    if entry.get("encoding") == SCRIPT_ENCODING:
        return gzip.decompress(base64.b64decode(content)).decode("utf-8")
    return content


def readable_user_data(user_data: str) -> str:
    """The user-data followed by every file as the instance gets it: what a reader, or a scan for secrets, must see."""
    doc = yaml.safe_load(user_data.removeprefix("#cloud-config\n")) or {}
    return "\n".join([user_data, *(file_text(entry) for entry in doc.get("write_files") or [])])


def cloud_config(spec: UserDataSpec) -> dict[str, Any]:
    """The `#cloud-config` document as a dict (validated spec)."""
    _validate(spec)
    bin_dir = f"{spec.state_dir.rstrip('/')}/bin"
    watchdog = f"{bin_dir}/watchdog.sh"
    spot_watcher = f"{bin_dir}/spot_watcher.sh"
    guard = f"{bin_dir}/guard.sh"
    bootstrap = f"{bin_dir}/bootstrap.sh"
    files: list[dict[str, str]] = [
        _script_file(bootstrap, render_script("bootstrap.sh", spec)),
        _script_file(watchdog, render_script("watchdog.sh", spec)),
        _script_file(spot_watcher, render_script("spot_watcher.sh", spec)),
        _script_file(guard, render_script("guard.sh", spec)),
        {
            "path": f"{spec.state_dir.rstrip('/')}/deadline",
            "content": f"{int(spec.deadline_epoch)}\n",
            "permissions": "0644",
        },
        {
            "path": f"{SYSTEMD_UNIT_DIR}/{WATCHDOG_UNIT}",
            "content": service_unit(
                "ec2-trainer max-lifetime watchdog: powers the instance off at its deadline", watchdog
            ),
            "permissions": "0644",
        },
        {
            "path": f"{SYSTEMD_UNIT_DIR}/{SPOT_WATCHER_UNIT}",
            "content": service_unit("ec2-trainer spot watcher: passes an interruption notice on", spot_watcher),
            "permissions": "0644",
        },
        {
            "path": f"{SYSTEMD_UNIT_DIR}/{GUARD_UNIT}",
            "content": service_unit("ec2-trainer guard: stops a stalled, idle or over-budget job", guard),
            "permissions": "0644",
        },
    ]
    if spec.ssh_port != SSH_DEFAULT_PORT:
        files.append({"path": SSHD_PORT_DROP_IN, "content": f"Port {spec.ssh_port}\n", "permissions": "0644"})
    return {
        # The instance presents exactly the pinned host key: no other type is generated, old ones are deleted.
        "ssh_keys": {
            "ed25519_private": spec.host_key.private_openssh,
            "ed25519_public": spec.host_key.public_line,
        },
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
        "ssh_authorized_keys": [spec.authorized_public_key.strip()],
        "disable_root": True,
        "ssh_pwauth": False,
        # The watchdog, the watcher and the guard are systemd units started from the init stage: they run even when
        # runcmd never does.
        # A baked image holds its bake's status marker: gone before sshd starts, so no one reads it as this boot's.
        "bootcmd": [["rm", "-f", state_path(spec, "bootstrap.status")], _early_boot_command(spec)],
        "write_files": files,
        "runcmd": [["bash", bootstrap]],
    }


def render_user_data(spec: UserDataSpec) -> str:
    """The user-data to pass as RunInstances' UserData (plain text; boto3 base64-encodes it)."""
    body = yaml.dump(cloud_config(spec), Dumper=_LiteralDumper, sort_keys=False, width=1000)
    text = "#cloud-config\n" + body
    size = len(text.encode("utf-8"))
    if size > USER_DATA_MAX_BYTES:
        raise UserDataTooLargeError(
            f"rendered user-data is {size} bytes, over EC2's {USER_DATA_MAX_BYTES}-byte limit: "
            "shorten the scripts under userdata/ or fetch large parts from S3 at boot"
        )
    return text
