"""A thin, bounded GitHub REST client for the two calls the CI gate needs: resolve a ref, list a commit's runs.

``requests`` is imported inside methods: DAG files import this module (through the CI gate operator) at parse time.
Every wait is bounded (retries, back-off, rate-limit waits) and the sleep function is injectable so tests run fast.
Requests are conditional: the last ``ETag`` of each URL goes out as ``If-None-Match`` and a ``304`` reuses the cached
answer (with a token, a 304 costs no rate limit), so polling an unchanged commit is nearly free. Without a token
every request costs one of 60 an hour, so `poll_interval_s` spaces anonymous polls to fit that budget.
The token only ever travels in the ``Authorization`` header: it is absent from reprs, log lines and error messages.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from orchestrator.ci import MalformedRunError, WorkflowRun
from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# GitHub returns at most 1,000 runs for a filtered query: 10 pages; the bound guards against a looping Link header.
MAX_PAGES = 20
RATE_LIMIT_MIN_WAIT_S = 60.0
# GitHub's primary rate limit without a token (per IP): every request counts, a 304 too.
ANONYMOUS_REQUESTS_PER_HOUR = 60
# Kept back from anonymous polling: the gate's first requests, retries, and other callers behind the same IP.
ANONYMOUS_RESERVE = 15
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


class GitHubError(OrchestratorError):
    """A GitHub API call failed; the message names the call and what to check."""


class GitHubRefError(GitHubError):
    """A branch or commit is malformed or does not exist in the repository."""


class GitHubResponseError(GitHubError):
    """GitHub (or whatever answers at api_url) sent a document this code cannot read: asking again will not help."""


class _NotFoundError(GitHubError):
    """404/422 from the API; callers turn it into a message about what was not found."""


def validate_ref(ref: str) -> str:
    """Refuse anything that is not a plain branch, tag or sha name, before any request is made."""
    if not isinstance(ref, str) or not ref.strip():
        raise GitHubRefError("git ref is empty: give a branch name, a tag or a commit sha")
    ref = ref.strip()
    problems = (
        not _REF_RE.fullmatch(ref),
        ".." in ref,
        "//" in ref,
        ref.endswith(("/", ".", ".lock")),
    )
    if any(problems):
        raise GitHubRefError(
            f"git ref {ref!r} is not a valid branch, tag or sha: use letters, digits and '._/-' only "
            "(no spaces, shell characters or '..')"
        )
    return ref


def validate_repo(repo: str) -> str:
    if not isinstance(repo, str) or not _REPO_RE.fullmatch(repo):
        raise GitHubError(f"repo {repo!r} must look like 'owner/name'")
    return repo


def html_base_url(api_url: str) -> str:
    """The web base of a GitHub API base: api.github.com -> https://github.com, https://HOST/api/v3 -> https://HOST."""
    parts = urlsplit(api_url.rstrip("/"))
    host = parts.netloc
    path = parts.path
    if host.lower() == "api.github.com":
        host = "github.com"
    if path.endswith("/api/v3"):
        path = path[: -len("/api/v3")]
    return f"{parts.scheme}://{host}{path}"


def commit_checks_url(api_url: str, repo: str, sha: str) -> str:
    """The commit's checks page, where every workflow run of that commit is listed."""
    return f"{html_base_url(api_url)}/{repo}/commit/{sha}/checks"


def header_ints(headers: Mapping[str, str], name: str) -> list[int]:
    """The integer values of a header. A header sent twice reaches us comma-joined ("1700000000, 1700000000")."""
    value = headers.get(name) or ""
    return [int(part) for part in (piece.strip() for piece in value.split(",")) if part.isdigit()]


@dataclass(frozen=True)
class RateLimit:
    """GitHub's primary rate limit as the last answer reported it (``x-ratelimit-*``)."""

    limit: int
    remaining: int
    reset: int
    used: int
    resource: str

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        limit, remaining = header_ints(headers, "x-ratelimit-limit"), header_ints(headers, "x-ratelimit-remaining")
        if not limit or not remaining:
            return None
        reset, used = header_ints(headers, "x-ratelimit-reset"), header_ints(headers, "x-ratelimit-used")
        resource = (headers.get("x-ratelimit-resource") or "core").split(",", 1)[0].strip()
        # Repeated headers: the most cautious reading (the lowest budget, the latest reset).
        return cls(min(limit), min(remaining), max(reset, default=0), max(used, default=0), resource)


def rate_limit_wait_s(headers: Mapping[str, str], now: float, attempt: int, backoff_s: float) -> float:
    """How long GitHub asks us to wait: until x-ratelimit-reset, retry-after, or at least a minute, backing off."""
    remaining, reset = header_ints(headers, "x-ratelimit-remaining"), header_ints(headers, "x-ratelimit-reset")
    if remaining and min(remaining) == 0 and reset:
        return max(max(reset) - now, 0.0) + 1.0
    retry_after = header_ints(headers, "retry-after")
    if retry_after:
        return float(max(retry_after))
    return max(RATE_LIMIT_MIN_WAIT_S, backoff_s * 2**attempt)


def poll_interval_s(configured_s: float, authenticated: bool, requests_per_poll: int) -> float:
    """The wait between CI polls. With a token, the configured one (its 304s are free); anonymously, long enough
    that polls costing ``requests_per_poll`` each (pages and retries) stay within GitHub's 60 requests an hour,
    less a reserve, for as long as the gate waits."""
    if authenticated:
        return configured_s
    per_hour = ANONYMOUS_REQUESTS_PER_HOUR - ANONYMOUS_RESERVE
    return max(configured_s, 3600.0 * max(requests_per_poll, 1) / per_hour)


def _is_rate_limited(status: int, headers: Mapping[str, str], body: str) -> bool:
    if status == 429:
        return True
    remaining = header_ints(headers, "x-ratelimit-remaining")
    return status == 403 and (
        (bool(remaining) and min(remaining) == 0) or "retry-after" in headers or "rate limit" in body.lower()
    )


@dataclass
class _Cached:
    etag: str
    data: Any
    next_link: str | None


class GitHubClient:
    """Resolve refs and list workflow runs of one repository, with bounded retries."""

    def __init__(
        self,
        api_url: str,
        repo: str,
        token: str | None = None,
        *,
        session: requests.Session | None = None,
        max_retries: int = 5,
        backoff_s: float = 2.0,
        max_wait_s: float = 900.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 30.0,
    ) -> None:
        if not api_url.startswith(("https://", "http://")):
            raise GitHubError(f"api_url {api_url!r} must start with https:// (e.g. https://api.github.com)")
        self.api_url = api_url.rstrip("/")
        self.repo = validate_repo(repo)
        self._token = token or None
        self._session = session
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._clock = clock
        self.timeout_s = timeout_s
        # Last answer per URL (with its query), for conditional requests.
        self._cache: dict[str, _Cached] = {}
        self.rate_limit: RateLimit | None = None
        self.not_modified = 0
        # Every HTTP request sent (retries and pages included): anonymously, each costs one of the hourly budget.
        self.requests_sent = 0

    def __repr__(self) -> str:
        token = "set" if self._token else "none"
        return f"GitHubClient(api_url={self.api_url!r}, repo={self.repo!r}, token={token})"

    @classmethod
    def from_connection(cls, conn_id: str, api_url: str, repo: str, **kwargs: Any) -> GitHubClient:
        """Token from the Airflow connection's password (empty password: anonymous, public repos only)."""
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        return cls(api_url, repo, conn.password or None, **kwargs)

    @classmethod
    async def afrom_connection(cls, conn_id: str, api_url: str, repo: str, **kwargs: Any) -> GitHubClient:
        """`from_connection` for async code (triggers): sync connection access would block the event loop."""
        from airflow.sdk import BaseHook

        conn = await BaseHook.aget_connection(conn_id)
        return cls(api_url, repo, conn.password or None, **kwargs)

    @property
    def authenticated(self) -> bool:
        return self._token is not None

    @property
    def html_base_url(self) -> str:
        return html_base_url(self.api_url)

    def commit_checks_url(self, sha: str) -> str:
        return commit_checks_url(self.api_url, self.repo, sha)

    def resolve_ref(self, ref: str) -> str:
        """The full 40-hex sha of a branch, tag or (short or full) sha; `GitHubRefError` if it does not exist."""
        ref = validate_ref(ref)
        try:
            data, _ = self._get_json(f"{self.api_url}/repos/{self.repo}/commits/{ref}")
        except _NotFoundError:
            raise GitHubRefError(
                f"branch or commit {ref!r} not found in {self.repo}: push it first or check the name"
            ) from None
        sha = data.get("sha") if isinstance(data, dict) else None
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise GitHubResponseError(
                f"GitHub answered no commit sha for {ref!r} in {self.repo}: check that api_url is the REST API"
            )
        if _SHA_RE.fullmatch(ref) and sha != ref:
            raise GitHubRefError(f"GitHub resolved sha {ref} to another commit {sha}: check the sha")
        return sha

    def list_workflow_runs(self, sha: str) -> list[WorkflowRun]:
        """Every workflow run (latest attempt as listed by GitHub) whose head_sha is this commit, all pages."""
        if not _SHA_RE.fullmatch(sha):
            raise GitHubRefError(f"list_workflow_runs needs a full 40-hex sha, got {sha!r}: resolve_ref it first")
        url: str | None = f"{self.api_url}/repos/{self.repo}/actions/runs"
        params: dict[str, str | int] | None = {"head_sha": sha, "per_page": PER_PAGE, "page": 1}
        runs: list[WorkflowRun] = []
        for page in range(1, MAX_PAGES + 2):
            if url is None:
                break
            if page > MAX_PAGES:
                # Deciding on some of the runs could pass a commit whose red run is on a page not read.
                raise GitHubResponseError(
                    f"GitHub listed more than {MAX_PAGES} pages of workflow runs for commit {sha} in {self.repo}: "
                    "refusing to decide on part of them; check that api_url is the GitHub REST API"
                )
            try:
                data, next_url = self._get_json(url, params)
            except _NotFoundError:
                raise GitHubError(
                    f"repository {self.repo} not found at {self.api_url}, or the token cannot read its Actions"
                ) from None
            batch, total = _runs_page(data)
            runs.extend(batch)
            if next_url is not None:
                self._check_same_origin(next_url)
                url, params = next_url, None
            elif total is not None and len(runs) < total and batch:
                # No Link header (some proxies drop it): page on by number until total_count is reached.
                params = {"head_sha": sha, "per_page": PER_PAGE, "page": page + 1}
            else:
                url = None
        return runs

    def _check_same_origin(self, url: str) -> None:
        # The token goes with every request: never follow a Link to another host.
        if not url.startswith(self.api_url + "/"):
            raise GitHubError(f"GitHub pagination link leads outside {self.api_url}: refusing to follow it")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _get_json(self, url: str, params: Mapping[str, str | int] | None = None) -> tuple[Any, str | None]:
        """GET with bounded retries on 5xx, network errors and rate limits; returns (json, next page url)."""
        import requests

        if self._session is None:
            self._session = requests.Session()
        session = self._session
        key = requests.Request("GET", url, params=params).prepare().url or url
        for attempt in range(self.max_retries + 1):
            last_try = attempt == self.max_retries
            headers = self._headers()
            cached = self._cache.get(key)
            if cached is not None:
                headers["If-None-Match"] = cached.etag
            self.requests_sent += 1
            try:
                response = session.get(url, params=params, headers=headers, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last_try:
                    raise GitHubError(
                        f"GitHub API unreachable at {url} after {attempt + 1} attempts "
                        f"({type(exc).__name__}): check api_url and the network"
                    ) from None
                self._wait(self.backoff_s * 2**attempt, f"{type(exc).__name__} on GET {url}", attempt)
                continue
            status = response.status_code
            if status >= 500:
                if last_try:
                    raise GitHubError(
                        f"GitHub API answered {status} for GET {url} after {attempt + 1} attempts: "
                        "GitHub may be degraded (https://www.githubstatus.com); retry later"
                    )
                self._wait(self.backoff_s * 2**attempt, f"HTTP {status} on GET {url}", attempt)
                continue
            answer_headers = {k.lower(): v for k, v in response.headers.items()}
            self.rate_limit = RateLimit.from_headers(answer_headers) or self.rate_limit
            if status == 304 and cached is not None:
                self.not_modified += 1
                return cached.data, cached.next_link
            if _is_rate_limited(status, answer_headers, response.text):
                wait = rate_limit_wait_s(answer_headers, self._clock(), attempt, self.backoff_s)
                if last_try or wait > self.max_wait_s:
                    raise GitHubError(
                        f"GitHub API rate limit hit on GET {url} (HTTP {status}; would wait {wait:.0f} s, "
                        f"limit {self.max_wait_s:.0f} s): use a token with a higher limit or retry later"
                    )
                self._wait(wait, f"rate limited (HTTP {status}) on GET {url}", attempt)
                continue
            if status >= 400:
                raise _client_error(status, url, response.text)
            try:
                data = response.json()
            except (ValueError, json.JSONDecodeError):
                # A cut-off answer may pass; an answer that is never JSON is not the REST API, and no retry helps.
                if last_try:
                    raise GitHubResponseError(
                        f"GitHub API returned malformed JSON for GET {url} (HTTP {status}) {attempt + 1} times: "
                        "check that api_url points at the GitHub REST API (https://api.github.com or "
                        "https://HOST/api/v3)"
                    ) from None
                self._wait(self.backoff_s * 2**attempt, f"malformed JSON on GET {url}", attempt)
                continue
            next_link = response.links.get("next", {}).get("url")
            etag = response.headers.get("ETag")
            if etag:
                self._cache[key] = _Cached(etag, data, next_link)
            return data, next_link
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")  # pragma: no cover

    def _wait(self, seconds: float, reason: str, attempt: int) -> None:
        log.warning("GitHub API: %s; retry %d/%d in %.1f s", reason, attempt + 1, self.max_retries, seconds)
        self._sleep(seconds)


def _client_error(status: int, url: str, body: str) -> GitHubError:
    if status == 401:
        return GitHubError(
            f"GitHub rejected the credentials for GET {url} (401): check the token in the connection's password"
        )
    if status in (404, 422):
        return _NotFoundError(f"HTTP {status} for GET {url}")
    return GitHubError(
        f"GitHub API answered {status} for GET {url}: {_api_message(body)}; "
        "check the repository name and the token's permissions (actions: read, contents: read)"
    )


def _runs_page(data: Any) -> tuple[list[WorkflowRun], int | None]:
    if not isinstance(data, dict) or not isinstance(data.get("workflow_runs"), list):
        raise GitHubResponseError(
            "GitHub runs answer has no 'workflow_runs' list: check that api_url points at the GitHub REST API"
        )
    total = data.get("total_count")
    try:
        runs = [WorkflowRun.from_api(item) for item in data["workflow_runs"]]
    except MalformedRunError as exc:
        raise GitHubResponseError(
            f"GitHub answered a workflow run this gate cannot read: {exc}. GitHub's own answers always carry it; "
            "check that api_url points at the GitHub REST API, not a proxy or another service"
        ) from exc
    return runs, total if isinstance(total, int) else None


def _api_message(body: str) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else body[:200]
