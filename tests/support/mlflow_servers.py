"""Shared pytest fixtures: a real MLflow tracking server on loopback (SQLite, proxied artifacts) for the session,
and a small HTTP proxy in front of it that injects faults and delays at the network boundary.

Registered for the whole test tree through `pytest_plugins` in tests/conftest.py. Starting the server takes a few
seconds, so it is shared; tests keep apart by using their own experiment and registered model names.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from embedded.services.mlflow_server import MlflowServer

# (method, path) -> None to forward the request, or (status, body) to answer it instead, as a proxy or an
# authenticating front end would.
Fault = Callable[[str, str], tuple[int, str] | None]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class FaultProxy:
    """Forwards HTTP requests to `upstream`; `fault` may answer some itself; `max_delay_s` delays each at random."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.fault: Fault | None = None
        self.max_delay_s = 0.0
        self.answered: list[tuple[str, str, int]] = []  # (method, path, status) of every request the fault answered
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy._handle(self)

            do_POST = do_PATCH = do_PUT = do_DELETE = do_GET

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mlflow-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if self.max_delay_s:
            time.sleep(random.uniform(0, self.max_delay_s))
        fault = self.fault(request.command, request.path) if self.fault else None
        if fault is not None:
            status, text = fault
            self.answered.append((request.command, request.path, status))
            self._reply(request, status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Host"] = self.upstream  # the server's security middleware accepts only its own host names
            upstream.request(request.command, request.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            self._reply(request, response.status, kept, payload)
        finally:
            upstream.close()

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        request.send_response(status)
        for key, value in headers:
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(payload)))
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(payload)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A running MLflow server; its tracking URI is `.url`."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def mlflow_proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's MLflow server, with no fault and no delay until a test sets them."""
    with FaultProxy(mlflow_server.url) as proxy:
        yield proxy
