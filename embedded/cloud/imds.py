"""An emulated instance's metadata service (IMDSv2 only, as the launch requires HttpTokens=required), on a loopback
port of its own: never 169.254.169.254, which is this machine's own host's. The instance's processes find it through
AWS's own variable AWS_EC2_METADATA_SERVICE_ENDPOINT (botocore honours it; production leaves it unset).

As EC2's IMDS answers (docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html):
- `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` 1..21600 returns a token (400 without or
  outside that range; 403 with `X-Forwarded-For`, which IMDS refuses so a proxy cannot fetch tokens);
- every GET needs `X-aws-ec2-metadata-token` holding a live token: 401 without, or with an expired or unknown one;
- `meta-data/instance-id`; `meta-data/spot/instance-action` and `spot/termination-time` 404 until an interruption
  notice is posted, `meta-data/events/recommendations/rebalance` 404 until a rebalance recommendation is; any other
  path 404 (this stand-in serves only these).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

from embedded.services.http_service import LoopbackHttpServer

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header's name
MAX_TTL_S = 21600
INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
TERMINATION_TIME = "/latest/meta-data/spot/termination-time"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


def iso_z(epoch: float) -> str:
    """A time as IMDS writes it in its notices: UTC, whole seconds, `Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstanceMetadataService:
    """One instance's IMDS; `endpoint` is the value of AWS_EC2_METADATA_SERVICE_ENDPOINT for its processes."""

    def __init__(self, instance_id: str, clock: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self.clock = clock
        self._tokens: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self._documents: dict[str, str] = {"/latest/meta-data/instance-id": instance_id}
        self._lock = threading.Lock()
        self._server = LoopbackHttpServer(_handler(self), 0, f"imds-{instance_id}")

    @property
    def endpoint(self) -> str:
        return f"{self._server.base_url}/"

    def stop(self) -> None:
        self._server.stop()

    def post_rebalance_recommendation(self) -> None:
        self._set(REBALANCE, json.dumps({"noticeTime": iso_z(self.clock())}))

    def post_interruption_notice(self, action: str, at_epoch: float) -> None:
        """The spot interruption notice: `action` (terminate, stop or hibernate) at `at_epoch`."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"a spot interruption's action is terminate, stop or hibernate, not {action!r}")
        self._set(INSTANCE_ACTION, json.dumps({"action": action, "time": iso_z(at_epoch)}))
        # The older item: present only when the action is terminate.
        if action == "terminate":
            self._set(TERMINATION_TIME, iso_z(at_epoch))

    def _set(self, path: str, body: str) -> None:
        with self._lock:
            self._documents[path] = body

    def issue_token(self, ttl_s: int) -> str:
        token = secrets.token_urlsafe(40)
        with self._lock:
            now = self.clock()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl_s
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > self.clock()

    def document(self, path: str) -> str | None:
        with self._lock:
            return self._documents.get(path)


def _handler(service: InstanceMetadataService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            if self.path != "/latest/api/token":
                self._answer(405, "Method Not Allowed")
                return
            if self.headers.get("X-Forwarded-For") is not None:
                self._answer(403, "Forbidden")
                return
            ttl = (self.headers.get(TTL_HEADER) or "").strip()
            if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL_S:
                self._answer(400, "Bad Request")
                return
            self._answer(200, service.issue_token(int(ttl)), {TTL_HEADER: ttl})

        def do_GET(self) -> None:
            if not service.token_valid(self.headers.get(TOKEN_HEADER)):
                self._answer(401, "Unauthorized")
                return
            body = service.document(self.path.split("?", 1)[0])
            if body is None:
                self._answer(404, "Not Found")
            else:
                self._answer(200, body)

        def _answer(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the watcher polls every 5 s: one line each would drown the test's log

    return Handler
