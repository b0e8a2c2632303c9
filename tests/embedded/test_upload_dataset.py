"""`make upload-dataset`: it finds the running `make ui` through its state file, uploads the next version to that
deployment's S3 (the tests' embedded stack here), complete with its marker, says what happens next, and fails with a
clear message when no `make ui` runs."""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from embedded.cli import running, upload_dataset
from embedded.cli.running import RunningUi
from embedded.cloud import DATASET_BUCKET
from embedded.deploy.stack import TINY_DATA_URI, EmbeddedStack

UI = RunningUi(
    pid=os.getpid(),
    airflow_url="http://127.0.0.1:8080",
    airflow_login=("admin", "pw"),
    branch="main",
    s3_endpoint="http://127.0.0.1:1",
    region="us-east-1",
    access_key="AKIA",
    secret_key="secret",
    datasets_uri="s3://bucket/prefix/",
    dataset_queue_url="http://127.0.0.1:1/123456789012/queue",
)


def ui_of(stack: EmbeddedStack, airflow_url: str, datasets_uri: str) -> RunningUi:
    """What `make ui` writes, for the tests' embedded stack."""
    cloud = stack.cloud
    return replace(
        UI,
        airflow_url=airflow_url,
        s3_endpoint=cloud.endpoint_url,
        region=cloud.region,
        access_key=cloud.admin.access_key,
        secret_key=cloud.admin.secret_key,
        datasets_uri=datasets_uri,
        dataset_queue_url=cloud.dataset_queue_url,
    )


@pytest.fixture
def airflow_api() -> Iterator[tuple[str, dict[str, bool]]]:
    """The two calls the command makes to Airflow's REST API, answered as the api-server does: log in, read the DAG."""
    dag = {"is_paused": True}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = self.path == "/auth/token" and body == {"username": "admin", "password": "pw"}
            self._reply(201 if ok else 401, {"access_token": "token"})

        def do_GET(self) -> None:
            ok = self.path == "/api/v2/dags/ec2_retrain" and self.headers["Authorization"] == "Bearer token"
            self._reply(200 if ok else 401, dag)

        def _reply(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", dag
    server.shutdown()


def test_without_a_running_make_ui_it_says_to_start_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert upload_dataset.main(["--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no `make ui` is running on {tmp_path} (no ui.json there): start it in another terminal" in err


def test_the_state_file_of_a_killed_make_ui_is_not_taken_for_a_running_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True).stdout.strip()
    running.write(tmp_path, replace(UI, pid=int(gone)))
    assert upload_dataset.main(["--state-dir", str(tmp_path)]) == 2
    assert f"the `make ui` that wrote {tmp_path / 'ui.json'} (process {gone}) is gone" in capsys.readouterr().err


def test_the_state_file_is_private_and_read_back_as_written(tmp_path: Path) -> None:
    path = running.write(tmp_path, UI)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "it holds the S3 keys and the admin's password"
    assert running.read(tmp_path) == UI
    running.remove(tmp_path)
    with pytest.raises(running.NotRunning):
        running.read(tmp_path)


def test_it_uploads_the_next_complete_version_and_says_what_happens_next(
    stack: EmbeddedStack, tmp_path: Path, airflow_api: tuple[str, dict[str, bool]], capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.datasets.s3 import list_objects
    from orchestrator.datasets.versions import complete_versions

    airflow_url, dag = airflow_api
    datasets = f"s3://{DATASET_BUCKET}/test-upload-{secrets.token_hex(4)}/"
    running.write(tmp_path, ui_of(stack, airflow_url, datasets))
    out = io.StringIO()

    assert upload_dataset.main(["--state-dir", str(tmp_path), "--data-uri", TINY_DATA_URI], out) == 0
    s3 = stack.cloud.client("s3")
    assert [v.name for v in complete_versions(list_objects(s3, datasets), datasets, "_SUCCESS")] == ["v1"]
    text = out.getvalue()
    assert f"Generating {TINY_DATA_URI} and uploading it as {datasets}v1/ (S3 at {stack.cloud.endpoint_url})" in text
    assert "Uploaded version v1: " in text and "the marker _SUCCESS last, so the version is complete" in text
    assert "the triggerer's watcher reads the marker's event and updates the dataset asset" in text
    assert f"it takes the latest complete version ({datasets}v1/) and the latest commit of main" in text
    assert f"Follow it on {airflow_url}/dags/ec2_retrain" in text
    assert "But ec2_retrain is paused (DAGs start paused), so step 2 does not happen for this upload" in text

    dag["is_paused"] = False
    out = io.StringIO()
    assert upload_dataset.main(["--state-dir", str(tmp_path), "--data-uri", TINY_DATA_URI], out) == 0
    assert f"uploading it as {datasets}v2/" in out.getvalue() and "is paused" not in out.getvalue()
    listed = complete_versions(list_objects(s3, datasets), datasets, "_SUCCESS")
    assert [v.name for v in listed] == ["v1", "v2"]
    assert listed[0].digest == listed[1].digest, "the same data asked for twice is the same data"

    # A version is never changed once uploaded.
    assert upload_dataset.main(["--state-dir", str(tmp_path), "--version", "v1"]) == 2
    assert "version v1 already exists under" in capsys.readouterr().err


def test_each_default_upload_is_new_data_so_it_trains() -> None:
    assert upload_dataset.next_version([]) == "v1"
    assert upload_dataset.next_version(["v1", "v9", "v10", "latest"]) == "v11"
    first, second = upload_dataset.default_data_uri([]), upload_dataset.default_data_uri(["v1"])
    assert first.startswith("synthetic://?") and first.endswith("&seed=1") and second.endswith("&seed=2")
