"""Opt-in smoke test on real AWS (`make smoke-aws`): the unchanged pipeline on the smallest sensible CPU instance.

It runs only when asked (EC2_TRAINER_SMOKE_AWS=1, which `make smoke-aws` sets) and when AWS credentials exist; CI does
neither. Everything else comes from the deployment's own configuration (TRAINER_CONFIG / TRAINER__* and the
AIRFLOW_CONN_* connections, see docs/production.md): this test only makes the run small and cheap, prints what it may
cost first, and terminates whatever the run launched, whatever happened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from tests.support.pipeline import run_dag

pytestmark = pytest.mark.aws

OPT_IN = "EC2_TRAINER_SMOKE_AWS"
INSTANCE_TYPE = os.environ.get("EC2_TRAINER_SMOKE_INSTANCE_TYPE", "t3.large")
# On-demand Linux prices in us-east-1 (USD per hour, November 2026); other regions differ by a few percent.
HOURLY_USD = {"t3.medium": 0.0416, "t3.large": 0.0832, "t3.xlarge": 0.1664, "m7i.large": 0.1008}
GP3_USD_PER_GB_MONTH = 0.08
LIFETIME_MINUTES = 60  # the instance's own deadline: it powers itself off (= terminates) then, whatever Airflow does
TYPICAL_MINUTES = 15
# Small and CPU-only: the job checks the pipeline, not the model.
SMOKE_SETTINGS = {
    "AWS__INSTANCE_TYPES": INSTANCE_TYPE,
    "AWS__SPOT": "false",
    "AWS__MAX_LIFETIME_MINUTES": str(LIFETIME_MINUTES),
    "AWS__LAUNCH_TIMEOUT_MINUTES": "10",
    "INSTANCE__REQUIRE_GPU": "false",
    "INSTANCE__READY_TIMEOUT_MINUTES": "25",
    "TRAINING__TIMEOUT_MINUTES": "20",
    "TRAINING__EPOCHS": "1",
    "TRAINING__BATCH_SIZE": "16",
    "TRAINING__DATA_URI": "synthetic://?train_per_class=40&val_per_class=10&test_per_class=10&size=64&seed=0",
    "TRAINING__EXTRA_PARAMS": "image_size=64",
}


def cost_estimate(instance_type: str, root_gb: int) -> str:
    disk_hourly = root_gb * GP3_USD_PER_GB_MONTH / 730
    hourly = HOURLY_USD.get(instance_type)
    if hourly is None:
        return f"{instance_type}: price not in this test's table, see https://aws.amazon.com/ec2/pricing/on-demand/"
    per_hour = hourly + disk_hourly
    return (
        f"{instance_type} on-demand (~${hourly:.4f}/h) + {root_gb} GB gp3 (~${disk_hourly:.4f}/h): typically "
        f"{TYPICAL_MINUTES} min, ~${per_hour * TYPICAL_MINUTES / 60:.2f}; at most {LIFETIME_MINUTES} min (the "
        f"instance's own deadline), ~${per_hour * LIFETIME_MINUTES / 60:.2f}"
    )


T = TypeVar("T")


def run_instances(
    ec2: Any, project_tag: str, deployment: str, launched_after: datetime, run_id: str | None
) -> list[str]:
    """This smoke run's instances: by its run tag, or (when the run never reported its id) the DAG's instances
    launched since the test began; always of this deployment only, which the per-deployment policy may terminate
    (one foreign match would make the whole TerminateInstances call fail)."""
    from orchestrator.cloud.launch_spec import deployment_tags
    from orchestrator.contracts import TAG_DAG_ID

    tags = {**deployment_tags(project_tag, deployment), TAG_DAG_ID: "ec2_training"}
    filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]
    if run_id:
        filters.append({"Name": "tag:ec2-trainer:run_id", "Values": [run_id]})
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [
        i["InstanceId"]
        for page in pages
        for r in page["Reservations"]
        for i in r["Instances"]
        if run_id or i["LaunchTime"] >= launched_after
    ]


def run_then_clean(run: Callable[[], T], clean: Callable[[T | None], list[str]]) -> tuple[T, list[str]]:
    """run(), then clean(its result, or None when it raised). A failing cleanup never hides the run's own failure:
    both are raised together."""
    try:
        result = run()
    except BaseException as failure:
        try:
            clean(None)
        except Exception as cleanup_failure:
            raise BaseExceptionGroup(
                "the smoke run failed and so did its cleanup: terminate its instance in the EC2 console "
                "(tag ec2-trainer:dag_id = ec2_training, this deployment)",
                [failure, cleanup_failure],
            ) from None
        raise
    return result, clean(result)


def test_the_pipeline_runs_on_aws_and_terminates(airflow_db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"real AWS, real money: opt in with `make smoke-aws` ({OPT_IN}=1)")
    if boto3.session.Session().get_credentials() is None and "AIRFLOW_CONN_AWS_DEFAULT" not in os.environ:
        pytest.skip("no AWS credentials (environment, ~/.aws, instance role or AIRFLOW_CONN_AWS_DEFAULT)")
    for name, value in SMOKE_SETTINGS.items():
        monkeypatch.setenv(f"TRAINER__{name}", value)

    from orchestrator.cloud.ec2 import terminate_instances
    from orchestrator.config.connections import aws_client
    from orchestrator.config.settings import load_settings

    settings = load_settings()
    if settings.mlflow.tracking_uri == "https://mlflow.example.com":
        pytest.fail("set TRAINER__MLFLOW__TRACKING_URI to your MLflow server (reachable from Airflow and the instance)")
    print(f"\nsmoke-aws in {settings.aws.region}: {cost_estimate(INSTANCE_TYPE, settings.aws.root_volume_gb)}")
    ec2 = aws_client("ec2", settings.aws.conn_id, settings.aws.region)
    started = datetime.now(tz=UTC)

    def clean(dag_run: Any) -> list[str]:
        run_id = dag_run.run_id if dag_run is not None else None
        leftover = run_instances(ec2, settings.aws.project_tag, settings.aws.deployment, started, run_id)
        if leftover:
            terminate_instances(ec2, leftover)
            ec2.get_waiter("instance_terminated").wait(
                InstanceIds=leftover, WaiterConfig={"Delay": 15, "MaxAttempts": 40}
            )
        print(f"smoke-aws: terminated {leftover or 'nothing (no instance was launched)'} at {time.strftime('%X')}")
        return leftover

    dag_run, leftover = run_then_clean(lambda: run_dag(git_ref=os.environ.get("EC2_TRAINER_SMOKE_GIT_REF", "")), clean)
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert dag_run.state == "success", states
    assert len(leftover) == 1, f"one instance expected, found {leftover}"
