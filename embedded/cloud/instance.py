"""An instance as the emulator keeps it: its address, its folders on this machine, its processes, its boot record."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedded.cloud.imds import InstanceMetadataService
from embedded.services.sshd import LoopbackSshd


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
    # Its metadata service (started at boot, stopped at power-off).
    imds: InstanceMetadataService | None = None
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
    def enter(self) -> list[str]:
        """The command prefix that runs a program inside the instance (its mount namespace), if it has one."""
        if self.namespace is None:
            return []
        return ["nsenter", f"--target={self.namespace.pid}", "--mount", "--no-fork", "--"]

    @property
    def systemd(self) -> Path:
        """Where the systemd stand-ins leave queued jobs and start requests for the emulator."""
        return self.root / "systemd"
