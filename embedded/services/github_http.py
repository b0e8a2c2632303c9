"""The GitHub stand-in's HTTP side: its routes and answers (ETag, conditional requests, rate-limit headers), over the
state of embedded.services.github_standin."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    from embedded.services.github_standin import GitHubStandIn

log = logging.getLogger(__name__)

_COMMITS_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/commits/(?P<ref>.+)$")
_RUNS_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/runs$")
_REPO_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)$")
_TARBALL_RE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/tarball/(?P<ref>.+)$")
_CODELOAD_RE = re.compile(r"^/_codeload/(?P<ticket>[0-9a-f]{32})$")
_CHECKS_PAGE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/commit/(?P<sha>[0-9a-f]{40})/checks$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{4,40}$")
_DEFAULT_PER_PAGE = 30
_MAX_PER_PAGE = 100
# GitHub answers at most 1,000 workflow runs for a query with filters such as head_sha.
_MAX_FILTERED_RESULTS = 1000


@dataclass(frozen=True)
class Fault:
    """An injected answer for the next request (to `path`, or to any)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    path: str | None = None  # None: whatever path comes next


@dataclass(frozen=True)
class Served:
    """One answered request: its path (no query), HTTP status, and whether it carried If-None-Match."""

    path: str
    status: int
    conditional: bool


def etag_of(body: bytes) -> str:
    """A weak validator of the body, as GitHub sends for JSON answers."""
    return f'W/"{hashlib.sha256(body).hexdigest()[:40]}"'


def matches_etag(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    # Weak comparison (RFC 9110 13.1.2): W/ prefixes do not matter; the header may list several tags, or "*".
    wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in wanted or etag.removeprefix("W/") in wanted


class GitHubHandler(BaseHTTPRequestHandler):
    standin: GitHubStandIn

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("github stand-in: " + format, *args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self._path = unquote(parts.path)
        self._conditional = "If-None-Match" in self.headers
        if match := _CHECKS_PAGE_RE.fullmatch(self._path):
            # A web page, not the API: public like github.com's for a public repository, so no token.
            self._checks_page(match["repo"], match["sha"])
            return
        header = self.headers.get("Authorization")
        if match := _CODELOAD_RE.fullmatch(self._path):
            # The archive host: no API budget, no token; the URL itself is the credential, good once.
            self._codeload(match["ticket"], header)
            return
        if not self.standin.authorized(header):
            self._json(401, {"message": "Bad credentials"})
            return
        self._authenticated = header is not None
        fault = self.standin.take_fault(self._path)
        if fault is not None:
            self._send(fault.status, fault.body, fault.headers)
            return
        if self.standin.private and not self._authenticated:
            # GitHub hides a private repository from anonymous callers: Not Found, not Forbidden.
            self._json(404, {"message": "Not Found"})
        elif match := _REPO_RE.fullmatch(self._path):
            self._repo_metadata(match["repo"])
        elif match := _TARBALL_RE.fullmatch(self._path):
            self._tarball(match["repo"], match["ref"])
        elif match := _COMMITS_RE.fullmatch(self._path):
            self._commit(match["repo"], match["ref"])
        elif match := _RUNS_RE.fullmatch(self._path):
            self._runs(match["repo"], parse_qs(parts.query))
        else:
            self._json(404, {"message": "Not Found"})

    def _commit(self, repo: str, ref: str) -> None:
        if repo != self.standin.repo:
            self._json(404, {"message": "Not Found"})
            return
        sha = self.standin.resolve(ref)
        if sha is not None:
            url = self.standin.url
            commit = {
                "sha": sha,
                "node_id": f"C_{sha[:12]}",
                "url": f"{url}/repos/{repo}/commits/{sha}",
                "html_url": f"{url}/{repo}/commit/{sha}",
                "commit": {"message": "local commit", "tree": {"sha": sha}},
                "parents": [],
            }
            self._json(200, commit)
        elif _HEX_RE.fullmatch(ref):
            self._json(422, {"message": f"No commit found for SHA: {ref}"})
        else:
            self._json(404, {"message": "Not Found"})

    def _repo_metadata(self, repo: str) -> None:
        if repo != self.standin.repo:
            self._json(404, {"message": "Not Found"})
            return
        self._json(200, self.standin.repository())

    def _tarball(self, repo: str, ref: str) -> None:
        sha = self.standin.resolve(ref) if repo == self.standin.repo else None
        if sha is None:
            self._json(404, {"message": "Not Found"})
            return
        location = f"{self.standin.url}/_codeload/{self.standin.issue_ticket(sha)}"
        allowed, rate_headers = self.standin.charge(self._authenticated, False)
        if not allowed:
            self._send(403, json.dumps({"message": "API rate limit exceeded"}).encode(), rate_headers)
            return
        self._send(302, b"", {"Location": location, **rate_headers})

    def _codeload(self, ticket: str, authorization: str | None) -> None:
        sha = self.standin.redeem_ticket(ticket, authorization)
        if sha is None:
            self._send(404, b"Not Found", {})
            return
        body = self.standin.archive(sha)
        self._send(200, body, {}, content_type="application/x-gzip")

    def _runs(self, repo: str, query: dict[str, list[str]]) -> None:
        if repo != self.standin.repo:
            self._json(404, {"message": "Not Found"})
            return
        head_sha = query.get("head_sha", [""])[0]
        try:
            per_page = min(int(query.get("per_page", [str(_DEFAULT_PER_PAGE)])[0]), _MAX_PER_PAGE)
            page = max(int(query.get("page", ["1"])[0]), 1)
        except ValueError:
            self._json(422, {"message": "per_page and page must be integers"})
            return
        runs = self.standin.runs_for(head_sha) if head_sha else []
        reachable = runs[:_MAX_FILTERED_RESULTS] if head_sha else runs
        chunk = reachable[(page - 1) * per_page : page * per_page]
        last = max((len(reachable) + per_page - 1) // per_page, 1)
        base = f"{self.standin.url}/repos/{repo}/actions/runs"

        def link(to: int, rel: str) -> str:
            params = {**{k: v[0] for k, v in query.items()}, "per_page": per_page, "page": to}
            return f'<{base}?{urlencode(params)}>; rel="{rel}"'

        links = []
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"Link": ", ".join(links)} if links else {}
        self._json(200, {"total_count": len(runs), "workflow_runs": chunk}, headers)

    def _checks_page(self, repo: str, sha: str) -> None:
        if repo != self.standin.repo or self.standin.resolve(sha) != sha:
            self._html(404, "Not Found", "<p>No such commit in this repository.</p>")
            return
        rows = []
        for run in self.standin.runs_for(sha, advance=False):
            name = html.escape(str(run.get("name") or run.get("path") or run["workflow_id"]))
            link = f"<a href='{html.escape(str(run.get('html_url', '')))}'>{name}</a>"
            cells = (link, *(html.escape(str(run.get(key))) for key in ("status", "conclusion", "run_attempt")))
            rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
        body = (
            f"<h1>{html.escape(repo)}</h1><p>Checks of commit <code id='sha'>{sha}</code>"
            " (the embedded default's GitHub stand-in: the workflow runs its API answers for this commit)</p>"
            "<table><thead><tr><th>workflow</th><th>status</th><th>conclusion</th><th>attempt</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        self._html(200, f"Checks of {sha[:7]} in {repo}", body)

    def _html(self, status: int, title: str, body: str) -> None:
        page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        data = f"{page}<body>{body}</body></html>".encode()
        self.standin.record(Served(self._path, status, self._conditional))
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        headers = dict(headers or {})
        etag = etag_of(body)
        not_modified = status == 200 and matches_etag(self.headers.get("If-None-Match"), etag)
        if status != 401:
            # A 304 costs nothing when the request was made with a token (GitHub's rule for conditional requests).
            allowed, rate_headers = self.standin.charge(self._authenticated, not_modified and self._authenticated)
            headers |= rate_headers
            if not allowed:
                body = json.dumps({"message": "API rate limit exceeded (stand-in budget spent)"}).encode()
                self._send(403, body, headers)
                return
        if not_modified:
            self._send(304, b"", {"ETag": etag, **headers})
            return
        self._send(status, body, {"ETag": etag, **headers} if status == 200 else headers)

    def _send(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | Sequence[tuple[str, str]],
        *,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        self.standin.record(Served(self._path, status, self._conditional))
        self.send_response(status)
        if status != 304:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        items = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in items:
            self.send_header(name, value)
        self.end_headers()
        if status != 304:
            self.wfile.write(body)
