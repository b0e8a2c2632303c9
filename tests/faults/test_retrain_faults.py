"""Retraining without a person (ec2_retrain, ec2_dataset_poll, the SQS watcher) on the embedded default's S3, SQS,
GitHub stand-in and MLflow: a half-uploaded version trains nothing, neither does a commit and data already trained,
and an unreachable queue is waited out. Each test has its own prefix in the stack's dataset bucket.

The whole path on a live Airflow (watcher, ec2_retrain, one ec2_training): tests/deploy/test_retrain_deployment.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from embedded.cloud import DATASET_BUCKET
from embedded.datasets import upload_version
from embedded.stack import TINY_DATA_URI, EmbeddedStack
from tests.fault_table import FaultTable
from tests.faults.support import output
from tests.leak_scan import planted_found
from tests.pipeline_fixtures import run_dag, task_states

pytestmark = pytest.mark.slow

# Enough to see the watcher fail, log and back off at least once (botocore's own retries come first).
UNREACHABLE_WATCH_S = 25.0


@pytest.fixture
def datasets(env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A prefix of the stack's dataset bucket of this test's own, retraining the commit under test."""
    uri = f"s3://{DATASET_BUCKET}/test-{secrets.token_hex(4)}/"
    monkeypatch.setenv("TRAINER__DATASETS__URI", uri)
    monkeypatch.setenv("TRAINER__RETRAIN__BRANCH", sha)
    return uri


def load_dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.path.join(os.environ["AIRFLOW__CORE__DAGS_FOLDER"], "ec2_retrain.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id)


def training_runs() -> dict[str, dict[str, Any]]:
    """Every ec2_training DagRun in Airflow's database: its conf and state."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == "ec2_training")).all()
        return {run.run_id: {"conf": dict(run.conf or {}), "state": str(run.state)} for run in runs}


def no_planted_secret(planted: dict[str, str], log: str) -> int:
    found = planted_found(planted, {"log": log})
    assert not found, found
    return 0


def test_incomplete_upload_trains_nothing(
    datasets: str,
    planted: dict[str, str],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    before = training_runs()
    keys = upload_version(env_s3(), datasets, "v1", data_uri=TINY_DATA_URI, complete=False)
    dag_run = load_dag("ec2_retrain").test()
    log = output(capfd, caplog)
    states = task_states(dag_run)
    assert str(dag_run.state) == "success" and states == {"resolve": "skipped", "trigger_training": "skipped"}
    reason = (
        f"no complete dataset version under {datasets} (a version is complete once its '_SUCCESS' object is written)"
    )
    assert f"{reason}; without their marker (still uploading?): v1" in log
    assert training_runs() == before
    fault_table.record(
        "dataset version uploaded without its marker (ec2_retrain)",
        "skipped with the reason, no training started",
        f"{len(keys)} objects, no _SUCCESS: resolve skipped 'no complete dataset version ... still uploading?: v1'; "
        "0 ec2_training runs",
        0,
        no_planted_secret(planted, log),
    )


def test_training_on_a_half_uploaded_version_fails_before_launch(
    env: EmbeddedStack,
    datasets: str,
    sha: str,
    planted: dict[str, str],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    upload_version(env_s3(), datasets, "v1", data_uri=TINY_DATA_URI, complete=False)
    dag_run = run_dag(git_ref=sha, data_uri=f"{datasets}v1/")
    log = output(capfd, caplog)
    states = task_states(dag_run)
    assert str(dag_run.state) == "failed" and states["plan_launch"] == "failed", states
    assert states["launch"] != "success"
    assert f"dataset version 'v1' ({datasets}v1/) is incomplete: its marker" in log
    instances = env.cloud.client("ec2").describe_instances(
        Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [dag_run.run_id]}]
    )["Reservations"]
    assert instances == []
    fault_table.record(
        "ec2_training given a version without its marker",
        "plan_launch fails without retry, saying to wait for the marker; nothing launched",
        "plan_launch failed try 1: 'dataset version 'v1' ... is incomplete: its marker ... is missing. Wait'; "
        "0 instances",
        0,
        no_planted_secret(planted, log),
    )


def test_nothing_changed_since_the_last_training_is_skipped(
    env: EmbeddedStack,
    datasets: str,
    sha: str,
    planted: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    from mlflow import MlflowClient

    from orchestrator.datasets.s3 import scan
    from orchestrator.settings import DatasetSettings

    # On a schedule (and on the asset): the same decision either way.
    monkeypatch.setenv("TRAINER__RETRAIN__SCHEDULE", "0 3 * * 1")
    s3 = env_s3()
    upload_version(s3, datasets, "v1", data_uri=TINY_DATA_URI)
    dag = load_dag("ec2_retrain")
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    first = dag.test()
    assert task_states(first) == {"resolve": "success", "trigger_training": "success"}, task_states(first)
    (version,), _ = scan(s3, DatasetSettings(uri=datasets))
    triggered = {rid: run for rid, run in training_runs().items() if rid.startswith(f"retrain__{sha[:12]}__")}
    run_id = f"retrain__{sha[:12]}__{version.digest[:12]}"
    assert triggered[run_id]["conf"] == {"git_ref": sha, "data_uri": f"{datasets}v1/"}
    # That training finished: its MLflow run carries the commit and the data, as the train task tags it.
    client = MlflowClient(env.mlflow.url)
    experiment = client.get_experiment_by_name("hurricane-damage-embedded")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("hurricane-damage-embedded")
    trained = client.create_run(experiment_id, tags={"mlflow.source.git.commit": sha, **version.tags()})
    client.set_terminated(trained.info.run_id, "FINISHED")
    capfd.readouterr()
    caplog.clear()
    again = dag.test()
    log = output(capfd, caplog)
    assert str(again.state) == "success"
    assert task_states(again) == {"resolve": "skipped", "trigger_training": "skipped"}
    assert f"nothing changed: MLflow run {trained.info.run_id} already trained commit {sha} on this data" in log
    assert [rid for rid in training_runs() if rid.startswith(f"retrain__{sha[:12]}__")] == [run_id]
    fault_table.record(
        "scheduled retrain, nothing changed since a finished training of that commit and data",
        "skipped with the reason, no GPU time",
        "first run triggered ec2_training; after its MLflow run FINISHED the next resolve skipped 'nothing changed: "
        "MLflow run ... already trained commit ...'; 1 ec2_training run",
        0,
        no_planted_secret(planted, log),
    )


def test_the_poll_dag_updates_the_asset_once_per_new_version(
    env: EmbeddedStack,
    datasets: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    monkeypatch.setenv("TRAINER__DATASETS__POLL_MINUTES", "1")
    upload_version(env_s3(), datasets, "v1", data_uri=TINY_DATA_URI, as_zip=True)
    dag = load_dag("ec2_dataset_poll")
    first = dag.test()
    assert task_states(first) == {"look_for_new_version": "success"}
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == datasets.rstrip("/"))
        ).all()
        extras = [dict(event.extra) for event in events]
    assert len(extras) == 1 and extras[0]["version"] == "v1" and extras[0]["uri"] == f"{datasets}v1/data.zip"
    # Nothing new: the deferred check looks for its window (half the minute), then skips saying why.
    capfd.readouterr()
    caplog.clear()
    second = dag.test()
    assert task_states(second) == {"look_for_new_version": "skipped"}
    assert f"no new complete dataset version under {datasets} within 30 s (latest: 'v1'" in output(capfd, caplog)


def env_s3() -> Any:
    from orchestrator.connections import aws_client

    return aws_client("s3", "aws_default", "us-east-1")


def sqs_event(key: str) -> str:
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": DATASET_BUCKET}, "object": {"key": key}}}
    return json.dumps({"Records": [record]})


@pytest.fixture
def queue(env: EmbeddedStack) -> Iterator[str]:
    sqs = env.cloud.client("sqs")
    url = str(sqs.create_queue(QueueName=f"test-{secrets.token_hex(4)}")["QueueUrl"])
    yield url
    sqs.delete_queue(QueueUrl=url)


def test_the_watcher_fires_once_per_batch_of_markers(env: EmbeddedStack, datasets: str, queue: str) -> None:
    from orchestrator.datasets.triggers import DatasetQueueTrigger

    _, prefix = datasets.split(f"{DATASET_BUCKET}/", 1)
    sqs = env.cloud.client("sqs")
    for key in (f"{prefix}v1/train_another/damage/a.jpeg", f"{prefix}v1/_SUCCESS", f"{prefix}v2/_SUCCESS"):
        sqs.send_message(QueueUrl=queue, MessageBody=sqs_event(key))
    trigger = DatasetQueueTrigger(
        queue_url=queue,
        datasets_uri=datasets,
        marker="_SUCCESS",
        aws_conn_id="aws_default",
        region="us-east-1",
        wait_s=1,
    )

    async def first_event() -> Any:
        runner = trigger.run()
        event = await asyncio.wait_for(anext(runner), 30)
        # Resumed, it deletes what it read, then waits for more: stopped there.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(anext(runner), 5)
        return event

    event = asyncio.run(first_event())
    assert event.payload == {"versions": ["v1", "v2"], "datasets_uri": datasets}
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert (left["ApproximateNumberOfMessages"], left["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
    assert trigger.serialize()[0] == "orchestrator.datasets.triggers.DatasetQueueTrigger"


def test_an_unreachable_queue_is_waited_out(
    env: EmbeddedStack,
    datasets: str,
    planted: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> None:
    from embedded.process import free_port
    from orchestrator.datasets.triggers import DatasetQueueTrigger

    closed = f"http://127.0.0.1:{free_port()}"
    broken = json.loads(os.environ["AIRFLOW_CONN_AWS_DEFAULT"])
    broken["extra"]["endpoint_url"] = closed
    monkeypatch.setenv("AIRFLOW_CONN_AWS_BROKEN", json.dumps(broken))
    trigger = DatasetQueueTrigger(
        queue_url=f"{closed}/123456789012/gone",
        datasets_uri=datasets,
        marker="_SUCCESS",
        aws_conn_id="aws_broken",
        region="us-east-1",
        wait_s=1,
    )

    async def watch() -> list[Any]:
        events: list[Any] = []

        async def collect() -> None:
            async for event in trigger.run():
                events.append(event)

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(collect(), UNREACHABLE_WATCH_S)
        return events

    events = asyncio.run(watch())
    log = output(capfd, caplog)
    warnings = [line for line in log.splitlines() if "Cannot read the dataset queue" in line]
    assert events == [] and len(warnings) >= 2, log
    assert "check datasets.sqs_queue_url and the aws connection's sqs:ReceiveMessage. Next try in 2 s" in warnings[0]
    assert "Next try in 4 s" in warnings[1]
    fault_table.record(
        "SQS queue unreachable (the asset watcher)",
        "the watcher logs why and retries with back-off; no event, no training",
        f"{len(warnings)} warning(s) in {UNREACHABLE_WATCH_S:.0f} s: 'Cannot read the dataset queue ... Next try in "
        "2 s', then 4 s; 0 events",
        0,
        no_planted_secret(planted, log),
    )
