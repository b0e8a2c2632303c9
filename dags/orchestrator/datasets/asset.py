"""The dataset as an Airflow asset: updated by the SQS watcher (datasets.sqs_queue_url) or the poll DAG; ec2_retrain
is scheduled on it. Built when the DAG file is parsed, from the few settings that parsing reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.sdk import Asset

    from orchestrator.config.settings import WatchSettings

WATCHER_NAME = "ec2_trainer_dataset_queue"


def dataset_asset(watch: WatchSettings) -> Asset | None:
    """The asset of datasets.uri (None when unset), watched through SQS when datasets.sqs_queue_url is set."""
    from airflow.sdk import Asset, AssetWatcher

    from orchestrator.datasets.triggers import DatasetQueueTrigger

    d = watch.datasets
    if not d.uri:
        return None
    watchers = []
    if d.sqs_queue_url:
        trigger = DatasetQueueTrigger(
            queue_url=d.sqs_queue_url,
            datasets_uri=d.uri,
            marker=d.marker,
            aws_conn_id=watch.aws.conn_id,
            region=watch.aws.region,
        )
        watchers.append(AssetWatcher(name=WATCHER_NAME, trigger=trigger))
    # Named by its URI (Airflow's default): Airflow deactivates an asset whose name another URI already holds, so a
    # fixed name would leave the asset of a changed datasets.uri inactive, failing the poll DAG's updates.
    return Asset(uri=d.uri, watchers=watchers)


def poll_window(poll_minutes: int) -> tuple[float, float]:
    """(how long one poll run looks, seconds between looks): half the interval, so a run ends before the next is
    due, looking every tenth of it (between 5 s and a minute)."""
    window_s = poll_minutes * 60 / 2
    return window_s, min(60.0, max(5.0, window_s / 10))
