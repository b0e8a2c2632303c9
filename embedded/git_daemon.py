"""This repository served read-only by `git daemon`, as GitHub would serve it to the instance.

`mlflow run <local path> --version` rewrites the repository it is given (FACTS.md), so the instance clones a bare mirror
over git:// instead, which also exercises the same clone-by-sha path as production.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from types import TracebackType

from embedded.process import ServiceError, free_port, start_logged, stop_process

log = logging.getLogger(__name__)


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class GitDaemon:
    def __init__(self, repo_dir: Path, workdir: Path, *, name: str = "ec2-trainer") -> None:
        self.repo_dir = repo_dir
        self.workdir = workdir
        self.name = name
        self.port = free_port()
        self.log_file = workdir / "git-daemon.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"git://127.0.0.1:{self.port}/{self.name}.git"

    def head_sha(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.repo_dir)

    def start(self, timeout_s: float = 15.0) -> str:
        """Mirror the repository's commits into a bare clone and serve it; returns the clone URL."""
        import socket
        import time

        bare = self._bare
        if bare.exists():
            self.sync()
        else:
            bare.parent.mkdir(parents=True, exist_ok=True)
            git("clone", "--quiet", "--bare", str(self.repo_dir), str(bare))
        self._proc = start_logged(
            [
                "git",
                "daemon",
                f"--base-path={bare.parent}",
                "--export-all",
                "--reuseaddr",
                "--listen=127.0.0.1",
                f"--port={self.port}",
                str(bare.parent),
            ],
            self.log_file,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(f"git daemon exited with code {self._proc.returncode}; see {self.log_file}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                log.info("git daemon serving %s at %s", self.repo_dir, self.url)
                return self.url
            except OSError:
                time.sleep(0.1)
        raise ServiceError(f"git daemon did not listen on port {self.port} within {timeout_s}s; see {self.log_file}")

    @property
    def _bare(self) -> Path:
        return self.workdir / "git" / f"{self.name}.git"

    def sync(self) -> None:
        """Mirror the branches as they are now: commits made since start() become clonable, as after a push."""
        git("fetch", "--quiet", "--prune", str(self.repo_dir), "+refs/heads/*:refs/heads/*", cwd=self._bare)

    def stop(self) -> None:
        stop_process(self._proc)

    def __enter__(self) -> GitDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
