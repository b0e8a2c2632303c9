"""The GitHub stand-in answers the endpoints the CI gate uses, like GitHub does, over real HTTP."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.services.github_standin import ABSENT, GitHubStandIn

REPO = "local/ec2-trainer"


@pytest.fixture
def standin(repo: tuple[Path, str]) -> Iterator[GitHubStandIn]:
    with GitHubStandIn(repo[0], REPO, token="test-token") as server:
        yield server


def get(url: str, token: str | None = "test-token", etag: str | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if etag:
        request.add_header("If-None-Match", etag)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
            return response.status, dict(response.headers), json.loads(body)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, dict(exc.headers), json.loads(body) if body else None


# What GitHub's REST description (api.github.com, 2022-11-28) requires of a workflow run.
REQUIRED_RUN_FIELDS = {
    "id",
    "node_id",
    "head_branch",
    "run_number",
    "display_title",
    "event",
    "status",
    "conclusion",
    "head_sha",
    "path",
    "workflow_id",
    "url",
    "html_url",
    "created_at",
    "updated_at",
    "head_commit",
    "head_repository",
    "repository",
    "jobs_url",
    "logs_url",
    "check_suite_url",
    "cancel_url",
    "rerun_url",
    "artifacts_url",
    "workflow_url",
    "pull_requests",
}
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-used")


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


@pytest.mark.parametrize("path", ["", "/commits/main", "/actions/runs?head_sha=main", "/tarball/main"])
def test_private_by_default(standin: GitHubStandIn, path: str) -> None:
    # As GitHub hides a private repository: Not Found anonymously, Bad credentials with a wrong token.
    assert get(f"{standin.url}/repos/{REPO}{path}", token=None)[0] == 404
    assert get(f"{standin.url}/repos/{REPO}{path}", token="wrong")[0] == 401


def test_public_repository_answers_anonymous_reads(repo: tuple[Path, str]) -> None:
    with GitHubStandIn(repo[0], REPO, token="test-token", public=True) as public:
        status, _, body = get(f"{public.url}/repos/{REPO}", token=None)
        assert (status, body["private"]) == (200, False)
        assert get(f"{public.url}/repos/{REPO}/commits/main", token=None)[0] == 200


def archive_redirect(standin: GitHubStandIn, ref: str) -> str:
    """The one-use archive URL the tarball endpoint redirects to (redirects are not followed)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    request = urllib.request.Request(f"{standin.url}/repos/{REPO}/tarball/{ref}")
    request.add_header("Authorization", "Bearer test-token")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.build_opener(NoRedirect).open(request, timeout=5)
    assert caught.value.code == 302
    return str(caught.value.headers["Location"])


def download(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_archive_urls_are_one_use(standin: GitHubStandIn) -> None:
    location = archive_redirect(standin, "main")
    assert location.startswith(f"{standin.url}/_codeload/")
    assert download(location) == 200
    assert download(location) == 404
    assert not standin.download_auth_seen


def test_archive_url_refuses_and_records_a_token(standin: GitHubStandIn) -> None:
    location = archive_redirect(standin, "main")
    assert download(location, token="test-token") == 404
    assert standin.download_auth_seen
    # Spent by the refused attempt: a leaked token is never rewarded with the archive.
    assert download(location) == 404


def test_archive_is_the_commit_under_githubs_top_folder(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    with tarfile.open(fileobj=io.BytesIO(standin.archive(repo[1]))) as archive:
        assert archive.getnames() == [f"local-ec2-trainer-{repo[1][:7]}", f"local-ec2-trainer-{repo[1][:7]}/README"]


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
    assert set(run) >= REQUIRED_RUN_FIELDS
    assert run["url"] == f"{standin.url}/repos/{REPO}/actions/runs/{run['id']}"


def test_optional_fields_can_be_absent_and_nullable_ones_null(standin: GitHubStandIn) -> None:
    sha = "a" * 40
    standin.set_runs(sha, [{"name": ABSENT, "run_attempt": ABSENT, "run_started_at": ABSENT}, {"name": None}])
    _, _, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}")
    legacy, unnamed = sorted(body["workflow_runs"], key=lambda r: r["id"])
    assert not {"name", "run_attempt", "run_started_at"} & set(legacy)
    assert unnamed["name"] is None
    assert set(legacy) >= REQUIRED_RUN_FIELDS


def test_a_rerun_is_one_entry_at_its_latest_attempt(standin: GitHubStandIn) -> None:
    sha = "b" * 40
    with pytest.raises(ValueError, match="GitHub lists each run once, at its latest attempt"):
        standin.set_runs(sha, [{"id": 9, "run_attempt": 1}, {"id": 9, "run_attempt": 2}])
    standin.set_runs(sha, [{"id": 9, "run_attempt": 2, "created_at": "2024-05-01T10:00:00Z"}])
    _, _, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}")
    (run,) = body["workflow_runs"]
    # A re-run keeps the first attempt's created_at; run_started_at resets; the previous attempt is linked.
    assert (run["created_at"], run["run_started_at"]) == ("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z")
    assert run["previous_attempt_url"] == f"{standin.url}/repos/{REPO}/actions/runs/9/attempts/1"


@pytest.mark.parametrize(
    ("run", "match"),
    [
        ({"status": "in_progress", "conclusion": "success"}, "has no conclusion yet"),
        ({"status": "done"}, "is not one GitHub reports"),
        ({"id": "x"}, "must be an integer"),
    ],
)
def test_runs_github_would_never_send_are_refused(standin: GitHubStandIn, run: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        standin.set_runs("c" * 40, [run])


def test_etag_and_not_modified(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    url = f"{standin.url}/repos/{REPO}/actions/runs?head_sha={repo[1]}"
    status, headers, _ = get(url)
    etag = headers["ETag"]
    assert (status, etag[:3]) == (200, 'W/"')
    status, headers, body = get(url, etag=etag)
    assert (status, body, headers["ETag"]) == (304, None, etag)
    assert all(name in headers for name in RATE_HEADERS)
    assert get(url, etag='W/"other"')[0] == 200
    # With a token, the 304 cost nothing: two of the three requests counted.
    assert standin.rate_used() == 2
    assert [s.status for s in standin.served(f"/repos/{REPO}/actions/runs")] == [200, 304, 200]


def test_rate_limit_headers_and_a_spent_budget(standin: GitHubStandIn) -> None:
    url = f"{standin.url}/repos/{REPO}/commits/main"
    _, headers, _ = get(url)
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"], headers["x-ratelimit-used"]) == (
        "5000",
        "4999",
        "1",
    )
    assert headers["x-ratelimit-resource"] == "core"
    assert int(headers["x-ratelimit-reset"]) > time.time()
    standin.set_rate_budget(0)
    status, headers, body = get(url)
    assert (status, headers["x-ratelimit-remaining"]) == (403, "0")
    assert "rate limit exceeded" in body["message"]


def test_anonymous_budget_is_60_and_304s_count(repo: tuple[Path, str]) -> None:
    with GitHubStandIn(repo[0], REPO) as server:
        url = f"{server.url}/repos/{REPO}/commits/main"
        _, headers, _ = get(url, token=None)
        assert headers["x-ratelimit-limit"] == "60"
        assert get(url, token=None, etag=headers["ETag"])[0] == 304
        assert server.rate_used(authenticated=False) == 2


def test_script_answers_in_turn_then_repeats_the_last(standin: GitHubStandIn) -> None:
    sha = "c" * 40
    standin.script(sha, [[{"status": "queued"}], [{"status": "in_progress"}], [{"conclusion": "failure"}]])
    url = f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}"
    seen = [get(url)[2]["workflow_runs"][0] for _ in range(4)]
    assert [r["status"] for r in seen] == ["queued", "in_progress", "completed", "completed"]
    assert seen[0]["conclusion"] is None
    assert seen[3]["conclusion"] == "failure"


def test_the_commit_checks_page_a_browser_opens(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    from orchestrator.ci.github_protocol import commit_checks_url

    sha = repo[1]
    standin.script(sha, [[{"name": "lint", "conclusion": "failure"}], [{"name": "lint <b>"}]])
    page_url = commit_checks_url(standin.url, REPO, sha)
    with urllib.request.urlopen(page_url, timeout=5) as response:  # no token: a web page, as on github.com
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert f"<code id='sha'>{sha}</code>" in page
    assert "<td>failure</td>" in page
    # Looking at the page does not move the script on: the API still answers its first entry, then the next.
    assert get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}")[2]["workflow_runs"][0]["name"] == "lint"
    with urllib.request.urlopen(page_url, timeout=5) as response:
        assert "lint &lt;b&gt;" in response.read().decode()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(commit_checks_url(standin.url, REPO, "f" * 40), timeout=5)
    assert missing.value.code == 404


def test_pagination_with_link_header(standin: GitHubStandIn) -> None:
    sha = "d" * 40
    standin.set_runs(sha, [{"id": i, "workflow_id": i} for i in range(1, 251)])
    status, headers, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100&page=3")
    assert (status, body["total_count"], len(body["workflow_runs"])) == (200, 250, 50)
    assert 'rel="next"' not in headers["Link"]
    assert f'head_sha={sha}&per_page=100&page=2>; rel="prev"' in headers["Link"]
    _, headers, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100")
    # Newest first.
    assert [r["id"] for r in body["workflow_runs"]][:2] == [250, 249]
    assert f'head_sha={sha}&per_page=100&page=2>; rel="next"' in headers["Link"]
    assert f'head_sha={sha}&per_page=100&page=3>; rel="last"' in headers["Link"]
    # per_page defaults to 30 and is capped at 100.
    _, _, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}")
    assert len(body["workflow_runs"]) == 30
    _, _, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=500")
    assert len(body["workflow_runs"]) == 100


def test_a_filtered_query_reaches_1000_runs_at_most(standin: GitHubStandIn) -> None:
    sha = "f" * 40
    standin.set_runs(sha, [{"id": i, "workflow_id": i} for i in range(1, 1101)])
    _, headers, body = get(f"{standin.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100&page=11")
    assert (body["total_count"], body["workflow_runs"]) == (1100, [])
    assert 'rel="next"' not in headers["Link"]


def test_faults(standin: GitHubStandIn) -> None:
    url = f"{standin.url}/repos/{REPO}/commits/main"
    standin.fail_next(2, status=503)
    assert [get(url)[0] for _ in range(3)] == [503, 503, 200]
    # Bracketed by the clock before and after, not compared with "now" less a margin: a loaded machine may take any
    # number of seconds between the two calls.
    before = int(time.time())
    standin.rate_limit_next(30)
    after = int(time.time())
    status, headers, _ = get(url)
    assert status == 403
    assert headers["x-ratelimit-remaining"] == "0"
    assert before + 30 <= int(headers["x-ratelimit-reset"]) <= after + 30
    standin.rate_limit_next(30, repeat_headers=True)
    request = urllib.request.Request(url, headers={"Authorization": "Bearer test-token"})
    with pytest.raises(urllib.error.HTTPError, match="403") as excinfo:
        urllib.request.urlopen(request, timeout=5)
    assert len(excinfo.value.headers.get_all("x-ratelimit-reset")) == 2
    standin.malformed_next()
    request = urllib.request.Request(url, headers={"Authorization": "Bearer test-token"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        json.loads(body)
    assert standin.request_count("/repos/local/ec2-trainer/commits/main") == 6


def test_runs_as_a_module(repo: tuple[Path, str], tmp_path: Path) -> None:
    log = tmp_path / "standin.log"
    with log.open("wb") as sink:
        # Port 0: the server takes a free port itself and logs it (a port picked here could be taken meanwhile).
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedded.services.github_standin", "--repo-dir", str(repo[0]), "--port", "0"],
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
