"""A real MLflow tracking server on loopback with proxied artifacts (clients never write its store).

By default its backend is SQLite and its artifacts a folder in `workdir`; a production-like one takes a PostgreSQL
`backend_store_uri` and an `s3://` `artifacts_destination`, with the S3 endpoint and credentials in `env`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from embedded.process import free_port, start_logged, stop_process, wait_for_http

log = logging.getLogger(__name__)

# MLflow 3's job runner (GenAI evaluation jobs; nothing here submits one) starts six huey consumers per server, each
# importing mlflow (~250 MB, seconds of CPU apiece): with a few servers per test session that was gigabytes.
SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        backend_store_uri: str | None = None,
        artifacts_destination: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.backend_store_uri = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts_destination = artifacts_destination or str(workdir / "artifacts")
        self.env = dict(env or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = workdir / "mlflow-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 240.0) -> str:  # ~7 s idle; minutes on a loaded 2-core machine
        self.workdir.mkdir(parents=True, exist_ok=True)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        self._proc = start_logged(
            [
                str(mlflow_bin),
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                self.artifacts_destination,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            self.log_file,
            env={**os.environ, **SERVER_DEFAULTS, **self.env},
        )
        wait_for_http(f"{self.url}/health", timeout_s, proc=self._proc, log_file=self.log_file)
        log.info("MLflow server at %s (artifacts in %s)", self.url, self.artifacts_destination)
        return self.url

    def stop(self) -> None:
        stop_process(self._proc)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()
