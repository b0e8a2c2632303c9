"""The git daemon serves a mirror of the repository; `sync()` makes later commits clonable, as a push would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from embedded.git_daemon import GitDaemon
from tests.github_fixtures import make_repo


def remote_heads(url: str) -> dict[str, str]:
    out = subprocess.run(["git", "ls-remote", "--heads", url], capture_output=True, text=True, check=True).stdout
    return {ref.removeprefix("refs/heads/"): sha for sha, ref in (line.split("\t") for line in out.splitlines())}


def test_commits_made_after_start_are_served_once_synced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first = make_repo(repo)
    with GitDaemon(repo, tmp_path / "served") as daemon:
        assert remote_heads(daemon.url) == {"main": first}
        identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run(["git", "-C", str(repo), *identity, "commit", "-q", "--allow-empty", "-m", "second"], check=True)
        second = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert remote_heads(daemon.url) == {"main": first}
        daemon.sync()
        assert remote_heads(daemon.url) == {"main": second}
