"""A real OpenSSH server on loopback: the embedded default's stand-in for the training instance.

It runs the system's `/usr/sbin/sshd` in the foreground with its own configuration and host key under a private
working directory, so it needs no change to the machine's own SSH set-up. Two ways to log in:
- a test server: keys from a file of its own, any user (whoever runs it: root, or a normal user on a port > 1024);
- an instance's server, configured as on Ubuntu: one login user (never root), keys from that user's own
  `~/.ssh/authorized_keys` with sshd's ownership checks (StrictModes), sshd_config.d drop-ins read first (so their
  `Port` decides where it listens: 22 without one). Run as root, sshd separates privileges as it does there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from embedded.process import free_port

logger = logging.getLogger(__name__)

SSHD_PATH = "/usr/sbin/sshd"
# sshd needs a moment to load its keys and bind; a healthy one logs readiness well within this.
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
# sshd refuses to start as root without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
_LISTENING_RE = re.compile(r"Server listening on \S+ port (\d+)")


class SshdError(RuntimeError):
    """The loopback sshd could not be installed, configured or started; the message says what to do."""


def ensure_sshd_installed() -> str:
    """Return the path of the OpenSSH server binary, installing the Debian package when running as root.

    Raises SshdError saying how to install it otherwise.
    """
    if Path(SSHD_PATH).is_file():
        return SSHD_PATH
    apt_get = shutil.which("apt-get")
    if os.geteuid() == 0 and apt_get:
        logger.info("OpenSSH server not found at %s; installing it with apt-get", SSHD_PATH)
        result = subprocess.run(
            [apt_get, "install", "-y", "--no-install-recommends", "openssh-server"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        if result.returncode == 0 and Path(SSHD_PATH).is_file():
            return SSHD_PATH
        logger.warning("apt-get install openssh-server failed: %s", result.stderr[-2000:])
    raise SshdError(
        f"OpenSSH server not found at {SSHD_PATH}. Install it with "
        "`sudo apt-get update && sudo apt-get install -y openssh-server` (it does not need to run as a service)."
    )


def render_sshd_config(
    *,
    address: str,
    port: int | None,
    host_key: Path,
    pid_file: Path,
    authorized_keys: Path | None,
    login_user: str | None = None,
    drop_in_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> str:
    """The sshd_config of a loopback server: public-key logins only.

    authorized_keys None: each user's own ~/.ssh/authorized_keys, checked as Ubuntu's sshd does. login_user: the one
    user who may log in (root never). drop_in_dir: read first, as Ubuntu's `Include /etc/ssh/sshd_config.d/*.conf`;
    port None: no Port line of its own (the drop-ins' Port, else 22)."""
    lines = [f"Include {drop_in_dir}/*.conf"] if drop_in_dir is not None else []
    lines += [f"ListenAddress {address}"]
    lines += [f"Port {port}"] if port is not None else []
    lines += [
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
    ]
    if authorized_keys is None:
        lines += ["AuthorizedKeysFile .ssh/authorized_keys", "StrictModes yes"]
    else:
        # The key file lives in a temporary directory whose parents sshd would otherwise reject.
        lines += [f"AuthorizedKeysFile {authorized_keys}", "StrictModes no"]
    if login_user is not None:
        lines += ["PermitRootLogin no", f"AllowUsers {login_user}"]
    else:
        lines += ["PermitRootLogin prohibit-password"]
    lines += [
        "PrintMotd no",
        # Our own config replaces the system one, so SFTP (used to follow job logs) must be declared here.
        "Subsystem sftp internal-sftp",
        *extra,
    ]
    return "\n".join(lines) + "\n"


class LoopbackSshd:
    """An sshd process listening on loopback with a pinned host key; use as a context manager or start()/stop()."""

    def __init__(
        self,
        host_private_key_pem: str,
        authorized_keys: Sequence[str] | None,
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        workdir: Path,
        login_user: str | None = None,
        drop_in_dir: Path | None = None,
        extra_config: Sequence[str] = (),
        command_prefix: Sequence[str] = (),
    ) -> None:
        """authorized_keys None: the login user's own ~/.ssh/authorized_keys (then login_user is required).
        drop_in_dir: sshd_config.d drop-ins that decide the port (then port must be None); otherwise port None picks
        a free one. command_prefix runs sshd through an exec-ing wrapper (e.g. nsenter into a mount namespace)."""
        if authorized_keys is not None and not authorized_keys:
            raise SshdError("LoopbackSshd needs at least one authorized public key, or nobody could log in.")
        if authorized_keys is None and login_user is None:
            raise SshdError("LoopbackSshd with keys from the user's home needs the login_user whose home holds them.")
        if login_user == "root":
            raise SshdError("login_user must be an unprivileged user: root logins are refused, as on Ubuntu.")
        if drop_in_dir is not None and port is not None:
            raise SshdError("Give either a port or a drop-in folder whose Port decides it, not both.")
        self._host_private_key_pem = host_private_key_pem
        self._authorized_keys = list(authorized_keys) if authorized_keys is not None else None
        self._login_user = login_user
        self._drop_in_dir = drop_in_dir
        self._extra_config = tuple(extra_config)
        self._command_prefix = tuple(command_prefix)
        self._address = address
        self._port = port if port is not None or drop_in_dir is not None else free_port(address)
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"LoopbackSshd(address={self._address!r}, port={self._port}, workdir={str(self._workdir)!r})"

    @property
    def address(self) -> str:
        return self._address

    @property
    def port(self) -> int:
        """The port it listens on (read from its log when the drop-ins decided it)."""
        if self._port is None:
            raise SshdError(f"{self!r} has not started: its port comes from its drop-ins")
        return self._port

    @property
    def log_path(self) -> Path:
        """sshd's own log (its stderr): connection, authentication and error lines."""
        return self._workdir / "sshd.log"

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Write the configuration and keys, start sshd and wait until it listens (bounded)."""
        if self._process is not None and self._process.poll() is None:
            return
        sshd = ensure_sshd_installed()
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._workdir.mkdir(parents=True, exist_ok=True)
        host_key = self._write_private("ssh_host_ed25519_key", self._host_private_key_pem.rstrip("\n") + "\n")
        authorized = None
        if self._authorized_keys is not None:
            authorized = self._write_private("authorized_keys", "\n".join(self._authorized_keys) + "\n")
        config = self._write_private(
            "sshd_config",
            render_sshd_config(
                address=self._address,
                port=None if self._drop_in_dir is not None else self._port,
                host_key=host_key,
                pid_file=self._workdir / "sshd.pid",
                authorized_keys=authorized,
                login_user=self._login_user,
                drop_in_dir=self._drop_in_dir,
                extra=self._extra_config,
            ),
        )
        # stderr goes straight to a file: readiness is read from it (from this start on: a restart appends), and it
        # keeps logging after start().
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [*self._command_prefix, sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_ready(log_start)
        logger.info("Loopback sshd listening on %s:%s (pid %s)", self._address, self._port, self._process.pid)

    @property
    def pid(self) -> int | None:
        """The listening daemon's pid while it runs (each connection is served by a child of it)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def stop(self) -> None:
        """Terminate sshd (SIGKILL if it does not exit in time); harmless to call again."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        logger.info("Loopback sshd on %s:%s stopped", self._address, self._port)

    def __enter__(self) -> LoopbackSshd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_private(self, name: str, content: str) -> Path:
        path = self._workdir / name
        # Created 0600 from the start: the host key must never be readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(path, 0o600)
        return path

    def _wait_ready(self, log_start: int) -> None:
        process = self._process
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            since_start = self.log_path.read_bytes()[log_start:].decode(errors="replace")
            listening = _LISTENING_RE.search(since_start)
            if listening:
                self._port = int(listening.group(1))
                return
            if process is None or process.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.read_log().splitlines()[-20:])
        self.stop()
        raise SshdError(
            f"sshd on {self._address}:{self._port or 'its drop-ins port'} did not report 'Server listening on' within "
            f"{READY_TIMEOUT_S:.0f}s (port taken, bad key or config?). Its log ends with:\n{tail}"
        )
