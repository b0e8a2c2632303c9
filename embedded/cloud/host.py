"""This machine's side of the emulated instances: the login user, mount namespaces (each instance's own disk), and
ending an instance's processes as powering off a VM would."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# In the environment of every process of an instance: what a power-off finds and kills.
INSTANCE_MARKER_ENV = "EC2_TRAINER_EMULATED_INSTANCE"


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


def signal_marked_processes(instance_id: str, sig: int) -> int:
    """Send `sig` (0: none, to count) to every process carrying the instance's marker; how many got it."""
    marker = f"{INSTANCE_MARKER_ENV}={instance_id}\0".encode()
    signalled = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes():
                os.kill(int(proc.name), sig)
                signalled += 1
        except (OSError, ProcessLookupError):
            continue  # gone already (a zombie's environ reads empty), or not ours to read
    return signalled


def shut_down_marked_processes(instance_id: str, grace_s: float) -> None:
    """What an OS shutdown does before the power goes (EC2 terminate and stop shut the OS down unless told to skip
    it): SIGTERM every process of the instance, then give them up to `grace_s` to end."""
    if not signal_marked_processes(instance_id, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and signal_marked_processes(instance_id, 0):
        time.sleep(0.1)


def kill_marked_processes(instance_id: str) -> int:
    """SIGKILL every process still carrying the instance's marker: what the power going does."""
    return signal_marked_processes(instance_id, signal.SIGKILL)


def start_mount_namespace(
    instance_id: str, binds: Sequence[tuple[Path, Path]], exposures: Mapping[Path, set[str]], staging: Path | None
) -> subprocess.Popen[bytes]:
    """A process of the instance that makes a private mount namespace, binds each (source, target) of `binds` over its
    target, covers each folder of `exposures` with a 0755 tmpfs holding only the entries listed for it (bound through
    `staging`, a folder outside them), then sleeps; returned once the mounts are in place."""
    q = shlex.quote
    steps = [f"mount --bind {q(str(source))} {q(str(target))}" for source, target in binds]
    for i, (hidden, entries) in enumerate(sorted(exposures.items())):
        stage = Path(str(staging)) / f"{instance_id}-{i}"  # the caller made it: there are exposures
        steps += [f"mkdir -p {q(str(stage))}", f"mount --bind {q(str(hidden))} {q(str(stage))}"]
        steps.append(f"mount -t tmpfs -o mode=0755 tmpfs {q(str(hidden))}")
        for entry in sorted(entries):
            steps += [
                f"mkdir {q(str(hidden / entry))}",
                f"mount --bind {q(str(stage / entry))} {q(str(hidden / entry))}",
            ]
        steps.append(f"umount -l {q(str(stage))}")
    namespace = subprocess.Popen(
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
        env={**os.environ, INSTANCE_MARKER_ENV: instance_id},
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    cmdline = Path(f"/proc/{namespace.pid}/cmdline")
    while not cmdline.read_bytes().startswith(b"sleep"):  # exec'd: the bind mounts are in place
        if namespace.poll() is not None or time.monotonic() > deadline:
            namespace.kill()
            namespace.wait(timeout=10)
            raise RuntimeError(f"could not give {instance_id} its own disk (mount --bind in a namespace)")
        time.sleep(0.02)
    return namespace
