"""The instance's cloud-init user-data: pinned host key, authorized key, max-lifetime watchdog and bootstrap.

The `#cloud-config` document is built as a dict and dumped with `yaml.safe_dump` (so every value is YAML-quoted
by the library); the two shell scripts are files under `userdata/` whose `@@{name}` placeholders are filled with
`shlex.quote`d values. Only the keys the embedded default's instance emulator also interprets are used:
`ssh_keys`, `ssh_authorized_keys`, `write_files` and argv-list `runcmd` (plus cloud-init-only hardening keys).

The user-data is readable through IMDS on the instance and by anyone allowed ec2:DescribeInstanceAttribute:
it holds the per-run host private key (worthless once the instance is gone) and nothing else secret.
"""

from __future__ import annotations

import re
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError
from orchestrator.hostkeys import HostKey

# The project's userdata/ folder, beside dags/.
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "userdata"

# EC2 limit on user-data, counted before base64 encoding.
USER_DATA_MAX_BYTES = 16 * 1024

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]*$")
_PUBLIC_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+=*( [^\n]*)?$")


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
    require_gpu: bool = True
    # Debian package names, each also the name of the command that shows it is installed.
    packages: tuple[str, ...] = ("git",)


class _ShellTemplate(string.Template):
    # `$` is bash's own; `@@{name}` cannot clash with it.
    delimiter = "@@"


def _validate(spec: UserDataSpec) -> None:
    if not _PUBLIC_KEY_RE.fullmatch(spec.authorized_public_key.strip()):
        raise ConfigError(
            "authorized_public_key is not an OpenSSH public key line ('ssh-ed25519 AAAA...'): "
            "derive it with orchestrator.hostkeys.public_line_from_private"
        )
    if not _USER_RE.fullmatch(spec.ssh_user):
        raise ConfigError(f"ssh_user {spec.ssh_user!r} is not a valid Linux user name: use e.g. 'ubuntu'")
    if not spec.state_dir.startswith("/") or "\n" in spec.state_dir:
        raise ConfigError(f"state_dir {spec.state_dir!r} must be an absolute path on one line")
    if not spec.python_bin or "\n" in spec.python_bin:
        raise ConfigError("python_bin must be an interpreter path on one line, e.g. /opt/pytorch/bin/python")
    if not spec.mlflow_requirement or "\n" in spec.mlflow_requirement:
        raise ConfigError("mlflow_requirement must be one pip requirement, e.g. mlflow==3.17.2")
    if spec.deadline_epoch <= 0:
        raise ConfigError(f"deadline_epoch must be a positive epoch time in seconds, got {spec.deadline_epoch}")
    bad = [p for p in spec.packages if not _PACKAGE_RE.fullmatch(p)]
    if bad:
        raise ConfigError(f"packages {bad!r} are not valid Debian package names: use names like 'git'")


def render_script(name: str, spec: UserDataSpec) -> str:
    """One of the shell scripts under userdata/ with the spec's values filled in, shell-quoted."""
    values = {
        "state_dir": shlex.quote(spec.state_dir),
        "python_bin": shlex.quote(spec.python_bin),
        "mlflow_requirement": shlex.quote(spec.mlflow_requirement),
        "require_gpu": "true" if spec.require_gpu else "false",
        "ssh_user": shlex.quote(spec.ssh_user),
        "packages": " ".join(shlex.quote(p) for p in spec.packages),
        "deadline_epoch": str(int(spec.deadline_epoch)),
    }
    template = _ShellTemplate((TEMPLATE_DIR / name).read_text(encoding="utf-8"))
    return template.substitute(values)


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks so the scripts stay readable in the user-data."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def cloud_config(spec: UserDataSpec) -> dict[str, Any]:
    """The `#cloud-config` document as a dict (validated spec)."""
    _validate(spec)
    bin_dir = f"{spec.state_dir.rstrip('/')}/bin"
    watchdog = f"{bin_dir}/watchdog.sh"
    bootstrap = f"{bin_dir}/bootstrap.sh"
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
        "write_files": [
            {"path": bootstrap, "content": render_script("bootstrap.sh", spec), "permissions": "0755"},
            {"path": watchdog, "content": render_script("watchdog.sh", spec), "permissions": "0755"},
            {
                "path": f"{spec.state_dir.rstrip('/')}/deadline",
                "content": f"{int(spec.deadline_epoch)}\n",
                "permissions": "0644",
            },
        ],
        # The watchdog first and detached, so the lifetime bound holds even if the bootstrap hangs.
        "runcmd": [["setsid", "-f", "bash", watchdog], ["bash", bootstrap]],
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
