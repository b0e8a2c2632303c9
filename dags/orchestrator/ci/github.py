"""A thin, bounded GitHub REST client for the two calls the CI gate needs: resolve a ref, list a commit's runs.

``requests`` and ``tenacity`` are imported inside methods: DAG files import this module (through the CI gate
operator) at parse time. Retries run on tenacity; every wait is bounded (attempts, back-off, rate-limit waits) and the
sleep function is injectable so tests run fast.
Requests are conditional: the last ``ETag`` of each URL goes out as ``If-None-Match`` and a ``304`` reuses the cached
answer (with a token, a 304 costs no rate limit), so polling an unchanged commit is nearly free. Without a token
every request costs one of 60 an hour, so `poll_interval_s` spaces anonymous polls to fit that budget.
The token only ever travels in the ``Authorization`` header, and only to ``api_url``: the commit's archive is fetched
from the API's redirect (codeload), whose URL carries its own short-lived token, without it. It is absent from
reprs, log lines and error messages. What the answers mean (names, URLs, rate-limit headers, error statuses, pages of
runs) is read without I/O in ci.github_protocol.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urljoin

from orchestrator.ci.github_protocol import (
    SHA_RE,
    GitHubError,
    GitHubRefError,
    GitHubResponseError,
    GitHubSourceError,
    NotFoundError,
    RateLimit,
    client_error,
    commit_checks_url,
    html_base_url,
    is_rate_limited,
    rate_limit_wait_s,
    runs_page,
    validate_ref,
    validate_repo,
)
from orchestrator.ci.verdict import WorkflowRun

if TYPE_CHECKING:
    import requests
    from tenacity import RetryCallState

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# GitHub returns at most 1,000 runs for a filtered query: 10 pages; the bound guards against a looping Link header.
MAX_PAGES = 20
# The commit's archive as downloaded (gzipped): training code, far below this; a bigger answer is refused, not cut.
MAX_ARCHIVE_BYTES = 256 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass
class _Cached:
    etag: str
    data: Any
    next_link: str | None


@dataclass(eq=False)  # eq would make the exception unhashable
class _Retry(Exception):
    """An attempt worth repeating: why (for the log), the error to raise if it was the last, and how long the server
    asked to wait (None: back off)."""

    reason: str
    final: GitHubError
    wait_s: float | None = None


def _retry_of(state: RetryCallState) -> _Retry:
    # `retry` lets only _Retry outcomes through to `wait` and `before_sleep`.
    assert state.outcome is not None
    return cast(_Retry, state.outcome.exception())


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
        except NotFoundError:
            # GitHub answers a private repository it hides from this caller as it answers a missing ref: tell them
            # apart, so that the message says what to fix.
            self._check_readable()
            raise GitHubRefError(
                f"branch or commit {ref!r} not found in {self.repo}: push it first or check the name"
            ) from None
        sha = data.get("sha") if isinstance(data, dict) else None
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise GitHubResponseError(
                f"GitHub answered no commit sha for {ref!r} in {self.repo}: check that api_url is the REST API"
            )
        if SHA_RE.fullmatch(ref) and sha != ref:
            raise GitHubRefError(f"GitHub resolved sha {ref} to another commit {sha}: check the sha")
        return sha

    def list_workflow_runs(self, sha: str) -> list[WorkflowRun]:
        """Every workflow run (latest attempt as listed by GitHub) whose head_sha is this commit, all pages."""
        if not SHA_RE.fullmatch(sha):
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
            except NotFoundError:
                raise GitHubError(
                    f"repository {self.repo} not found at {self.api_url}, or the token cannot read its Actions"
                ) from None
            batch, total = runs_page(data)
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

    def _session_or_new(self) -> requests.Session:
        import requests

        if self._session is None:
            self._session = requests.Session()
        return self._session

    def _request(
        self,
        url: str,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
        attempt: int,
        *,
        follow: bool = True,
    ) -> requests.Response:
        """One GET to the API; `_Retry` on network errors, 5xx and rate limits, but a rate-limit wait beyond
        `max_wait_s` fails now. `follow` False leaves a redirect to the caller."""
        import requests

        self.requests_sent += 1
        try:
            response = self._session_or_new().get(
                url, params=params, headers=headers, timeout=self.timeout_s, allow_redirects=follow
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            error = GitHubError(
                f"GitHub API unreachable at {url} after {attempt + 1} attempts "
                f"({type(exc).__name__}): check api_url and the network"
            )
            raise _Retry(f"{type(exc).__name__} on GET {url}", error) from None
        status = response.status_code
        if status >= 500:
            error = GitHubError(
                f"GitHub API answered {status} for GET {url} after {attempt + 1} attempts: "
                "GitHub may be degraded (https://www.githubstatus.com); retry later"
            )
            raise _Retry(f"HTTP {status} on GET {url}", error)
        answer_headers = {k.lower(): v for k, v in response.headers.items()}
        self.rate_limit = RateLimit.from_headers(answer_headers) or self.rate_limit
        if is_rate_limited(status, answer_headers, response.text):
            wait = rate_limit_wait_s(answer_headers, self._clock(), attempt, self.backoff_s)
            error = GitHubError(
                f"GitHub API rate limit hit on GET {url} (HTTP {status}; would wait {wait:.0f} s, "
                f"limit {self.max_wait_s:.0f} s): use a token with a higher limit or retry later"
            )
            if wait > self.max_wait_s:
                raise error
            raise _Retry(f"rate limited (HTTP {status}) on GET {url}", error, wait)
        return response

    def _retried(self, attempt_once: Callable[[int], _T]) -> _T:
        """`attempt_once(attempt)` (attempt counts from 0) until it returns or raises anything but `_Retry`, at most
        `max_retries` + 1 times; the last `_Retry` raises its final error."""
        import tenacity

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait_s,
            retry=tenacity.retry_if_exception_type(_Retry),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        attempts = itertools.count()
        try:
            return retrying(lambda: attempt_once(next(attempts)))
        except _Retry as exc:
            raise exc.final from None

    def _wait_s(self, state: RetryCallState) -> float:
        """The server's wait (x-ratelimit-reset or Retry-After) when it gave one, else exponential back-off."""
        wait_s = _retry_of(state).wait_s
        return self.backoff_s * 2 ** (state.attempt_number - 1) if wait_s is None else wait_s

    def _log_retry(self, state: RetryCallState) -> None:
        reason, seconds = _retry_of(state).reason, state.upcoming_sleep
        log.warning("GitHub API: %s; retry %d/%d in %.1f s", reason, state.attempt_number, self.max_retries, seconds)

    def _get_json(self, url: str, params: Mapping[str, str | int] | None = None) -> tuple[Any, str | None]:
        """GET with bounded retries on 5xx, network errors and rate limits; returns (json, next page url)."""
        import requests

        key = requests.Request("GET", url, params=params).prepare().url or url

        def once(attempt: int) -> tuple[Any, str | None]:
            headers = self._headers()
            cached = self._cache.get(key)
            if cached is not None:
                headers["If-None-Match"] = cached.etag
            response = self._request(url, params, headers, attempt)
            status = response.status_code
            if status == 304 and cached is not None:
                self.not_modified += 1
                return cached.data, cached.next_link
            if status >= 400:
                raise client_error(status, url, response.text)
            try:
                data = response.json()
            except (ValueError, json.JSONDecodeError):
                # A cut-off answer may pass; an answer that is never JSON is not the REST API, and no retry helps.
                error = GitHubResponseError(
                    f"GitHub API returned malformed JSON for GET {url} (HTTP {status}) {attempt + 1} times: "
                    "check that api_url points at the GitHub REST API (https://api.github.com or "
                    "https://HOST/api/v3)"
                )
                raise _Retry(f"malformed JSON on GET {url}", error) from None
            next_link = response.links.get("next", {}).get("url")
            etag = response.headers.get("ETag")
            if etag:
                self._cache[key] = _Cached(etag, data, next_link)
            return data, next_link

        return self._retried(once)

    def _unreadable(self) -> GitHubSourceError:
        how = "with the token of its connection" if self.authenticated else "anonymously (the connection has no token)"
        return GitHubSourceError(
            f"repository {self.repo} cannot be read at {self.api_url} {how}: it does not exist or is private. "
            "Check github.repo, and give the GitHub connection (its password) a token that can read it: "
            "a fine-grained token with 'contents: read' and 'actions: read' on this repository"
        )

    def _check_readable(self) -> None:
        try:
            self._get_json(f"{self.api_url}/repos/{self.repo}")
        except NotFoundError:
            raise self._unreadable() from None

    def _archive_location(self, sha: str, attempt: int) -> str:
        """Where the API redirects for the commit's archive (a one-use URL); `_Retry` to try again."""
        url = f"{self.api_url}/repos/{self.repo}/tarball/{sha}"
        response = self._request(url, None, self._headers(), attempt, follow=False)
        location = response.headers.get("Location")
        if response.status_code in _REDIRECTS and location:
            return urljoin(url, location)
        if response.status_code in (403, 404):
            # GitHub answers 404, not 403, for a private repository the caller may not read.
            raise self._unreadable()
        if response.status_code >= 400:
            raise client_error(response.status_code, url, response.text)
        raise GitHubResponseError(
            f"GitHub answered {response.status_code} without a redirect for the archive of {sha} in {self.repo}: "
            "check that api_url points at the GitHub REST API"
        )

    def check_source(self, sha: str) -> None:
        """Fail now, before anything is launched, unless this connection can download the commit's tree.

        Asks for the archive and reads only the redirect: the archive itself is not downloaded."""
        if not SHA_RE.fullmatch(sha):
            raise GitHubRefError(f"check_source needs a full 40-hex sha, got {sha!r}: resolve_ref it first")
        self._retried(lambda attempt: self._archive_location(sha, attempt))

    def download_tarball(self, sha: str, *, max_bytes: int = MAX_ARCHIVE_BYTES) -> bytes:
        """The commit's gzipped archive (GitHub's tarball of exactly this sha), with bounded retries.

        The token goes to the API only. Its redirect target is fetched with no Authorization header: it carries
        its own one-use token, and GitHub's archive host must never see the connection's."""
        import requests

        if not SHA_RE.fullmatch(sha):
            raise GitHubRefError(f"download_tarball needs a full 40-hex sha, got {sha!r}: resolve_ref it first")

        def once(attempt: int) -> bytes:
            # Each attempt asks the API again: the archive URL is good for one use.
            location = self._archive_location(sha, attempt)
            try:
                with self._session_or_new().get(
                    location, timeout=self.timeout_s, stream=True, allow_redirects=False
                ) as response:
                    if response.status_code == 200:
                        return _read_bounded(response, max_bytes, sha)
                    status = response.status_code
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = GitHubError(
                    f"downloading the archive of {sha} failed {attempt + 1} times ({type(exc).__name__}): "
                    "check the network to GitHub's archive host (codeload.github.com)"
                )
                raise _Retry(f"{type(exc).__name__} downloading {sha}", error) from None
            source_error = GitHubSourceError(
                f"GitHub's archive host answered {status} for the archive of {sha} in {self.repo}: "
                "retry later; if it persists, check that the commit is in the repository"
            )
            if status < 500:
                raise source_error
            raise _Retry(f"HTTP {status} downloading {sha}", source_error)

        return self._retried(once)


def _read_bounded(response: requests.Response, max_bytes: int, sha: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_content(_CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise GitHubSourceError(
                f"the archive of commit {sha} exceeds {max_bytes // (1024 * 1024)} MiB: keep data and models out "
                "of the repository (use data_uri for the data)"
            )
    return bytes(data)
