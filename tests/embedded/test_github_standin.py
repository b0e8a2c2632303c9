"""The GitHub stand-in answers the endpoints the CI gate uses, like GitHub does, over real HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.github_standin import GitHubStandIn

REPO = "local/ec2-trainer"


@pytest.fixture
def standin(repo: tuple[Path, str]) -> Iterator[GitHubStandIn]:
    with GitHubStandIn(repo[0], REPO, token="test-token") as server:
        yield server


def get(url: str, token: str | None = "test-token") -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, dict(response.headers), json.loads(body)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_resolves_branch_full_and_short_sha(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sha = repo[1]
    for ref in ("main", sha, sha[:8]):
        status, _, body = get(f"{standin.url}/repos/{REPO}/commits/{ref}")
        assert (status, body["sha"]) == (200, sha)
    assert standin.request_count(f"/repos/{REPO}/commits/main") == 1


def test_unknown_ref_and_repo(standin: GitHubStandIn) -> None:
    assert get(f"{standin.url}/repos/{REPO}/commits/no-such-branch")[0] == 404
    # Like GitHub, a ref with a trailing newline is no ref (`re.match` with `$` read it as "main").
    assert get(f"{standin.url}/repos/{REPO}/commits/main%0A")[0] == 404
    assert get(f"{standin.url}/repos/{REPO}/actions/runs%0A?head_sha={'b' * 40}")[0] == 404
    assert get(f"{standin.url}/repos/{REPO}/commits/{'b' * 40}")[0] == 422
    assert get(f"{standin.url}/repos/other/repo/commits/main")[0] == 404


def test_token_required(standin: GitHubStandIn) -> None:
    assert get(f"{standin.url}/repos/{REPO}/commits/main", token=None)[0] == 401
    assert get(f"{standin.url}/repos/{REPO}/commits/main", token="wrong")[0] == 401


def test_unscripted_sha_answers_one_green_ci(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    status, _, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={repo[1]}&per_page=100")
    assert status == 200
    assert body["total_count"] == 1
    (run,) = body["workflow_runs"]
    assert (run["name"], run["status"], run["conclusion"], run["head_sha"]) == (
        "CI",
        "completed",
        "success",
        repo[1],
    )


def test_script_answers_in_turn_then_repeats_the_last(standin: GitHubStandIn) -> None:
    sha = "c" * 40
    standin.script(sha, [[{"status": "queued"}], [{"status": "in_progress"}], [{"conclusion": "failure"}]])
    url = f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}"
    seen = [get(url)[2]["workflow_runs"][0] for _ in range(4)]
    assert [r["status"] for r in seen] == ["queued", "in_progress", "completed", "completed"]
    assert seen[0]["conclusion"] is None
    assert seen[3]["conclusion"] == "failure"


def test_pagination_with_link_header(standin: GitHubStandIn) -> None:
    sha = "d" * 40
    standin.set_runs(sha, [{"id": i, "workflow_id": i} for i in range(1, 251)])
    status, headers, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100&page=3")
    assert (status, body["total_count"], len(body["workflow_runs"])) == (200, 250, 50)
    assert "Link" not in headers
    _, headers, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100")
    assert [r["id"] for r in body["workflow_runs"]][:2] == [1, 2]
    assert f'head_sha={sha}&per_page=100&page=2>; rel="next"' in headers["Link"]


def test_faults(standin: GitHubStandIn) -> None:
    url = f"{standin.url}/repos/{REPO}/commits/main"
    standin.fail_next(2, status=503)
    assert [get(url)[0] for _ in range(3)] == [503, 503, 200]
    standin.rate_limit_next(30)
    status, headers, _ = get(url)
    assert status == 403
    assert headers["x-ratelimit-remaining"] == "0"
    assert int(headers["x-ratelimit-reset"]) >= int(time.time()) + 28
    standin.malformed_next()
    request = urllib.request.Request(url, headers={"Authorization": "Bearer test-token"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        json.loads(body)
    assert standin.request_count("/repos/local/ec2-trainer/commits/main") == 5


def test_runs_as_a_module(repo: tuple[Path, str], tmp_path: Path) -> None:
    log = tmp_path / "standin.log"
    with log.open("wb") as sink:
        # Port 0: the server takes a free port itself and logs it (a port picked here could be taken meanwhile).
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedded.github_standin", "--repo-dir", str(repo[0]), "--port", "0"],
            cwd=Path(__file__).resolve().parents[2],
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 30
        while not (served := re.search(r"serving at (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status, _, body = get(f"{served.group(1)}/repos/{REPO}/commits/main", token=None)
        assert (status, body["sha"]) == (200, repo[1])
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_script_before_start(repo: tuple[Path, str]) -> None:
    sha = "e" * 40
    server = GitHubStandIn(repo[0], REPO)
    server.set_runs(sha, [{"name": "Docs", "id": 77}])
    with server:
        _, _, body = get(f"{server.url}/repos/{REPO}/actions/runs?head_sha={sha}", token=None)
        (run,) = body["workflow_runs"]
        assert run["name"] == "Docs"
        assert run["html_url"] == f"{server.url}/{REPO}/actions/runs/77"
