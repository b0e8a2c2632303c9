"""What GitHub's REST API answers mean, with no I/O: ref and repository names, web URLs, rate-limit headers, error
statuses and pages of workflow runs. The HTTP client that sends the requests is ci.github.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from orchestrator.ci.verdict import MalformedRunError, WorkflowRun
from orchestrator.errors import OrchestratorError

RATE_LIMIT_MIN_WAIT_S = 60.0
# GitHub's primary rate limit without a token (per IP): every request counts, a 304 too.
ANONYMOUS_REQUESTS_PER_HOUR = 60
# Kept back from anonymous polling: the gate's first requests, retries, and other callers behind the same IP.
ANONYMOUS_RESERVE = 15
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


class GitHubError(OrchestratorError):
    """A GitHub API call failed; the message names the call and what to check."""


class GitHubRefError(GitHubError):
    """A branch or commit is malformed or does not exist in the repository."""

    # A ref that does not exist will not appear on a retry minutes later.
    terminal = True


class GitHubResponseError(GitHubError):
    """GitHub (or whatever answers at api_url) sent a document this code cannot read: asking again will not help."""


class GitHubCredentialsError(GitHubError):
    """GitHub refused the connection's token (401): no retry helps until the connection is fixed."""

    terminal = True


class GitHubSourceError(GitHubError):
    """The repository's content cannot be read with this connection: private without a token able to read it."""

    terminal = True


class NotFoundError(GitHubError):
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


def repository_url(api_url: str, repo: str) -> str:
    """The repository's web page, as the MLflow run records it (mlflow.source.git.repoURL)."""
    return f"{html_base_url(api_url)}/{repo}"


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


def is_rate_limited(status: int, headers: Mapping[str, str], body: str) -> bool:
    if status == 429:
        return True
    remaining = header_ints(headers, "x-ratelimit-remaining")
    return status == 403 and (
        (bool(remaining) and min(remaining) == 0) or "retry-after" in headers or "rate limit" in body.lower()
    )


def client_error(status: int, url: str, body: str) -> GitHubError:
    if status == 401:
        return GitHubCredentialsError(
            f"GitHub rejected the credentials for GET {url} (401): the token in the GitHub connection's password is "
            "wrong, expired or revoked; replace it (fine-grained, read-only: 'contents' and 'actions' on the repo)"
        )
    if status in (404, 422):
        return NotFoundError(f"HTTP {status} for GET {url}")
    return GitHubError(
        f"GitHub API answered {status} for GET {url}: {_api_message(body)}; "
        "check the repository name and the token's permissions (actions: read, contents: read)"
    )


def runs_page(data: Any) -> tuple[list[WorkflowRun], int | None]:
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
