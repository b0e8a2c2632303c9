"""Checkpoint stores (remote/checkpoint_store.py): S3 on moto, a local folder, and a bucket that refuses writes."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import pytest
import torch
from botocore.stub import Stubber

from remote import checkpoints, engine
from remote.checkpoint_store import LocalStore, S3Store, open_store
from remote.models import DamageCNN
from tests.support.aws_cloud import in_process_aws

CPU = torch.device("cpu")


def _fit(checkpointer: checkpoints.Checkpointer, epochs: int) -> engine.FitResult:
    engine.seed_everything(0)
    model = DamageCNN(16, (4,), 4, 0.0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0.0, 1.0] * 4)
    options = engine.FitOptions(epochs=epochs, batch_size=4, learning_rate=1e-3, device=CPU, bf16=False)
    return engine.fit(model, (images, labels), (images, labels), options, checkpoints=checkpointer)


KEY_ID, SECRET = "AKIACHECKPOINTTEST", "checkpoint-test-secret"


def _client() -> object:
    return boto3.client("s3", region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with in_process_aws():
        boto3.client("s3").create_bucket(Bucket="trainer")
        yield


def test_s3_checkpoints_under_the_runs_prefix_are_pruned_and_resumed(aws):
    store = open_store("s3://trainer/checkpoints/", "run1")
    assert isinstance(store, S3Store) and store.location == "s3://trainer/checkpoints/run1/"
    tags: dict[str, str] = {}
    _fit(checkpoints.Checkpointer(store, 0.0, tags.__setitem__), epochs=3)
    listed = boto3.client("s3").list_objects_v2(Bucket="trainer")["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        f"checkpoints/run1/ckpt-00000{epoch}/{name}" for epoch in (2, 3) for name in ("manifest.json", "state.pt")
    ]
    assert open_store("s3://trainer/checkpoints", "run2").keys() == []  # another run's prefix is its own

    ran = _fit(checkpoints.Checkpointer(store, 0.0, tags.__setitem__), epochs=4)
    assert [result.epoch for result in ran.history] == [1, 2, 3, 4]
    assert tags == {checkpoints.TAG_RESUMED_FROM: "3", checkpoints.TAG_RESUMES: "1"}


def test_a_bucket_that_refuses_writes_leaves_training_going_with_a_warning_and_a_tag(caplog):
    """AccessDenied on the first write: training finishes, the log says what failed and what to do, the run is
    tagged, and no further write is tried (the stub would fail on an unexpected call)."""
    client = _client()
    stub = Stubber(client)
    stub.add_response("list_objects_v2", {"KeyCount": 0}, {"Bucket": "trainer", "Prefix": "ckpt/run1/"})
    stub.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    tags: dict[str, str] = {}
    with stub, caplog.at_level(logging.WARNING, logger="remote.checkpoints"):
        fitted = _fit(checkpoints.Checkpointer(S3Store("trainer", "ckpt/run1/", client), 0.0, tags.__setitem__), 3)
    stub.assert_no_pending_responses()
    assert len(fitted.history) == 3
    assert tags == {
        checkpoints.TAG_ERROR: "cannot write epoch 1 to s3://trainer/ckpt/run1/: AccessDenied: Access Denied"
    }
    (line,) = [record.getMessage() for record in caplog.records]
    assert "cannot write epoch 1 to s3://trainer/ckpt/run1/: AccessDenied" in line
    assert "WITHOUT checkpoints" in line and "s3:PutObject" in line and "config/iam/instance.json" in line
    assert KEY_ID not in caplog.text and SECRET not in caplog.text


def test_a_prefix_that_cannot_be_listed_is_not_written_over(caplog):
    """Listing refused at the start: what is there could not be read, so nothing is written over it."""
    client = _client()
    stub = Stubber(client)
    stub.add_client_error("list_objects_v2", "AccessDenied", "Access Denied", 403)
    tags: dict[str, str] = {}
    with stub, caplog.at_level(logging.WARNING, logger="remote.checkpoints"):
        _fit(checkpoints.Checkpointer(S3Store("trainer", "ckpt/run1/", client), 0.0, tags.__setitem__), 2)
    stub.assert_no_pending_responses()
    assert tags[checkpoints.TAG_ERROR].startswith("cannot list s3://trainer/ckpt/run1/: AccessDenied")


@pytest.mark.parametrize("uri", ["{folder}", "file://{folder}"])
def test_local_folders(tmp_path: Path, uri: str):
    store = open_store(uri.format(folder=tmp_path), "run1")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "run1"
    assert store.keys() == []
    store.put("ckpt-000001/state.pt", b"data")
    assert store.keys() == ["ckpt-000001/state.pt"] and store.get("ckpt-000001/state.pt") == b"data"
    store.delete("ckpt-000001/state.pt")
    assert store.keys() == [] and not (tmp_path / "run1" / "ckpt-000001").exists()


def test_a_folder_that_cannot_be_written_names_the_folders_fix(tmp_path: Path, caplog):
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    tags: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="remote.checkpoints"):
        _fit(checkpoints.Checkpointer(LocalStore(blocked / "run1"), 0.0, tags.__setitem__), 1)
    assert tags[checkpoints.TAG_ERROR].startswith(f"cannot write epoch 1 to {blocked / 'run1'}: ")
    assert "the folder is writable" in caplog.text and "s3:PutObject" not in caplog.text
