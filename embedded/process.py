"""Small helpers shared by the embedded services: free ports, readiness waits, supervised child processes."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class Managed:
    """start()/stop() as a context manager; a failed start() stops what it had started before raising."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServiceError(RuntimeError):
    """An embedded service did not start; the message says which and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick); ports 8080 and friends may be taken on shared machines."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str,
    timeout_s: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log_file: Path,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll `url` (with `headers`, e.g. a server's basic auth) until it answers 2xx, the process dies, or the time
    is up."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - a loopback URL we built
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{url}: the server exited with code {proc.returncode}; see {log_file}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(request, timeout=2) as resp,  # noqa: S310 - a loopback URL we built
        ):
            if 200 <= resp.status < 300:
                return
        time.sleep(0.25)
    raise ServiceError(f"{url} did not answer within {timeout_s:.0f}s; see {log_file}")


def start_logged(argv: Sequence[str], log_file: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start a child whose output goes to `log_file`, in its own process group so stop() takes its children too."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    out = log_file.open("ab")
    try:
        return subprocess.Popen(  # type: ignore[call-overload]
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs
        )
    finally:
        out.close()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers; harmless to repeat."""
    import os
    import signal

    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
