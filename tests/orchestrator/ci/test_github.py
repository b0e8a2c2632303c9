"""GitHubClient against the GitHub stand-in over real HTTP: resolve, runs, pagination, retries, rate limits."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from embedded.services.github_standin import ABSENT, GitHubStandIn
from orchestrator.ci import github
from orchestrator.ci.github import GitHubClient
from orchestrator.ci.github_protocol import (
    GitHubCredentialsError,
    GitHubError,
    GitHubRefError,
    GitHubResponseError,
    GitHubSourceError,
    RateLimit,
    commit_checks_url,
    html_base_url,
    rate_limit_wait_s,
    repository_url,
    validate_ref,
)

REPO = "local/ec2-trainer"
TOKEN = "ghp_test_token_value_123"


@pytest.fixture
def standin(repo: tuple[Path, str]) -> Iterator[GitHubStandIn]:
    with GitHubStandIn(repo[0], REPO, token=TOKEN) as server:
        yield server


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client_for(standin: GitHubStandIn, sleeps: Sleeps | None = None, **kwargs: object) -> GitHubClient:
    return GitHubClient(standin.url, REPO, TOKEN, sleep=sleeps or Sleeps(), backoff_s=0.5, **kwargs)  # type: ignore[arg-type]


def test_resolve_branch_and_shas(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    client = client_for(standin)
    sha = repo[1]
    assert client.resolve_ref("main") == sha
    assert client.resolve_ref(sha[:10]) == sha
    assert client.resolve_ref(sha) == sha
    # A full sha is still checked to exist.
    assert standin.request_count(f"/repos/{REPO}/commits/{sha}") == 1


@pytest.mark.parametrize("ref", ["no-such-branch", "e" * 40])
def test_unknown_ref_gives_a_clear_error(standin: GitHubStandIn, ref: str) -> None:
    with pytest.raises(GitHubRefError, match=f"branch or commit '{ref}' not found in {REPO}: push it first"):
        client_for(standin).resolve_ref(ref)


@pytest.mark.parametrize(
    "ref", ["main; rm -rf /", "a b", "x..y", "$(id)", "-rf", "feat/", "a//b", "`x`", "x.lock", "", "ma|in"]
)
def test_bad_ref_refused_before_any_request(standin: GitHubStandIn, ref: str) -> None:
    with pytest.raises(GitHubRefError, match=r"not a valid branch|is empty"):
        client_for(standin).resolve_ref(ref)
    assert standin.total_requests == 0


def test_validate_ref_accepts_usual_names() -> None:
    for ref in ("main", "feature/new-model", "v1.2.3", "release_2024", "a" * 40):
        assert validate_ref(ref) == ref


def test_list_runs_with_pagination_over_100(standin: GitHubStandIn) -> None:
    sha = "1" * 40
    standin.set_runs(sha, [{"id": i, "workflow_id": i, "name": f"wf{i}"} for i in range(1, 231)])
    runs = client_for(standin).list_workflow_runs(sha)
    # Newest first, as GitHub lists them; every page read through the Link header.
    assert [r.id for r in runs] == list(range(230, 0, -1))
    assert standin.request_count(f"/repos/{REPO}/actions/runs") == 3


def test_pagination_is_bounded(standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = "1" * 40
    standin.set_runs(sha, [{"id": i, "workflow_id": i} for i in range(1, 231)])
    monkeypatch.setattr(github, "MAX_PAGES", 2)
    with pytest.raises(GitHubResponseError, match=r"more than 2 pages of workflow runs .* refusing to decide"):
        client_for(standin).list_workflow_runs(sha)
    assert standin.request_count(f"/repos/{REPO}/actions/runs") == 2


def test_runs_as_github_shapes_them_are_read(standin: GitHubStandIn) -> None:
    sha = "8" * 40
    standin.set_runs(
        sha,
        [
            # Recorded from the real API in 2020-2021: no name at all.
            {"id": 1, "workflow_id": 11, "name": ABSENT, "path": ".github/workflows/build.yml"},
            {"id": 2, "workflow_id": 12, "name": None, "path": ABSENT, "run_attempt": ABSENT},
            {"id": 3, "workflow_id": 13, "status": None, "conclusion": None, "run_started_at": ABSENT},
        ],
    )
    runs = {r.id: r for r in client_for(standin).list_workflow_runs(sha)}
    assert [runs[i].label for i in (1, 2, 3)] == ["build.yml", "workflow 12", "CI"]
    assert (runs[2].run_attempt, runs[3].status, runs[3].started_at) == (1, None, runs[3].created_at)


def test_polling_an_unchanged_commit_costs_one_full_answer(standin: GitHubStandIn) -> None:
    sha = "9" * 40
    standin.set_runs(sha, [{"status": "in_progress"}])
    client = client_for(standin)
    polls = 5
    for _ in range(polls):
        (run,) = client.list_workflow_runs(sha)
        assert run.status == "in_progress"
    served = standin.served(f"/repos/{REPO}/actions/runs")
    assert [s.status for s in served] == [200] + [304] * (polls - 1)
    assert [s.conditional for s in served] == [False] + [True] * (polls - 1)
    # With a token a 304 is free: the whole wait cost one request of the hourly budget.
    assert standin.rate_used() == 1
    assert client.not_modified == polls - 1
    assert client.rate_limit == RateLimit(5000, 4999, client.rate_limit.reset, 1, "core")  # type: ignore[union-attr]
    standin.set_runs(sha, [{"status": "completed", "conclusion": "success"}])
    (run,) = client.list_workflow_runs(sha)
    assert (run.status, run.conclusion) == ("completed", "success")
    assert [s.status for s in standin.served(f"/repos/{REPO}/actions/runs")][-1] == 200


def test_anonymous_304s_still_count(repo: tuple[Path, str]) -> None:
    with GitHubStandIn(repo[0], REPO) as open_standin:
        client = GitHubClient(open_standin.url, REPO, sleep=Sleeps())
        for _ in range(3):
            client.list_workflow_runs("9" * 40)
        assert client.not_modified == 2
        assert open_standin.rate_used(authenticated=False) == 3
        assert client.rate_limit is not None and client.rate_limit.limit == 60


def test_spent_budget_is_a_rate_limit(standin: GitHubStandIn) -> None:
    standin.set_rate_budget(0)
    with pytest.raises(GitHubError, match=r"rate limit hit .* limit 600 s"):
        client_for(standin, max_wait_s=600).resolve_ref("main")


def test_list_runs_needs_a_full_sha(standin: GitHubStandIn) -> None:
    with pytest.raises(GitHubRefError, match="needs a full 40-hex sha"):
        client_for(standin).list_workflow_runs("main")


def test_patterns_match_whole_values_not_a_trailing_newline(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    with pytest.raises(GitHubRefError, match="needs a full 40-hex sha"):
        client_for(standin).list_workflow_runs(repo[1] + "\n")
    with pytest.raises(GitHubError, match="must look like 'owner/name'"):
        GitHubClient(standin.url, REPO + "\n")
    assert standin.total_requests == 0
    # A ref is stripped before it is checked, so a newline typed after it is dropped rather than refused.
    assert validate_ref("main\n") == "main"


def test_5xx_retried_with_backoff_then_success(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sleeps = Sleeps()
    standin.fail_next(3, status=502)
    assert client_for(standin, sleeps).resolve_ref("main") == repo[1]
    assert sleeps.calls == [0.5, 1.0, 2.0]


def test_5xx_exhaustion_is_an_error(standin: GitHubStandIn) -> None:
    sleeps = Sleeps()
    standin.fail_next(10, status=503)
    with pytest.raises(GitHubError, match=r"answered 503 .* after 3 attempts"):
        client_for(standin, sleeps, max_retries=2).resolve_ref("main")
    assert len(sleeps.calls) == 2


def test_rate_limit_waits_until_reset(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sleeps = Sleeps()
    standin.rate_limit_next(reset_in_s=120)
    assert client_for(standin, sleeps).resolve_ref("main") == repo[1]
    (wait,) = sleeps.calls
    assert 118 <= wait <= 122


def test_repeated_rate_limit_headers_are_read(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sleeps = Sleeps()
    standin.rate_limit_next(reset_in_s=120, repeat_headers=True)
    assert client_for(standin, sleeps).resolve_ref("main") == repo[1]
    (wait,) = sleeps.calls
    assert 118 <= wait <= 122, f"waited {wait} s: the comma-joined reset header was not read"


def test_rate_limit_longer_than_the_bound_is_an_error(standin: GitHubStandIn) -> None:
    standin.rate_limit_next(reset_in_s=3600)
    with pytest.raises(GitHubError, match=r"rate limit hit .* limit 600 s"):
        client_for(standin, max_wait_s=600).resolve_ref("main")


def test_rate_limit_wait_rules() -> None:
    now = 1_000_000.0
    assert rate_limit_wait_s({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1000030"}, now, 0, 2) == 31
    assert rate_limit_wait_s({"retry-after": "7"}, now, 0, 2) == 7
    assert rate_limit_wait_s({}, now, 0, 2) == 60
    assert rate_limit_wait_s({}, now, 6, 2) == 128
    # A header sent twice arrives comma-joined; differing copies: the lowest budget and the latest reset win.
    joined = {"x-ratelimit-remaining": "0, 0", "x-ratelimit-reset": "1000030, 1000040"}
    assert rate_limit_wait_s(joined, now, 0, 2) == 41
    assert rate_limit_wait_s({"retry-after": "7, 7"}, now, 0, 2) == 7


class ScriptedSession:
    """A requests.Session stand-in giving these (status, headers) answers in turn, then the commit."""

    def __init__(self, *answers: tuple[int, dict[str, str]]) -> None:
        self.answers = list(answers)

    def get(self, url: str, **_: Any) -> Any:
        import requests

        status, headers = self.answers.pop(0) if self.answers else (200, {})
        response = requests.Response()
        response.url, response.status_code = url, status
        response.headers.update(headers)
        response._content = json.dumps({"sha": "a" * 40} if status == 200 else {"message": "slow down"}).encode()
        return response


NOW = 1_000_000.0


def scripted_client(session: ScriptedSession, sleeps: Sleeps, **kwargs: Any) -> GitHubClient:
    return GitHubClient(
        "https://api.github.com",
        "acme/cnn",
        TOKEN,
        session=session,  # type: ignore[arg-type]
        sleep=sleeps,
        clock=lambda: NOW,
        **kwargs,
    )


def test_the_server_given_waits_are_slept_not_the_back_off(caplog: pytest.LogCaptureFixture) -> None:
    sleeps = Sleeps()
    session = ScriptedSession(
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 5)}), (429, {"Retry-After": "7"})
    )
    client = scripted_client(session, sleeps)
    with caplog.at_level(logging.WARNING):
        assert client.resolve_ref("main") == "a" * 40
    # Until the reset 5 s ahead, plus 1 s as the reset is in whole seconds; then Retry-After as given.
    assert sleeps.calls == [6.0, 7.0]
    assert client.requests_sent == 3
    assert "rate limited (HTTP 429) on GET https://api.github.com/repos/acme/cnn/commits/main" in caplog.text
    assert "retry 2/5 in 7.0 s" in caplog.text


def test_a_reset_beyond_the_bound_fails_at_once_without_sleeping() -> None:
    sleeps = Sleeps()
    session = ScriptedSession((403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 3600)}))
    client = scripted_client(session, sleeps, max_wait_s=600)
    with pytest.raises(GitHubError, match=r"rate limit hit .* \(HTTP 403; would wait 3601 s, limit 600 s\): use a"):
        client.resolve_ref("main")
    assert (sleeps.calls, client.requests_sent) == ([], 1)


def test_one_cut_off_answer_is_retried(standin: GitHubStandIn) -> None:
    sleeps = Sleeps()
    standin.malformed_next()
    assert len(client_for(standin, sleeps).list_workflow_runs("2" * 40)) == 1
    assert sleeps.calls == [0.5]


def test_answers_that_are_never_json_are_a_clear_final_error(standin: GitHubStandIn) -> None:
    standin.malformed_next(10)
    with pytest.raises(GitHubResponseError, match=r"malformed JSON .* 3 times: .* points at the GitHub REST API"):
        client_for(standin, max_retries=2).list_workflow_runs("2" * 40)


def test_malformed_run_is_a_clear_final_error(standin: GitHubStandIn) -> None:
    sha = "3" * 40
    standin.malformed_next(payload={"total_count": 1, "workflow_runs": [{"id": "not-an-int"}]})
    with pytest.raises(GitHubResponseError, match=r"'id' must be an integer.* api_url points at the GitHub REST API"):
        client_for(standin).list_workflow_runs(sha)
    assert standin.request_count(f"/repos/{REPO}/actions/runs") == 1, "no retry can fix it: none was made"


def test_wrong_token_is_401(standin: GitHubStandIn) -> None:
    client = GitHubClient(standin.url, REPO, "wrong", sleep=Sleeps())
    with pytest.raises(GitHubError, match=r"rejected the credentials .* connection's password"):
        client.resolve_ref("main")


def test_anonymous_client_sends_no_authorization(repo: tuple[Path, str]) -> None:
    with GitHubStandIn(repo[0], REPO) as open_standin:
        assert GitHubClient(open_standin.url, REPO).resolve_ref("main") == repo[1]


def test_token_never_in_repr_or_logs(standin: GitHubStandIn, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sleeps = Sleeps()
    client = client_for(standin, sleeps, max_retries=1)
    assert TOKEN not in repr(client)
    assert "token=set" in repr(client)
    standin.fail_next(5)
    with pytest.raises(GitHubError, match="answered 502") as excinfo:
        client.resolve_ref("main")
    assert TOKEN not in str(excinfo.value)
    assert "retry 1/1" in caplog.text
    assert TOKEN not in caplog.text


def test_html_base_urls() -> None:
    assert html_base_url("https://api.github.com") == "https://github.com"
    assert html_base_url("https://ghe.example.com/api/v3/") == "https://ghe.example.com"
    assert html_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    sha = "f" * 40
    assert commit_checks_url("https://api.github.com", "o/r", sha) == f"https://github.com/o/r/commit/{sha}/checks"
    client = GitHubClient("https://ghe.example.com/api/v3", "o/r")
    assert client.commit_checks_url(sha) == f"https://ghe.example.com/o/r/commit/{sha}/checks"


def test_bad_construction() -> None:
    with pytest.raises(GitHubError, match="must look like 'owner/name'"):
        GitHubClient("https://api.github.com", "just-a-name")
    with pytest.raises(GitHubError, match="must start with https://"):
        GitHubClient("api.github.com", "o/r")


def test_unreachable_api_is_bounded() -> None:
    sleeps = Sleeps()
    client = GitHubClient("http://127.0.0.1:9", "o/r", sleep=sleeps, max_retries=2, timeout_s=1)
    with pytest.raises(GitHubError, match=r"unreachable .* after 3 attempts"):
        client.resolve_ref("main")
    assert len(sleeps.calls) == 2


def test_from_connection_reads_the_password(
    airflow_db: Path, monkeypatch: pytest.MonkeyPatch, standin: GitHubStandIn, repo: tuple[Path, str]
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_GITHUB_CLIENT_TEST", f'{{"conn_type": "http", "password": "{TOKEN}"}}')
    client = GitHubClient.from_connection("github_client_test", standin.url, REPO)
    assert client.resolve_ref("main") == repo[1]
    assert TOKEN not in repr(client)


class _RunsServer:
    """A local HTTP server answering GitHub's `GET /repos/{repo}/actions/runs` from a list, counting requests.

    ``link`` (a function of the page) sets the `Link` header; None sends none, as a proxy that drops it would."""

    def __init__(self, runs: list[dict[str, object]], link: Callable[[int], str | None] = lambda page: None) -> None:
        owner = self
        self.runs, self.link, self.requests = runs, link, 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                query = parse_qs(urlsplit(self.path).query)
                per_page, page = int(query.get("per_page", ["30"])[0]), int(query.get("page", ["1"])[0])
                chunk = owner.runs[(page - 1) * per_page : page * per_page]
                body = json.dumps({"total_count": len(owner.runs), "workflow_runs": chunk}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                link = owner.link(page)
                if link:
                    self.send_header("Link", link)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run(i: int, sha: str, conclusion: str = "success") -> dict[str, object]:
    return {
        "id": 1000 + i,
        "name": f"CI {i}",
        "workflow_id": 1000 + i,
        "head_sha": sha,
        "status": "completed",
        "conclusion": conclusion,
        "run_attempt": 1,
        "html_url": f"https://github.com/{REPO}/actions/runs/{1000 + i}",
        "created_at": "2026-01-01T00:00:00Z",
        "run_started_at": "2026-01-01T00:00:00Z",
    }


def test_a_link_to_another_host_is_refused_with_no_request_sent_there() -> None:
    sha = "a" * 40
    foreign = _RunsServer([_run(i, sha) for i in range(230)])
    own = _RunsServer(
        [_run(i, sha) for i in range(230)],
        link=lambda page: f'<{foreign.url}/repos/{REPO}/actions/runs?head_sha={sha}&per_page=100&page=2>; rel="next"',
    )
    try:
        client = GitHubClient(own.url, REPO, TOKEN, sleep=Sleeps())
        with pytest.raises(GitHubError, match=f"pagination link leads outside {own.url}: refusing to follow it"):
            client.list_workflow_runs(sha)
        assert (own.requests, foreign.requests) == (1, 0)
    finally:
        own.close()
        foreign.close()


def test_230_runs_without_link_headers_are_all_read_a_failure_on_page_3_too() -> None:
    from orchestrator.ci.verdict import evaluate_ci

    sha = "b" * 40
    runs = [_run(i, sha, "failure" if i == 215 else "success") for i in range(230)]
    server = _RunsServer(runs)
    try:
        read = GitHubClient(server.url, REPO, TOKEN, sleep=Sleeps()).list_workflow_runs(sha)
        assert server.requests == 3
    finally:
        server.close()
    assert [run.id for run in read] == [run["id"] for run in runs]
    verdict = evaluate_ci(read, ())
    assert verdict.state == "failed"
    assert "CI 215" in verdict.message


# --- the commit's archive ---------------------------------------------------------------------------------------


def test_download_tarball_sends_the_token_to_the_api_only(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sha = repo[1]
    data = client_for(standin).download_tarball(sha)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert f"local-ec2-trainer-{sha[:7]}/README" in archive.getnames()
    assert [s.status for s in standin.served(f"/repos/{REPO}/tarball/{sha}")] == [302]
    assert [s.status for s in standin.served_prefix("/_codeload/")] == [200]
    # The stand-in refuses an archive request that carries a token; this proves none did.
    assert not standin.download_auth_seen


def test_download_tarball_retries_with_a_fresh_one_use_url(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    sleeps = Sleeps()
    standin.fail_next(1, status=502)
    assert client_for(standin, sleeps).download_tarball(repo[1])
    assert sleeps.calls == [0.5]


def test_download_tarball_is_bounded(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    with pytest.raises(GitHubSourceError, match="exceeds 0 MiB: keep data and models out"):
        client_for(standin).download_tarball(repo[1], max_bytes=10)


def test_check_source_reads_the_redirect_only(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    client_for(standin).check_source(repo[1])
    assert standin.served_prefix("/_codeload/") == []


def test_private_repository_without_a_token_says_what_to_do(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    anonymous = GitHubClient(standin.url, REPO, None, sleep=Sleeps())
    message = r"cannot be read .* anonymously .* it does not exist or is private.*'contents: read'"
    with pytest.raises(GitHubSourceError, match=message):
        anonymous.resolve_ref("main")
    with pytest.raises(GitHubSourceError, match=message):
        anonymous.check_source(repo[1])
    with pytest.raises(GitHubSourceError, match=message):
        anonymous.download_tarball(repo[1])


def test_a_missing_ref_in_a_readable_repository_stays_a_ref_error(standin: GitHubStandIn) -> None:
    with pytest.raises(GitHubRefError, match="not found in local/ec2-trainer: push it first"):
        client_for(standin).resolve_ref("no-such-branch")


def test_a_wrong_token_is_a_credentials_error(standin: GitHubStandIn, repo: tuple[Path, str]) -> None:
    wrong = GitHubClient(standin.url, REPO, "ghp_wrong", sleep=Sleeps())
    with pytest.raises(GitHubCredentialsError, match="wrong, expired or revoked") as caught:
        wrong.check_source(repo[1])
    assert "ghp_wrong" not in str(caught.value)


def test_repository_url_is_the_web_page_of_the_repository() -> None:
    assert repository_url("https://api.github.com", "acme/cnn") == "https://github.com/acme/cnn"
    assert repository_url("https://ghe.example.com/api/v3", "acme/cnn") == "https://ghe.example.com/acme/cnn"


class RecordingSession:
    """A requests.Session stand-in answering as api.github.com and codeload.github.com do, recording each request."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self.calls: list[tuple[str, dict[str, str], bool]] = []

    def get(self, url: str, *, headers: Any = None, allow_redirects: bool = True, **_: Any) -> Any:
        import requests

        self.calls.append((url, dict(headers or {}), allow_redirects))
        response = requests.Response()
        response.url, response._content_consumed = url, True
        if url.startswith("https://api.github.com/"):
            response.status_code, response._content = 302, b""
            response.headers["Location"] = "https://codeload.github.com/acme/cnn/legacy.tar.gz/abc?token=ONE_USE"
        else:
            response.status_code, response._content = 200, self.archive
        return response


def test_the_token_goes_to_the_api_origin_and_never_to_the_archive_host() -> None:
    session = RecordingSession(b"gzipped archive")
    client = GitHubClient("https://api.github.com", "acme/cnn", TOKEN, session=session)  # type: ignore[arg-type]
    assert client.download_tarball("a" * 40) == b"gzipped archive"
    (api_url, api_headers, api_follows), (archive_url, archive_headers, archive_follows) = session.calls
    assert api_url == f"https://api.github.com/repos/acme/cnn/tarball/{'a' * 40}"
    assert api_headers["Authorization"] == f"Bearer {TOKEN}"
    # Not followed by requests (which would decide itself what to send on): the client fetches it, bare.
    assert not api_follows and not archive_follows
    assert archive_url == "https://codeload.github.com/acme/cnn/legacy.tar.gz/abc?token=ONE_USE"
    assert not any(TOKEN in value for value in archive_headers.values())
    assert "Authorization" not in archive_headers
