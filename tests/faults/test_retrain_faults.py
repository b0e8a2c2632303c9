"""Retraining without a person (ec2_retrain, ec2_dataset_poll, the SQS watcher) on the embedded default's S3, SQS,
GitHub stand-in and MLflow: a half-uploaded version trains nothing, neither does a commit and data already trained,
and an unreachable queue is waited out. Each test has its own prefix in the stack's dataset bucket.

The whole path on a live Airflow (watcher, ec2_retrain, one ec2_training): tests/deploy/test_retrain_deployment.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from embedded.cloud import DATASET_BUCKET
from embedded.deploy.stack import TINY_DATA_URI, EmbeddedStack
from embedded.services.datasets import upload_version
from tests.support.fault_table import FaultTable
from tests.support.faults import output, record_nothing_launched
from tests.support.pipeline import run_dag, task_states, with_quick_retries

pytestmark = pytest.mark.slow

# Enough to see the watcher fail, log and back off at least once (botocore's own retries come first).
UNREACHABLE_WATCH_S = 25.0


@pytest.fixture
def policy_values(env: EmbeddedStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The values the stand-in fills the IAM policies with for this test: its own prefix and queue, as a deployment
    configured with them has them in its policies."""
    values: dict[str, str] = {}
    monkeypatch.setattr(env.cloud.gate, "policy_of", lambda name: env.cloud.policy(name, values))
    return values


@pytest.fixture
def datasets(env: EmbeddedStack, sha: str, monkeypatch: pytest.MonkeyPatch, policy_values: dict[str, str]) -> str:
    """A prefix of the stack's dataset bucket of this test's own, retraining the commit under test."""
    policy_values["PREFIX"] = f"test-{secrets.token_hex(4)}"
    uri = f"s3://{DATASET_BUCKET}/{policy_values['PREFIX']}/"
    monkeypatch.setenv("TRAINER__DATASETS__URI", uri)
    monkeypatch.setenv("TRAINER__RETRAIN__BRANCH", sha)
    return uri


def load_dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.path.join(os.environ["AIRFLOW__CORE__DAGS_FOLDER"], "ec2_retrain.py"))
    assert not bag.import_errors, bag.import_errors
    return with_quick_retries(bag.get_dag(dag_id))


def training_runs() -> dict[str, dict[str, Any]]:
    """Every ec2_training DagRun in Airflow's database: its conf and state."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == "ec2_training")).all()
        return {run.run_id: {"conf": dict(run.conf or {}), "state": str(run.state)} for run in runs}


@dataclass(frozen=True)
class RetrainFaults:
    """What a retrain fault test reads and records: the output logged, and the test's row once no planted secret shows
    in the log it passes (nothing is launched by these faults)."""

    planted: dict[str, str]
    capfd: pytest.CaptureFixture[str]
    caplog: pytest.LogCaptureFixture
    table: FaultTable

    def log(self) -> str:
        return output(self.capfd, self.caplog)

    def clear(self) -> None:
        """Forget what was logged so far: the next `log()` holds only what comes after."""
        self.capfd.readouterr()
        self.caplog.clear()

    def record(self, log: str, scenario: str, expected: str, observed: str) -> None:
        record_nothing_launched(self.table, scenario, expected, observed, planted=self.planted, places={"log": log})


@pytest.fixture
def retrain_faults(
    planted: dict[str, str],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault_table: FaultTable,
) -> RetrainFaults:
    """The planted secrets (in the connections), the captured output and the test's fault-table row."""
    return RetrainFaults(planted, capfd, caplog, fault_table)


def test_incomplete_upload_trains_nothing(
    env: EmbeddedStack,
    datasets: str,
    retrain_faults: RetrainFaults,
) -> None:
    before = training_runs()
    keys = upload_version(env.cloud.client("s3"), datasets, "v1", data_uri=TINY_DATA_URI, complete=False)
    dag_run = load_dag("ec2_retrain").test()
    log = retrain_faults.log()
    states = task_states(dag_run)
    assert str(dag_run.state) == "success" and states == {"resolve": "skipped", "trigger_training": "skipped"}
    reason = (
        f"no complete dataset version under {datasets} (a version is complete once its '_SUCCESS' object is written)"
    )
    assert f"{reason}; without their marker (still uploading?): v1" in log
    assert training_runs() == before
    retrain_faults.record(
        log,
        "dataset version uploaded without its marker (ec2_retrain)",
        "skipped with the reason, no training started",
        f"{len(keys)} objects, no _SUCCESS: resolve skipped 'no complete dataset version ... still uploading?: v1'; "
        "0 ec2_training runs",
    )


def test_training_on_a_half_uploaded_version_fails_before_launch(
    env: EmbeddedStack,
    datasets: str,
    sha: str,
    retrain_faults: RetrainFaults,
) -> None:
    upload_version(env.cloud.client("s3"), datasets, "v1", data_uri=TINY_DATA_URI, complete=False)
    dag_run = run_dag(git_ref=sha, data_uri=f"{datasets}v1/")
    log = retrain_faults.log()
    states = task_states(dag_run)
    assert str(dag_run.state) == "failed" and states["plan_launch"] == "failed", states
    assert states["launch"] != "success"
    assert f"dataset version 'v1' ({datasets}v1/) is incomplete: its marker" in log
    instances = env.cloud.client("ec2").describe_instances(
        Filters=[{"Name": "tag:ec2-trainer:run_id", "Values": [dag_run.run_id]}]
    )["Reservations"]
    assert instances == []
    retrain_faults.record(
        log,
        "ec2_training given a version without its marker",
        "plan_launch fails without retry, saying to wait for the marker; nothing launched",
        "plan_launch failed try 1: 'dataset version 'v1' ... is incomplete: its marker ... is missing. Wait'; "
        "0 instances",
    )


def test_nothing_changed_since_the_last_training_is_skipped(
    env: EmbeddedStack,
    datasets: str,
    sha: str,
    monkeypatch: pytest.MonkeyPatch,
    retrain_faults: RetrainFaults,
) -> None:
    from mlflow import MlflowClient

    from orchestrator.config.settings import DatasetSettings
    from orchestrator.contracts import PROMOTION_TAG
    from orchestrator.datasets.s3 import scan

    # On a schedule (and on the asset): the same decision either way.
    monkeypatch.setenv("TRAINER__RETRAIN__SCHEDULE", "0 3 * * 1")
    s3 = env.cloud.client("s3")
    upload_version(s3, datasets, "v1", data_uri=TINY_DATA_URI)
    dag = load_dag("ec2_retrain")
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    first = dag.test()
    assert task_states(first) == {"resolve": "success", "trigger_training": "success"}, task_states(first)
    (version,), _ = scan(s3, DatasetSettings(uri=datasets))
    triggered = {rid: run for rid, run in training_runs().items() if rid.startswith(f"retrain__{sha[:12]}__")}
    run_id = f"retrain__{sha[:12]}__{version.digest[:12]}"
    assert triggered[run_id]["conf"] == {"git_ref": sha, "data_uri": f"{datasets}v1/"}
    # That training finished and was gated: its MLflow run carries the commit and the data, as the train task tags
    # it, and the gate's verdict, as evaluate tags it.
    client = MlflowClient(env.mlflow.url)
    experiment = client.get_experiment_by_name("hurricane-damage-embedded")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("hurricane-damage-embedded")
    tags = {"mlflow.source.git.commit": sha, **version.tags(), PROMOTION_TAG: "not_promoted"}
    trained = client.create_run(experiment_id, tags=tags)
    client.set_terminated(trained.info.run_id, "FINISHED")
    retrain_faults.clear()
    again = dag.test()
    log = retrain_faults.log()
    assert str(again.state) == "success"
    assert task_states(again) == {"resolve": "skipped", "trigger_training": "skipped"}
    assert f"nothing changed: MLflow run {trained.info.run_id} already trained commit {sha} on this data" in log
    assert [rid for rid in training_runs() if rid.startswith(f"retrain__{sha[:12]}__")] == [run_id]
    retrain_faults.record(
        log,
        "scheduled retrain, nothing changed since a finished, gated training of that commit and data",
        "skipped with the reason, no GPU time",
        "first run triggered ec2_training; after its MLflow run FINISHED and gated the next resolve skipped "
        "'nothing changed: MLflow run ... already trained commit ...'; 1 ec2_training run",
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
    upload_version(env.cloud.client("s3"), datasets, "v1", data_uri=TINY_DATA_URI, as_zip=True)
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


def sqs_event(key: str) -> str:
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": DATASET_BUCKET}, "object": {"key": key}}}
    return json.dumps({"Records": [record]})


@pytest.fixture
def queue(env: EmbeddedStack, policy_values: dict[str, str]) -> Iterator[str]:
    sqs = env.cloud.client("sqs")
    policy_values["QUEUE"] = f"test-{secrets.token_hex(4)}"
    url = str(sqs.create_queue(QueueName=policy_values["QUEUE"])["QueueUrl"])
    yield url
    sqs.delete_queue(QueueUrl=url)


def queue_watcher(queue: str, datasets: str) -> Any:
    from orchestrator.datasets.triggers import DatasetQueueTrigger

    return DatasetQueueTrigger(
        queue_url=queue,
        datasets_uri=datasets,
        marker="_SUCCESS",
        aws_conn_id="aws_default",
        region="us-east-1",
        wait_s=1,
    )


def first_event(trigger: Any) -> Any:
    """The watcher's first event; resumed, it deletes what it read and goes on receiving, still alive when stopped."""

    async def watch() -> Any:
        runner = trigger.run()
        event = await asyncio.wait_for(anext(runner), 60)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(runner), 5)
        return event

    return asyncio.run(watch())


def test_the_watcher_fires_once_per_batch_of_markers(env: EmbeddedStack, datasets: str, queue: str) -> None:
    _, prefix = datasets.split(f"{DATASET_BUCKET}/", 1)
    sqs = env.cloud.client("sqs")
    for key in (f"{prefix}v1/train_another/damage/a.jpeg", f"{prefix}v1/_SUCCESS", f"{prefix}v2/_SUCCESS"):
        sqs.send_message(QueueUrl=queue, MessageBody=sqs_event(key))
    trigger = queue_watcher(queue, datasets)

    event = first_event(trigger)
    assert event.payload == {"versions": ["v1", "v2"], "datasets_uri": datasets}
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert (left["ApproximateNumberOfMessages"], left["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
    assert trigger.serialize()[0] == "orchestrator.datasets.triggers.DatasetQueueTrigger"


def test_a_poison_message_is_deleted_and_the_marker_after_it_trains(
    env: EmbeddedStack,
    datasets: str,
    sha: str,
    queue: str,
    retrain_faults: RetrainFaults,
) -> None:
    _, prefix = datasets.split(f"{DATASET_BUCKET}/", 1)
    # Data of its own (another seed): the skip compares contents, and another test in this process gated TINY's.
    upload_version(env.cloud.client("s3"), datasets, "v1", data_uri=TINY_DATA_URI.replace("seed=0", "seed=7"))
    sqs = env.cloud.client("sqs")
    poison = [
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": [f"{prefix}v1/_SUCCESS"]}]}),
        "[" * 100_000 + "]" * 100_000,  # deeper than json's recursion limit
        "{" + " " * 300_000 + "}",  # over 256 KiB
    ]
    for body in [*poison, sqs_event(f"{prefix}v1/_SUCCESS")]:
        sqs.send_message(QueueUrl=queue, MessageBody=body)
    trigger = queue_watcher(queue, datasets)

    event = first_event(trigger)
    assert event.payload == {"versions": ["v1"], "datasets_uri": datasets}
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert (left["ApproximateNumberOfMessages"], left["ApproximateNumberOfMessagesNotVisible"]) == ("0", "0")
    # The asset event schedules ec2_retrain, which starts the training (a live scheduler does the same).
    dag_run = load_dag("ec2_retrain").test()
    log = retrain_faults.log()
    assert task_states(dag_run) == {"resolve": "success", "trigger_training": "success"}, task_states(dag_run)
    # This test's trainings: its own prefix (other tests in this process start trainings of the same commit).
    started = [
        run
        for rid, run in training_runs().items()
        if rid.startswith(f"retrain__{sha[:12]}__") and run["conf"].get("data_uri", "").startswith(datasets)
    ]
    assert [run["conf"] for run in started] == [{"git_ref": sha, "data_uri": f"{datasets}v1/"}]
    unreadable = [line for line in log.splitlines() if "Deleting the unreadable message" in line]
    assert len(unreadable) == len(poison), log
    assert "Records[0].s3 is a list, not a dict" in log and "RecursionError" in log and "over the 262144" in log
    retrain_faults.record(
        log,
        "poison SQS messages (s3 as a list, JSON nested 100000 deep, 300 KiB) before a valid marker",
        "each logged and deleted as unreadable; the valid marker fires, ec2_retrain starts one training",
        f"{len(poison)} 'Deleting the unreadable message' warnings; event versions ['v1']; queue empty; "
        "1 ec2_training run on v1",
    )


def test_a_batch_the_watcher_cannot_delete_is_logged_and_watching_goes_on(
    env: EmbeddedStack,
    datasets: str,
    queue: str,
    policy_values: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def without_delete(name: str) -> dict[str, Any]:
        policy = env.cloud.policy(name, policy_values)
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            statement["Action"] = [action for action in actions if action != "sqs:DeleteMessage"]
        policy["Statement"] = [statement for statement in policy["Statement"] if statement["Action"]]
        return policy

    # The deployment's policy lacks sqs:DeleteMessage: the stand-in denies the delete as SQS would.
    monkeypatch.setattr(env.cloud.gate, "policy_of", without_delete)
    _, prefix = datasets.split(f"{DATASET_BUCKET}/", 1)
    sqs = env.cloud.client("sqs")
    sqs.send_message(QueueUrl=queue, MessageBody=sqs_event(f"{prefix}v1/_SUCCESS"))
    trigger = queue_watcher(queue, datasets)

    event = first_event(trigger)
    log = output(capfd, caplog)
    assert event.payload == {"versions": ["v1"], "datasets_uri": datasets}
    warnings = [line for line in log.splitlines() if "Cannot delete messages from the dataset queue" in line]
    assert len(warnings) == 1 and "AccessDenied" in warnings[0] and "sqs:DeleteMessage" in warnings[0], log
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert left["ApproximateNumberOfMessagesNotVisible"] == "1", left


def test_an_unreachable_queue_is_waited_out(
    env: EmbeddedStack,
    datasets: str,
    monkeypatch: pytest.MonkeyPatch,
    retrain_faults: RetrainFaults,
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
    log = retrain_faults.log()
    warnings = [line for line in log.splitlines() if "Cannot read the dataset queue" in line]
    assert events == [] and len(warnings) >= 2, log
    assert "check datasets.sqs_queue_url and the aws connection's sqs:ReceiveMessage. Next try in 2 s" in warnings[0]
    assert "Next try in 4 s" in warnings[1]
    retrain_faults.record(
        log,
        "SQS queue unreachable (the asset watcher)",
        "the watcher logs why and retries with back-off; no event, no training",
        f"{len(warnings)} warning(s) in {UNREACHABLE_WATCH_S:.0f} s: 'Cannot read the dataset queue ... Next try in "
        "2 s', then 4 s; 0 events",
    )
