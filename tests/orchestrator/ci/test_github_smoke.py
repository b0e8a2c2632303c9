"""Opt-in smoke test against the real GitHub REST API: read-only, free, never run by CI.

`make smoke-github` runs it: it resolves a ref of a public repository and reads the workflow runs of that commit with
the same client the CI gate uses, anonymously or with a token from GITHUB_TOKEN. It checks what the stand-in assumes:
the runs' shape, the rate-limit headers, and a conditional request answered 304. Each run costs 3 requests of the
hourly rate limit (60 anonymous, 5,000 with a token; a 304 is free only with a token).
"""

from __future__ import annotations

import os
import socket

import pytest

from orchestrator.ci.github import DEFAULT_API_URL, GitHubClient
from orchestrator.ci.verdict import evaluate_ci

pytestmark = pytest.mark.github

OPT_IN = ("EC2_TRAINER_SMOKE", "github")
# An old release tag: its runs no longer change, so a second read of them is answered 304.
REPO = os.environ.get("SMOKE_GITHUB_REPO", "actions/checkout")
REF = os.environ.get("SMOKE_GITHUB_REF", "v4.1.0")


@pytest.fixture
def client() -> GitHubClient:
    if os.environ.get(OPT_IN[0]) != OPT_IN[1]:
        pytest.skip("opt-in smoke test against the real GitHub API: run `make smoke-github`")
    host = DEFAULT_API_URL.removeprefix("https://")
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"no network: {host}:443 unreachable ({type(exc).__name__})")
    return GitHubClient(DEFAULT_API_URL, REPO, os.environ.get("GITHUB_TOKEN") or None, max_retries=2, max_wait_s=60)


def test_resolve_a_ref_and_read_its_runs(client: GitHubClient) -> None:
    sha = client.resolve_ref(REF)
    runs = client.list_workflow_runs(sha)
    assert runs, f"no workflow run on {REPO}@{REF} ({sha}): pick another SMOKE_GITHUB_REF"
    assert {run.head_sha for run in runs} == {sha}
    assert all(run.label for run in runs)
    assert evaluate_ci(runs).state in ("success", "failed", "pending")
    assert client.rate_limit is not None and client.rate_limit.limit > 0

    client.list_workflow_runs(sha)
    assert client.not_modified >= 1, "GitHub answered the unchanged runs in full: the ETag was not honoured"
