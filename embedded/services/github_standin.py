"""A local stand-in for the few GitHub REST endpoints the CI gate calls, for the embedded default and the tests.

Serves, on 127.0.0.1 and a free port, shaped by GitHub's REST description (API version 2022-11-28):
- ``GET /repos/{owner}/{repo}/commits/{ref}``: resolved with ``git rev-parse`` in a local repository
  (404 for an unknown name, 422 for an unknown sha);
- ``GET /repos/{owner}/{repo}``: the repository's metadata (name, ``private``);
- ``GET /repos/{owner}/{repo}/tarball/{ref}``: ``302`` to a one-use, codeload-style archive URL on this server
  (``/_codeload/{one-use token}``), which answers ``git archive`` of the commit once, with GitHub's top folder
  ``owner-repo-<short sha>/``; it refuses a second download and any request carrying an ``Authorization`` header
  (the connection's token must never reach the archive host: ``download_auth_seen`` records it if it does);
- ``GET /repos/{owner}/{repo}/actions/runs?head_sha=&per_page=&page=``: scripted workflow runs, newest first, each
  run id listed once at its latest attempt, every field the description requires (nullable ones may be null, optional
  ones absent: ``ABSENT``), paginated (``per_page`` up to 100, a ``Link`` header with next/last/first/prev, at most
  1,000 results for a filtered query).

And, as github.com serves it for a browser (no token, no rate limit), the commit's checks page
``GET /{owner}/{repo}/commit/{sha}/checks``: a small HTML page listing the commit's workflow runs, which the CI gate's
"GitHub Actions" link opens.

Given a token, the repository is private (unless ``public=True``): as on GitHub, an anonymous request to its API
answers 404 and a wrong token 401. Without a token the repository is public.
Like GitHub, every API answer carries an ``ETag`` and the ``x-ratelimit-*`` headers; a matching ``If-None-Match`` is
answered ``304 Not Modified``, which costs no rate limit when the request carries a token; a spent budget answers 403.
A sha with nothing scripted answers one completed, successful workflow named "CI": the embedded default's local HEAD
is "green" with no set-up. Faults (5xx, rate limits, malformed answers) can be injected for the next requests.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from embedded.services.github_http import Fault, GitHubHandler, Served
from embedded.services.http_service import LoopbackHttpServer

log = logging.getLogger(__name__)

# Primary rate limits per hour: a personal token, and an anonymous caller (per IP).
TOKEN_RATE_LIMIT = 5000
ANONYMOUS_RATE_LIMIT = 60
_RATE_WINDOW_S = 3600
_STATUSES = frozenset({"requested", "in_progress", "completed", "queued", "pending", "waiting", None})
# Scripted runs without timestamps get created_at = this + id minutes: a higher id is a newer run, as on GitHub.
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()
"""A scripted field set to ABSENT is left out of the answer (runs recorded in 2020-2021 have no ``name``)."""


@dataclass
class _RateWindow:
    limit: int
    used: int = 0
    reset: int = 0

    def roll(self, now: float) -> None:
        if now >= self.reset:
            self.used, self.reset = 0, int(now) + _RATE_WINDOW_S

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(max(self.limit - self.used, 0)),
            "x-ratelimit-reset": str(self.reset),
            "x-ratelimit-used": str(self.used),
            "x-ratelimit-resource": "core",
        }


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    scripts: dict[str, collections.deque[list[dict[str, Any]]]] = field(default_factory=dict)
    faults: collections.deque[Fault] = field(default_factory=collections.deque)
    served: list[Served] = field(default_factory=list)
    # One-use archive URLs handed out by the tarball redirect, and the sha each downloads.
    tickets: dict[str, str] = field(default_factory=dict)
    download_auth_seen: bool = False
    rates: dict[bool, _RateWindow] = field(
        default_factory=lambda: {True: _RateWindow(TOKEN_RATE_LIMIT), False: _RateWindow(ANONYMOUS_RATE_LIMIT)}
    )
    next_id: int = 1000


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


class GitHubStandIn:
    """A threaded stdlib HTTP server answering like the GitHub Actions API for one local repository."""

    def __init__(
        self,
        repo_dir: Path,
        repo: str = "local/ec2-trainer",
        token: str | None = None,
        *,
        port: int = 0,
        public: bool = False,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.repo = repo
        self._token = token
        # Nobody could read a private repository without a token to hold: with none, it is public.
        self.private = token is not None and not public
        self._port = port
        self._state = _State()
        self._http: LoopbackHttpServer | None = None

    def __repr__(self) -> str:
        return f"GitHubStandIn(repo={self.repo!r}, url={self.url if self._http else None!r})"

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the GitHub stand-in is not started: call start() first")
        return self._http.base_url

    def start(self) -> str:
        """Start serving in a daemon thread; return the API base URL."""
        handler = type("_BoundHandler", (GitHubHandler,), {"standin": self})
        self._http = LoopbackHttpServer(handler, self._port, "github-standin")
        log.info("GitHub stand-in for %s (%s) serving at %s", self.repo, self.repo_dir, self.url)
        return self.url

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    def __enter__(self) -> GitHubStandIn:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- scenario API ----------------------------------------------------------------------------------------

    def set_runs(self, sha: str, runs: Sequence[Mapping[str, Any]]) -> None:
        """Every poll for this sha answers these runs."""
        self.script(sha, [runs])

    def script(self, sha: str, answers: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        """Successive polls for this sha answer these run lists in turn; the last one then repeats.

        Each run is a partial workflow run: what it leaves out gets GitHub's shape (``id`` fresh, ``name`` "CI",
        ``workflow_id`` 1, completed/success, attempt 1, timestamps growing with the id). A re-run is the same
        ``id`` with a higher ``run_attempt``: GitHub lists a run once, at its latest attempt, with a new
        ``run_started_at`` and the ``created_at`` of its first attempt.
        """
        if not answers:
            raise ValueError("script() needs at least one list of runs (an empty list means 'no runs yet')")
        with self._state.lock:
            filled = [self._fill_all(sha, runs) for runs in answers]
            self._state.scripts[sha] = collections.deque(filled)

    def fail_next(self, n: int = 1, status: int = 502) -> None:
        """The next n requests (any path) answer this HTTP status."""
        body = json.dumps({"message": "Server Error"}).encode()
        with self._state.lock:
            self._state.faults.extend(Fault(status, body) for _ in range(n))

    def rate_limit_next(self, reset_in_s: int, *, repeat_headers: bool = False) -> None:
        """The next request answers 403 with x-ratelimit-remaining: 0 and a reset reset_in_s from now.

        ``repeat_headers`` sends each rate-limit header twice, as a proxy that merges upstream headers may do.
        """
        reset = str(int(time.time()) + reset_in_s)
        body = json.dumps({"message": "API rate limit exceeded"}).encode()
        headers = [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset), ("x-ratelimit-limit", "60")]
        if repeat_headers:
            headers += headers
        with self._state.lock:
            self._state.faults.append(Fault(403, body, tuple(headers)))

    def malformed_next(self, n: int = 1, payload: Any = ABSENT, *, path: str | None = None) -> None:
        """The next n requests (to ``path`` only, if given) answer 200 with this JSON payload, or (by default) a
        body that is not JSON."""
        body = b"{this is not json" if payload is ABSENT else json.dumps(payload).encode()
        with self._state.lock:
            self._state.faults.extend(Fault(200, body, path=path) for _ in range(n))

    def set_rate_budget(self, remaining: int, *, authenticated: bool = True) -> None:
        """Spend the current hour's primary rate limit down to ``remaining`` requests."""
        with self._state.lock:
            window = self._state.rates[authenticated]
            window.roll(time.time())
            window.used = window.limit - remaining

    def rate_used(self, *, authenticated: bool = True) -> int:
        """Requests counted against this hour's primary rate limit (304s with a token are free)."""
        with self._state.lock:
            window = self._state.rates[authenticated]
            window.roll(time.time())
            return window.used

    def served(self, path: str) -> list[Served]:
        """Every request to this path (query string excluded), in order."""
        with self._state.lock:
            return [s for s in self._state.served if s.path == path]

    def served_prefix(self, prefix: str) -> list[Served]:
        """Every request to a path starting with this prefix (the one-use archive URLs), in order."""
        with self._state.lock:
            return [s for s in self._state.served if s.path.startswith(prefix)]

    def request_count(self, path: str) -> int:
        """How many requests reached this path (query string excluded)."""
        return len(self.served(path))

    @property
    def download_auth_seen(self) -> bool:
        """Whether any request to the archive URLs carried an Authorization header (the token leaked there)."""
        with self._state.lock:
            return self._state.download_auth_seen

    @property
    def total_requests(self) -> int:
        with self._state.lock:
            return len(self._state.served)

    # --- answers ---------------------------------------------------------------------------------------------

    def _fill_all(self, sha: str, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        filled = [self._fill(sha, dict(run)) for run in runs]
        ids = [run["id"] for run in filled]
        if len(ids) != len(set(ids)):
            raise ValueError(
                f"run ids {ids} repeat: GitHub lists each run once, at its latest attempt "
                "(script a re-run as the same id with a higher run_attempt)"
            )
        # Newest first, like the API.
        return sorted(filled, key=lambda run: (run["created_at"], run["id"]), reverse=True)

    def _fill(self, sha: str, run: dict[str, Any]) -> dict[str, Any]:
        # Called with the lock held: complete a partial scripted run with GitHub's shape.
        if "id" not in run:
            self._state.next_id += 1
        run_id = run.setdefault("id", self._state.next_id)
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            raise ValueError(f"run id {run_id!r} must be an integer (use malformed_next() for broken answers)")
        name = run.setdefault("name", "CI")
        status = run.setdefault("status", "completed")
        if status not in _STATUSES:
            raise ValueError(f"status {status!r} is not one GitHub reports: {sorted(map(str, _STATUSES))}")
        conclusion = run.setdefault("conclusion", "success" if status == "completed" else None)
        if status != "completed" and conclusion is not None:
            raise ValueError(f"a {status!r} run has no conclusion yet on GitHub, got {conclusion!r}")
        # An ABSENT run_attempt or run_started_at means the first attempt, started when it was created.
        attempt = run.setdefault("run_attempt", 1)
        attempt = attempt if isinstance(attempt, int) else 1
        workflow_id = run.setdefault("workflow_id", 1)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if isinstance(name, str) else "ci"
        created = run.setdefault("created_at", _iso(_EPOCH + timedelta(minutes=run_id)))
        started = run.setdefault("run_started_at", _iso(_parse_iso(created) + timedelta(hours=attempt - 1)))
        started = started if isinstance(started, str) else created
        run.setdefault("updated_at", _iso(_parse_iso(started) + timedelta(minutes=5 if status == "completed" else 0)))
        # URLs are relative until answered: scripts may be set before start() picks the port.
        api = f"/repos/{self.repo}/actions/runs/{run_id}"
        defaults: dict[str, Any] = {
            "node_id": f"WFR_{run_id}",
            "check_suite_id": run_id + 500_000,
            "check_suite_node_id": f"CS_{run_id}",
            "head_branch": "main",
            "head_sha": sha,
            "path": f".github/workflows/{slug or 'ci'}.yml",
            "display_title": "scripted commit",
            "run_number": run_id,
            "event": "push",
            "url": api,
            "html_url": f"/{self.repo}/actions/runs/{run_id}",
            "pull_requests": [],
            "jobs_url": f"{api}/jobs",
            "logs_url": f"{api}/logs",
            "check_suite_url": f"/repos/{self.repo}/check-suites/{run_id + 500_000}",
            "artifacts_url": f"{api}/artifacts",
            "cancel_url": f"{api}/cancel",
            "rerun_url": f"{api}/rerun",
            "previous_attempt_url": f"{api}/attempts/{attempt - 1}" if attempt > 1 else None,
            "workflow_url": f"/repos/{self.repo}/actions/workflows/{workflow_id}",
            "head_commit": {"id": sha, "tree_id": sha, "message": "scripted commit", "timestamp": created},
            "repository": self.repository(),
            "head_repository": self.repository(),
        }
        for key, value in defaults.items():
            run.setdefault(key, value)
        return {key: value for key, value in run.items() if value is not ABSENT}

    def repository(self) -> dict[str, Any]:
        owner, name = self.repo.split("/", 1)
        return {"id": 1, "name": name, "full_name": self.repo, "owner": {"login": owner}, "private": self.private}

    def runs_for(self, sha: str, *, advance: bool = True) -> list[dict[str, Any]]:
        """The runs answered for this sha; `advance` False only looks (a browser's page must not move a script on)."""
        with self._state.lock:
            queue = self._state.scripts.get(sha)
            if queue is None:
                answer = self._fill_all(sha, [{"id": 1, "name": "CI"}])
            else:
                answer = queue[0] if len(queue) == 1 or not advance else queue.popleft()
        return [self._absolute(run) for run in answer]

    def _absolute(self, run: dict[str, Any]) -> dict[str, Any]:
        def absolute(key: str, value: Any) -> Any:
            is_relative = key.endswith("url") and isinstance(value, str) and value.startswith("/")
            return f"{self.url}{value}" if is_relative else value

        return {key: absolute(key, value) for key, value in run.items()}

    def take_fault(self, path: str) -> Fault | None:
        with self._state.lock:
            for fault in self._state.faults:
                if fault.path in (None, path):
                    self._state.faults.remove(fault)
                    return fault
            return None

    def charge(self, authenticated: bool, free: bool) -> tuple[bool, dict[str, str]]:
        """Count one request against its rate window; (allowed, rate-limit headers to send)."""
        with self._state.lock:
            window = self._state.rates[authenticated]
            window.roll(time.time())
            if window.used >= window.limit:
                return False, window.headers()
            if not free:
                window.used += 1
            return True, window.headers()

    def record(self, served: Served) -> None:
        with self._state.lock:
            self._state.served.append(served)

    def authorized(self, header: str | None) -> bool:
        """No header is an anonymous caller (what it may read is decided later); a header must hold the token."""
        return header is None or self._token is None or header == f"Bearer {self._token}"

    def issue_ticket(self, sha: str) -> str:
        ticket = secrets.token_hex(16)
        with self._state.lock:
            self._state.tickets[ticket] = sha
        return ticket

    def redeem_ticket(self, ticket: str, authorization: str | None) -> str | None:
        """The sha a one-use archive URL downloads, once; None when reused, unknown or sent with a token."""
        with self._state.lock:
            sha = self._state.tickets.pop(ticket, None)
            if authorization is not None:
                self._state.download_auth_seen = True
                return None
            return sha

    def archive(self, sha: str) -> bytes:
        """The commit's tree as GitHub's tarball holds it: gzipped, under one top folder owner-repo-<short sha>/."""
        prefix = f"{self.repo.replace('/', '-')}-{sha[:7]}/"
        return subprocess.run(
            ["git", "-C", str(self.repo_dir), "archive", "--format=tar.gz", f"--prefix={prefix}", sha],
            capture_output=True,
            check=True,
        ).stdout

    def resolve(self, ref: str) -> str | None:
        if ref.startswith("-"):
            return None
        result = subprocess.run(
            ["git", "-C", str(self.repo_dir), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for the GitHub Actions API.")
    parser.add_argument("--repo-dir", type=Path, default=Path("."), help="git repository used to resolve refs")
    parser.add_argument("--repo", default="local/ec2-trainer", help="owner/name the API answers for")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--token-env", default=None, help="name of an environment variable holding the token to require"
    )
    parser.add_argument(
        "--public", action="store_true", help="answer anonymous reads (default: private when a token is required)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) if args.token_env else None
    # Wait for the stop signal with sigwait, not a handler: a handler setting an Event deadlocks if the signal lands
    # while this thread holds the Event's lock (the likely cause of a SIGTERM sent just after start-up that once went
    # unanswered). Blocked before the server thread starts, so that thread inherits the mask.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with GitHubStandIn(args.repo_dir, args.repo, token, port=args.port, public=args.public):
        signal.sigwait(stop_signals)


if __name__ == "__main__":
    main()
