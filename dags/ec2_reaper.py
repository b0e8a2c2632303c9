"""Backstop: terminate every instance of this deployment that outlived its expires_at tag.

"This deployment" is the `ec2-trainer:deployment` tag (setting aws.deployment): another Airflow deployment's
instances in the same AWS account are its own reaper's business, expired or not.

The training DAG's teardown terminates its instance; this catches what a crashed scheduler, a deleted DAG run or a
killed worker left behind. (The instance's own watchdog powers it off at the same deadline even if Airflow is gone.)
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from orchestrator.dag_docs import dag_doc


@dag(
    dag_id="ec2_reaper",
    description="Backstop every 5 minutes: terminates this deployment's instances past their expires_at tag",
    schedule=timedelta(minutes=5),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ec2", "cleanup"],
    doc_md=dag_doc("ec2_reaper"),
)
def ec2_reaper() -> None:
    @task(retries=3, retry_delay=timedelta(seconds=30))
    def reap_expired_instances() -> list[str]:
        from orchestrator.cloud.tasks import reap_expired
        from orchestrator.config.settings import load_settings

        return reap_expired(load_settings())

    reap_expired_instances()


ec2_reaper()
