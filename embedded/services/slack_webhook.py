"""A local stand-in for a Slack incoming webhook (stdlib http.server on 127.0.0.1): the run's Slack messages land here.

It answers as Slack's incoming webhooks do (https://api.slack.com/messaging/webhooks#handling_errors): `200` with the
body `ok` for a message it accepts; otherwise a status and a one-word body:
- `404 no_service`: a URL that is not the webhook's (a wrong or revoked token);
- `400 invalid_payload`: a body that is not a JSON object;
- `400 no_text`: neither `text` nor `blocks`;
- `400 invalid_blocks`: blocks outside Block Kit's shape or limits (at most 50 blocks; a header's plain text up to 150
  characters; a section's text up to 3,000, its fields up to 10 of 2,000; a context's elements up to 10);
- `fail_next` injects what Slack answers in trouble, e.g. `500 rollup_error`.
Each accepted message is kept in memory (`received`) and as a JSON file in `folder`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from embedded.process import Managed
from embedded.services.http_service import LoopbackHttpServer

log = logging.getLogger(__name__)

_TEXT_TYPES = frozenset({"plain_text", "mrkdwn"})
_BLOCK_TYPES = frozenset(
    {"section", "header", "context", "divider", "actions", "image", "rich_text", "markdown", "input", "file", "video"}
)
_MAX_BLOCKS = 50
_MAX_HEADER = 150
_MAX_SECTION_TEXT = 3000
_MAX_FIELDS = 10
_MAX_FIELD_TEXT = 2000
_MAX_CONTEXT_ELEMENTS = 10


def _text_ok(obj: Any, limit: int, types: frozenset[str] = _TEXT_TYPES) -> bool:
    return (
        isinstance(obj, dict)
        and obj.get("type") in types
        and isinstance(obj.get("text"), str)
        and 0 < len(obj["text"]) <= limit
    )


def _block_ok(block: Any) -> bool:
    if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
        return False
    kind = block["type"]
    if kind == "header":
        return _text_ok(block.get("text"), _MAX_HEADER, frozenset({"plain_text"}))
    if kind == "section":
        text, fields = block.get("text"), block.get("fields")
        if text is None and fields is None:
            return False
        fields_ok = fields is None or (
            isinstance(fields, list)
            and 0 < len(fields) <= _MAX_FIELDS
            and all(_text_ok(f, _MAX_FIELD_TEXT) for f in fields)
        )
        return (text is None or _text_ok(text, _MAX_SECTION_TEXT)) and fields_ok
    if kind == "context":
        elements = block.get("elements")
        return (
            isinstance(elements, list)
            and 0 < len(elements) <= _MAX_CONTEXT_ELEMENTS
            and all(
                _text_ok(e, _MAX_SECTION_TEXT) or (isinstance(e, dict) and e.get("type") == "image") for e in elements
            )
        )
    return True


def verdict(payload: Any) -> tuple[int, str]:
    """What Slack answers for this parsed body (None: not JSON)."""
    if not isinstance(payload, dict):
        return 400, "invalid_payload"
    text, blocks = payload.get("text"), payload.get("blocks")
    if not (isinstance(text, str) and text.strip()) and not blocks:
        return 400, "no_text"
    if blocks is not None and not (
        isinstance(blocks, list) and len(blocks) <= _MAX_BLOCKS and all(_block_ok(b) for b in blocks)
    ):
        return 400, "invalid_blocks"
    return 200, "ok"


class SlackWebhookStandIn(Managed):
    """One incoming webhook at `url` (a secret, as Slack's is: it is the only credential)."""

    def __init__(self, folder: Path, *, port: int = 0) -> None:
        self.folder = folder
        self._port = port
        self.path = f"/services/T{secrets.token_hex(4).upper()}/B{secrets.token_hex(4).upper()}/{secrets.token_hex(12)}"
        self._lock = threading.Lock()
        self._received: list[dict[str, Any]] = []
        self._faults: list[tuple[int, str]] = []
        self.requests = 0
        self._http: LoopbackHttpServer | None = None

    @property
    def base_url(self) -> str:
        if self._http is None:
            raise RuntimeError("the webhook stand-in is not started: call start() first")
        return self._http.base_url

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handler = type("_BoundHandler", (_Handler,), {"standin": self})
        self._http = LoopbackHttpServer(handler, self._port, "slack-webhook")
        log.info("Slack webhook stand-in on %s, messages in %s", self.base_url, self.folder)

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    @property
    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._received)

    def fail_next(self, n: int = 1, status: int = 500, body: str = "rollup_error") -> None:
        with self._lock:
            self._faults += [(status, body)] * n

    def _answer(self, path: str, raw: bytes) -> tuple[int, str]:
        with self._lock:
            self.requests += 1
            if self._faults:
                return self._faults.pop(0)
        if not secrets.compare_digest(path, self.path):
            return 404, "no_service"
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        status, body = verdict(payload)
        if status == 200:
            with self._lock:
                self._received.append(payload)
                (self.folder / f"{len(self._received):04d}.json").write_text(json.dumps(payload, indent=2) + "\n")
        return status, body


class _Handler(BaseHTTPRequestHandler):
    standin: SlackWebhookStandIn

    def log_message(self, format: str, *args: Any) -> None:
        # The request line holds the webhook's secret path: never logged.
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        status, body = self.standin._answer(self.path, self.rfile.read(length))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
