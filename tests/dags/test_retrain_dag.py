"""dags/ec2_retrain.py: its DAGs, schedules and asset follow the [datasets] and [retrain] settings (off by default)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import REPO

RETRAIN_FILE = REPO / "dags" / "ec2_retrain.py"


def parse(monkeypatch: pytest.MonkeyPatch, **settings: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    for name, value in settings.items():
        monkeypatch.setenv(f"TRAINER__{name}", value)
    bag = DagBag(dag_folder=str(RETRAIN_FILE))
    assert not bag.import_errors, bag.import_errors
    return bag


def test_off_by_default_only_a_manual_retrain(airflow_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bag = parse(monkeypatch)
    assert sorted(bag.dags) == ["ec2_retrain"]
    dag = bag.dags["ec2_retrain"]
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert [t.task_id for t in dag.tasks] == ["resolve", "trigger_training"]
    trigger = dag.get_task("trigger_training")
    assert trigger.trigger_dag_id == "ec2_training" and trigger.skip_when_already_exists


def test_each_way_in_is_wired_when_set(airflow_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.datasets.triggers import DatasetQueueTrigger

    bag = parse(
        monkeypatch,
        DATASETS__URI="s3://bkt/versions/",
        DATASETS__SQS_QUEUE_URL="https://sqs.us-east-1.amazonaws.com/123456789012/q",
        DATASETS__POLL_MINUTES="10",
        RETRAIN__SCHEDULE="0 3 * * 1",
    )
    assert sorted(bag.dags) == ["ec2_dataset_poll", "ec2_retrain"]
    retrain = bag.dags["ec2_retrain"]
    assert type(retrain.timetable).__name__ == "AssetOrTimeSchedule"
    (asset,) = retrain.timetable.asset_condition.objects
    assert asset.name == "s3://bkt/versions/" and asset.uri.startswith("s3://bkt/versions")
    (watcher,) = asset.watchers
    assert isinstance(watcher.trigger, DatasetQueueTrigger)
    assert watcher.trigger.serialize()[1]["queue_url"] == "https://sqs.us-east-1.amazonaws.com/123456789012/q"
    poll = bag.dags["ec2_dataset_poll"]
    assert type(poll.timetable).__name__ == "DeltaTriggerTimetable"
    assert poll.timetable.delta == timedelta(minutes=10)
    task = poll.get_task("look_for_new_version")
    assert (task.window_s, task.every_s, task.datasets_uri) == (300.0, 30.0, "s3://bkt/versions/")


def test_a_schedule_alone_retrains_on_cron(airflow_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bag = parse(monkeypatch, DATASETS__URI="s3://bkt/versions/", RETRAIN__SCHEDULE="0 3 * * 1")
    retrain = bag.dags["ec2_retrain"]
    assert type(retrain.timetable).__name__ == "AssetOrTimeSchedule"
    assert sorted(bag.dags) == ["ec2_retrain"]


def test_a_bad_setting_names_itself_in_the_import_error(airflow_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("TRAINER__DATASETS__URI", "s3://bkt/no-trailing-slash")
    bag = DagBag(dag_folder=str(RETRAIN_FILE))
    assert "datasets.uri: 's3://bkt/no-trailing-slash' is invalid" in "".join(bag.import_errors.values())
