"""GitHubClient against the GitHub stand-in over real HTTP: resolve, runs, pagination, retries, rate limits."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from embedded.github_standin import ABSENT, GitHubStandIn
from orchestrator import github
from orchestrator.github import (
    GitHubClient,
    GitHubError,
    GitHubRefError,
    GitHubResponseError,
    RateLimit,
    commit_checks_url,
    html_base_url,
    rate_limit_wait_s,
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
    from orchestrator.ci import evaluate_ci

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
