"""A local stand-in for the few GitHub REST endpoints the CI gate calls, for the embedded default and the tests.

Serves, on 127.0.0.1 and a free port:
- ``GET /repos/{owner}/{repo}/commits/{ref}``: resolved with ``git rev-parse`` in a local repository
  (404/422 if unknown);
- ``GET /repos/{owner}/{repo}/actions/runs?head_sha=&per_page=&page=``: scripted runs, paginated with a Link header.

A sha with nothing scripted answers one completed, successful workflow named "CI": the embedded default's local HEAD
is "green" with no set-up. Faults (5xx, rate limits, malformed JSON) can be injected for the next requests.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

_COMMITS_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/commits/(?P<ref>.+)$")
_RUNS_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/runs$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{4,40}$")
_MAX_PER_PAGE = 100


@dataclass(frozen=True)
class _Fault:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    scripts: dict[str, collections.deque[list[dict[str, Any]]]] = field(default_factory=dict)
    faults: collections.deque[_Fault] = field(default_factory=collections.deque)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    next_id: int = 1000


class GitHubStandIn:
    """A threaded stdlib HTTP server answering like the GitHub Actions API for one local repository."""

    def __init__(
        self, repo_dir: Path, repo: str = "local/ec2-trainer", token: str | None = None, *, port: int = 0
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.repo = repo
        self._token = token
        self._port = port
        self._state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"GitHubStandIn(repo={self.repo!r}, url={self.url if self._server else None!r})"

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the GitHub stand-in is not started: call start() first")
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> str:
        """Start serving in a daemon thread; return the API base URL."""
        handler = type("_BoundHandler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            # A short poll interval keeps stop() quick (tests start and stop many servers).
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="github-standin",
            daemon=True,
        )
        self._thread.start()
        log.info("GitHub stand-in for %s (%s) serving at %s", self.repo, self.repo_dir, self.url)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> GitHubStandIn:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- scripting -------------------------------------------------------------------------------------------

    def set_runs(self, sha: str, runs: Sequence[Mapping[str, Any]]) -> None:
        """Every poll for this sha answers these runs."""
        self.script(sha, [runs])

    def script(self, sha: str, answers: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        """Successive polls for this sha answer these run lists in turn; the last one then repeats."""
        if not answers:
            raise ValueError("script() needs at least one list of runs (an empty list means 'no runs yet')")
        with self._state.lock:
            filled = [[self._fill(sha, dict(run)) for run in runs] for runs in answers]
            self._state.scripts[sha] = collections.deque(filled)

    def fail_next(self, n: int = 1, status: int = 502) -> None:
        """The next n requests (any path) answer this HTTP status."""
        body = json.dumps({"message": "Server Error"}).encode()
        with self._state.lock:
            self._state.faults.extend(_Fault(status, body) for _ in range(n))

    def rate_limit_next(self, reset_in_s: int) -> None:
        """The next request answers 403 with x-ratelimit-remaining: 0 and a reset reset_in_s from now."""
        reset = str(int(time.time()) + reset_in_s)
        body = json.dumps({"message": "API rate limit exceeded"}).encode()
        headers = (("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset), ("x-ratelimit-limit", "60"))
        with self._state.lock:
            self._state.faults.append(_Fault(403, body, headers))

    def malformed_next(self) -> None:
        """The next request answers 200 with a body that is not JSON."""
        with self._state.lock:
            self._state.faults.append(_Fault(200, b"{this is not json"))

    def request_count(self, path: str) -> int:
        """How many requests reached this path (query string excluded)."""
        with self._state.lock:
            return self._state.counts[path]

    @property
    def total_requests(self) -> int:
        with self._state.lock:
            return sum(self._state.counts.values())

    # --- answers ---------------------------------------------------------------------------------------------

    def _fill(self, sha: str, run: dict[str, Any]) -> dict[str, Any]:
        # Called with the lock held: complete a partial scripted run with GitHub-shaped defaults.
        self._state.next_id += 1
        run_id = run.setdefault("id", self._state.next_id)
        run.setdefault("name", "CI")
        run.setdefault("workflow_id", 1)
        run.setdefault("head_sha", sha)
        run.setdefault("status", "completed")
        run.setdefault("conclusion", "success" if run["status"] == "completed" else None)
        run.setdefault("run_attempt", 1)
        run.setdefault("created_at", "2024-01-01T00:00:00Z")
        # html_url is filled in when answering: scripts may be set before start() picks the port.
        run.setdefault("html_url", f"/{self.repo}/actions/runs/{run_id}")
        return run

    def _runs_for(self, sha: str) -> list[dict[str, Any]]:
        with self._state.lock:
            queue = self._state.scripts.get(sha)
            if queue is None:
                answer = [self._fill(sha, {"id": 1, "name": "CI"})]
            else:
                answer = queue[0] if len(queue) == 1 else queue.popleft()
        return [self._absolute(run) for run in answer]

    def _absolute(self, run: dict[str, Any]) -> dict[str, Any]:
        url = run["html_url"]
        return {**run, "html_url": f"{self.url}{url}" if url.startswith("/") else url}

    def _count(self, path: str) -> None:
        with self._state.lock:
            self._state.counts[path] += 1

    def _take_fault(self) -> _Fault | None:
        with self._state.lock:
            return self._state.faults.popleft() if self._state.faults else None

    def _authorized(self, header: str | None) -> bool:
        return self._token is None or header == f"Bearer {self._token}"

    def _resolve(self, ref: str) -> str | None:
        if ref.startswith("-"):
            return None
        result = subprocess.run(
            ["git", "-C", str(self.repo_dir), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else None


class _Handler(BaseHTTPRequestHandler):
    standin: GitHubStandIn

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("github stand-in: " + format, *args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.standin._count(path)
        if not self.standin._authorized(self.headers.get("Authorization")):
            self._json(401, {"message": "Bad credentials"})
            return
        fault = self.standin._take_fault()
        if fault is not None:
            self._send(fault.status, fault.body, dict(fault.headers))
            return
        if match := _COMMITS_RE.fullmatch(path):
            self._commit(match["repo"], match["ref"])
        elif match := _RUNS_RE.fullmatch(path):
            self._runs(match["repo"], parse_qs(parts.query))
        else:
            self._json(404, {"message": "Not Found"})

    def _commit(self, repo: str, ref: str) -> None:
        if repo != self.standin.repo:
            self._json(404, {"message": "Not Found"})
            return
        sha = self.standin._resolve(ref)
        if sha is not None:
            self._json(200, {"sha": sha})
        elif _HEX_RE.fullmatch(ref):
            self._json(422, {"message": f"No commit found for SHA: {ref}"})
        else:
            self._json(404, {"message": "Not Found"})

    def _runs(self, repo: str, query: dict[str, list[str]]) -> None:
        if repo != self.standin.repo:
            self._json(404, {"message": "Not Found"})
            return
        head_sha = query.get("head_sha", [""])[0]
        try:
            per_page = min(int(query.get("per_page", ["30"])[0]), _MAX_PER_PAGE)
            page = max(int(query.get("page", ["1"])[0]), 1)
        except ValueError:
            self._json(422, {"message": "per_page and page must be integers"})
            return
        runs = self.standin._runs_for(head_sha) if head_sha else []
        chunk = runs[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(runs):
            base = f"{self.standin.url}/repos/{repo}/actions/runs"
            headers["Link"] = f'<{base}?head_sha={head_sha}&per_page={per_page}&page={page + 1}>; rel="next"'
        self._json(200, {"total_count": len(runs), "workflow_runs": chunk}, headers)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), dict(headers or {}))

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for the GitHub Actions API.")
    parser.add_argument("--repo-dir", type=Path, default=Path("."), help="git repository used to resolve refs")
    parser.add_argument("--repo", default="local/ec2-trainer", help="owner/name the API answers for")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--token-env", default=None, help="name of an environment variable holding the token to require"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) if args.token_env else None
    # Wait for the stop signal with sigwait, not a handler: a handler setting an Event deadlocks if the signal lands
    # while this thread holds the Event's lock (the likely cause of a SIGTERM sent just after start-up that once went
    # unanswered). Blocked before the server thread starts, so that thread inherits the mask.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with GitHubStandIn(args.repo_dir, args.repo, token, port=args.port):
        signal.sigwait(stop_signals)


if __name__ == "__main__":
    main()
