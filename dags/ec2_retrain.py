"""Retrain without a person: a new complete dataset version (an Airflow asset, updated by S3 event notifications
through SQS or by the poll DAG) or, when retrain.schedule is set, the schedule starts ec2_training on the latest
complete version and the retrained branch's commit; nothing is trained twice on the same commit and data.

Two DAGs, wired here only (logic in orchestrator/datasets/): ec2_retrain, and ec2_dataset_poll where a deployment has
no SQS (datasets.poll_minutes). Their schedules and the asset come from the [datasets] and [retrain] settings, read
when this file is parsed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, get_current_context, task

from orchestrator.config.settings import load_watch_settings
from orchestrator.dag_docs import dag_doc
from orchestrator.datasets.asset import dataset_asset, poll_window
from orchestrator.datasets.operators import DatasetPollOperator
from orchestrator.tracking.training_runs import TRAINING_DAG_ID

WATCH = load_watch_settings()
DATASET = dataset_asset(WATCH)
CRON = CronTriggerTimetable(WATCH.retrain.schedule, timezone="UTC") if WATCH.retrain.schedule else None
START = pendulum.datetime(2024, 1, 1, tz="UTC")

if DATASET is not None and CRON is not None:
    schedule: Any = AssetOrTimeSchedule(timetable=CRON, assets=[DATASET])
elif DATASET is not None:
    schedule = [DATASET]
else:
    schedule = CRON

with DAG(
    dag_id="ec2_retrain",
    description="Retrain on the latest complete dataset version: on new data, on a schedule; once per commit and data",
    schedule=schedule,
    start_date=START,
    catchup=False,
    # A burst of dataset events queues behind one run; each run trains the latest version anyway.
    max_active_runs=1,
    tags=["training", "retrain"],
    doc_md=dag_doc("ec2_retrain"),
):

    @task(retries=2, retry_delay=timedelta(seconds=30), multiple_outputs=True)
    def resolve() -> dict[str, Any]:
        from orchestrator.config.settings import load_settings
        from orchestrator.datasets.retrain import resolve as resolve_retrain
        from orchestrator.errors import fail_without_retry

        with fail_without_retry():  # no retry fixes a bad setting (a ConfigError)
            s = load_settings()
        return resolve_retrain(s, get_current_context()["ti"])

    resolved = resolve()
    TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id=TRAINING_DAG_ID,
        # Derived from (commit, digest): a second trigger of the same pair finds the run and is skipped.
        trigger_run_id=resolved["run_id"],
        conf=resolved["conf"],
        skip_when_already_exists=True,
        wait_for_completion=False,
    )

if DATASET is not None and WATCH.datasets.poll_minutes:
    window_s, every_s = poll_window(WATCH.datasets.poll_minutes)
    with DAG(
        dag_id="ec2_dataset_poll",
        description="Without SQS: look for a new complete dataset version in S3 (deferred) and update the asset",
        schedule=timedelta(minutes=WATCH.datasets.poll_minutes),
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=["retrain"],
        doc_md=dag_doc("ec2_dataset_poll"),
    ):
        DatasetPollOperator(
            task_id="look_for_new_version",
            asset=DATASET,
            datasets_uri=WATCH.datasets.uri,
            marker=WATCH.datasets.marker,
            aws_conn_id=WATCH.aws.conn_id,
            region=WATCH.aws.region,
            window_s=window_s,
            every_s=every_s,
        )
